"""What every multi-view dataset shares: sample records, reading views, the torch Dataset.

A dataset format (Real-IAD, MANTA, a folder per sample) only has to *index* its files into
``SampleRecord``s, each holding one ``ViewFile`` per selected view in the dataset's view order.
Reading, checking, resizing and attaching the homographies is the same for all of them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vsad_lightning.data.batch import MultiViewSample
from vsad_lightning.data.images import read_image_rgb, read_mask
from vsad_lightning.data.transforms import as_size, homographies_for, views_to_tensors
from vsad_lightning.errors import DataError
from vsad_lightning.geometry.cache import HomographyCache, default_cache_path

NORMAL_CLASS = "OK"
"""The anomaly class of normal samples (Real-IAD's name; MANTA's ``good`` maps to it)."""


@dataclass(frozen=True)
class ViewFile:
    """Where one view of one sample lives.

    Attributes:
        view: the view token, e.g. ``"C3"``.
        image_path: the image file.
        mask_path: the defect mask file, ``None`` for a normal view.
        crop: ``(index, count)`` when the file is a horizontal strip of ``count`` equal views
            (MANTA) and this view is crop ``index``; ``None`` for a whole file.
        source: where this view was listed (a JSON entry, a folder), for error messages.
    """

    view: str
    image_path: Path
    mask_path: Path | None = None
    crop: tuple[int, int] | None = None
    source: str = ""


@dataclass(frozen=True)
class SampleRecord:
    """One sample's files: ``views`` in the dataset's view order."""

    sample_id: str
    category: str
    anomaly_class: str
    views: tuple[ViewFile, ...]

    @property
    def view_labels(self) -> list[int]:
        """1 for a view with a mask file, from the index alone (DESIGN.md, Datasets: "a view is
        anomalous when it has a mask"). The dataset's samples refine this with the mask's
        content: a mask (or MANTA strip crop) without any defect pixel marks nothing."""
        return [int(v.mask_path is not None) for v in self.views]

    @property
    def label(self) -> int:
        """1 when any view is anomalous."""
        return int(any(self.view_labels))


_VIEW_NUMBER = re.compile(r"(\d+)")


def natural_key(text: str) -> list:
    """Sort key that puts ``C2`` before ``C10``."""
    return [int(p) if p.isdigit() else p for p in _VIEW_NUMBER.split(text)]


def cache_path_for(root: str | os.PathLike, category: str, resolution: int | str) -> Path:
    """The default homography cache of a category (``/`` in a MANTA ``domain/class`` becomes
    ``__`` so the cache stays one file in ``<root>/vsad_cache/``)."""
    return default_cache_path(root, category.replace("/", "__"), resolution)


def select_views(found: Sequence[str], requested: Sequence[str] | None, where: str) -> list[str]:
    """The view order of a dataset: ``requested`` as given, or every view found, naturally
    sorted. Requesting an unknown or duplicated view is an error."""
    found_sorted = sorted(set(found), key=natural_key)
    if requested is None:
        if not found_sorted:
            raise DataError(f"{where}: no views found")
        return found_sorted
    requested = list(requested)
    if not requested:
        raise DataError(f"{where}: the list of requested views is empty")
    if len(set(requested)) != len(requested):
        raise DataError(f"{where}: a view is requested twice in {requested}")
    unknown = [v for v in requested if v not in found_sorted]
    if unknown:
        raise DataError(f"{where}: views {unknown} were requested, but the data has {found_sorted}")
    return requested


def read_sample_views(record: SampleRecord) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """Read one sample: ``V`` ``(H, W, 3)`` uint8 RGB images and ``V`` bool masks or ``None``.

    Every view must have the size of the first one, and a mask the size of its image.
    """
    images: list[np.ndarray] = []
    masks: list[np.ndarray | None] = []
    strips: dict[Path, np.ndarray] = {}  # a MANTA strip is read once for all its views
    mask_strips: dict[Path, np.ndarray] = {}
    for vf in record.views:
        what = f"image of sample {record.sample_id!r} view {vf.view}"
        image = _read_cropped(vf.image_path, vf.crop, strips, read_image_rgb, what)
        mask = None
        if vf.mask_path is not None:
            what = f"mask of sample {record.sample_id!r} view {vf.view}"
            mask = _read_cropped(vf.mask_path, vf.crop, mask_strips, read_mask, what)
            if mask.shape != image.shape[:2]:
                raise DataError(
                    f"mask {vf.mask_path} of sample {record.sample_id!r} view {vf.view} is "
                    f"{_wh(mask)}, but its image {vf.image_path} is {_wh(image)}"
                )
        if images and image.shape != images[0].shape:
            first = record.views[0]
            raise DataError(
                f"image {vf.image_path} of sample {record.sample_id!r} view {vf.view} is "
                f"{_wh(image)}, but view {first.view} ({first.image_path}) is {_wh(images[0])}; "
                "all views of a sample must have the same size"
            )
        images.append(image)
        masks.append(mask)
    return images, masks


def _wh(array: np.ndarray) -> str:
    return f"{array.shape[1]}x{array.shape[0]} px"


def _read_cropped(path: Path, crop, memo: dict, reader, what: str) -> np.ndarray:
    if crop is None:
        return reader(path, what)
    if path not in memo:
        memo[path] = reader(path, what)
    strip = memo[path]
    index, count = crop
    width = strip.shape[1]
    if width % count != 0:
        raise DataError(
            f"{what}: {path} is {width} px wide, not divisible into {count} equal views"
        )
    step = width // count
    return np.ascontiguousarray(strip[:, index * step : (index + 1) * step])


def resolve_homographies(
    homographies: HomographyCache | str | os.PathLike | None,
    default_path: Path,
    category: str,
) -> HomographyCache:
    """The cache given, or loaded from a path, or from ``default_path``; never invented."""
    if isinstance(homographies, HomographyCache):
        return homographies
    path = Path(homographies) if homographies is not None else default_path
    if not path.is_file():
        raise DataError(
            f"no homography cache for category {category!r} at {path}; build it with "
            f"`vsad-homography --root <root> --category {category}` (vsad-fit builds it on "
            "first use), or pass one"
        )
    return HomographyCache.load(path)


class MultiViewDataset(Dataset):
    """A torch ``Dataset`` of ``MultiViewSample``s over indexed ``SampleRecord``s.

    Args:
        records: the samples, in a fixed order.
        category: the category name carried by every sample.
        view_names: the view tokens, in the order of each record's ``views``.
        homographies: the category's homography cache (all ``view_names`` must be in it).
        image_size: output ``(W, H)`` or one int for a square; ``None`` keeps the native size.
    """

    def __init__(
        self,
        records: Sequence[SampleRecord],
        *,
        category: str,
        view_names: Sequence[str],
        homographies: HomographyCache,
        image_size: int | tuple[int, int] | None = None,
    ) -> None:
        self.records = list(records)
        self.category = category
        self.view_names = list(view_names)
        self.homographies = homographies
        self.image_size = as_size(image_size)
        missing = [v for v in self.view_names if v not in homographies.views]
        if missing:
            raise DataError(
                f"homography cache of category {homographies.category!r} has views "
                f"{homographies.views}, but this dataset needs {missing}; rebuild it with "
                "vsad-homography"
            )
        self._homography_memo: dict[tuple, object] = {}

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> list[int]:
        """Sample labels known from the index alone (no image is read)."""
        return [r.label for r in self.records]

    def read_raw(self, index: int) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
        """The views as stored: uint8 RGB images and bool masks (``None`` without a mask)."""
        return read_sample_views(self.records[index])

    def __getitem__(self, index: int) -> MultiViewSample:
        record = self.records[index]
        images, masks = read_sample_views(record)
        native = (images[0].shape[1], images[0].shape[0])
        out_size = self.image_size or native
        image_tensor, mask_tensor = views_to_tensors(images, masks, out_size)
        key = (native, out_size)
        if key not in self._homography_memo:
            self._homography_memo[key] = homographies_for(
                self.homographies, self.view_names, native, out_size, record.sample_id
            )
        # Labelled at the native size: a defect too small to survive the resize still makes
        # its view anomalous. An all-zero mask file marks nothing.
        view_labels = torch.tensor([int(m is not None and bool(m.any())) for m in masks])
        return MultiViewSample(
            images=image_tensor,
            masks=mask_tensor,
            view_labels=view_labels,
            sample_label=view_labels.max(),
            homographies=self._homography_memo[key].clone(),
            sample_id=record.sample_id,
            category=record.category,
            view_names=list(self.view_names),
            image_paths=[str(v.image_path) for v in record.views],
        )
