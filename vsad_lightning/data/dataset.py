"""What every multi-view dataset shares: sample records, reading views, the torch Dataset.

A dataset format (Real-IAD, MANTA, a folder per sample) only has to *index* its files into
``SampleRecord``s, each holding one ``ViewFile`` per selected view in the dataset's view order.
Reading, checking, resizing and attaching the homographies is the same for all of them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from vsad_lightning.data.batch import MultiViewSample
from vsad_lightning.data.images import probe_image, read_image_rgb, read_mask
from vsad_lightning.data.transforms import as_size, homographies_for, views_to_tensors
from vsad_lightning.errors import DataError
from vsad_lightning.geometry.cache import HomographyCache, default_cache_path
from vsad_lightning.geometry.projection import scale_homography, to_opencv_convention
from vsad_lightning.geometry.registration import registered_homographies

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
        """1 for a view with a mask file, from the index alone (docs/datasets.md: a view is
        anomalous when it has a mask). The dataset's samples refine this with the mask's
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


FILE_CHECKS = ("header", "decode", "none")
"""How much of every file ``check_sample_files`` reads (config option ``data.check_files``)."""

MAX_LISTED_PROBLEMS = 5
"""Bad samples named in the one-line error of ``MultiViewDataset.check_files``."""


def check_sample_files(record: SampleRecord, mode: str = "header") -> tuple[int, int]:
    """Check one sample's files before any training and return its views' ``(W, H)``.

    ``header`` reads the image headers (``images.probe_image``: missing, empty, truncated or
    unidentifiable files, view sizes, mask sizes) -- the same size rules as
    ``read_sample_views``, with the same messages, at a few hundred bytes per file.
    ``decode`` runs ``read_sample_views`` itself: every pixel is decoded, as training will.
    """
    if mode == "decode":
        images, _ = read_sample_views(record)
        return images[0].shape[1], images[0].shape[0]
    if mode != "header":
        raise ValueError(f"check mode must be one of {FILE_CHECKS[:2]}, got {mode!r}")
    sizes: dict[Path, tuple[int, int]] = {}  # a MANTA strip is probed once for all its views

    def probe(path: Path, what: str) -> tuple[int, int]:
        if path not in sizes:
            sizes[path] = probe_image(path, what)
        return sizes[path]

    first: tuple[ViewFile, tuple[int, int]] | None = None
    for vf in record.views:
        what = f"image of sample {record.sample_id!r} view {vf.view}"
        file_size = probe(vf.image_path, what)
        size = file_size
        if vf.crop is not None:
            count = vf.crop[1]
            if file_size[0] % count != 0:
                raise DataError(
                    f"{what}: {vf.image_path} is {file_size[0]} px wide, not divisible into "
                    f"{count} equal views"
                )
            size = (file_size[0] // count, file_size[1])
        if vf.mask_path is not None:
            what = f"mask of sample {record.sample_id!r} view {vf.view}"
            mask_size = probe(vf.mask_path, what)
            if mask_size != file_size:  # a MANTA mask strip matches its image strip
                raise DataError(
                    f"mask {vf.mask_path} of sample {record.sample_id!r} view {vf.view} is "
                    f"{mask_size[0]}x{mask_size[1]} px, but its image {vf.image_path} is "
                    f"{file_size[0]}x{file_size[1]} px"
                )
        if first is None:
            first = (vf, size)
        elif size != first[1]:
            (w0, h0) = first[1]
            raise DataError(
                f"image {vf.image_path} of sample {record.sample_id!r} view {vf.view} is "
                f"{size[0]}x{size[1]} px, but view {first[0].view} ({first[0].image_path}) is "
                f"{w0}x{h0} px; all views of a sample must have the same size"
            )
    assert first is not None  # a record always has at least one view
    return first[1]


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
        homographies.check_category(category)
        return homographies
    path = Path(homographies) if homographies is not None else default_path
    if not path.is_file():
        raise DataError(
            f"no homography cache for category {category!r} at {path}; build it with "
            f"`vsad-homography --root <root> --category {category}` (vsad-fit builds it on "
            "first use), or pass one"
        )
    return HomographyCache.load(path, category)


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
        self._sample_size: tuple[int, int] | None = None
        self._sample_matrices: dict[str, dict[str, np.ndarray]] = {}
        self._registration_size: tuple[int, int] | None = None
        self._registration: dict[str, np.ndarray] = {}

    def set_sample_homographies(
        self,
        image_size: tuple[int, int] | None,
        matrices: Mapping[str, Mapping[str, np.ndarray]] | None,
    ) -> None:
        """Use each sample's own homographies where it has them (``MultiViewDataModule``'s
        ``per_sample_homographies``).

        Args:
            image_size: ``(W, H)`` the matrices refer to (the stored images' size).
            matrices: sample id -> pair key ``"C1->C2"`` -> ``(3, 3)`` ``H``. A sample or pair
                absent here keeps the category's homography; ``None`` clears them all.
        """
        self._sample_size = None if matrices is None else tuple(image_size)
        self._sample_matrices = {
            sample: {key: np.asarray(H, dtype=np.float64) for key, H in pairs.items()}
            for sample, pairs in (matrices or {}).items()
        }

    def set_registration(
        self,
        image_size: tuple[int, int] | None,
        matrices: Mapping[str, np.ndarray] | None,
    ) -> None:
        """Register every sample's views to the reference pose (``MultiViewDataModule``'s
        ``register_views``, docs/method.md#registration).

        Args:
            image_size: ``(W, H)`` the matrices refer to (the stored images' size).
            matrices: sample id -> ``(V, 3, 3)`` ``R_v`` in ``view_names`` order, mapping the
                sample's view ``v`` onto the reference's view ``v``; a sample absent here (the
                reference itself) gets the identity. ``None`` turns registration off.
        """
        self._registration_size = None if matrices is None else tuple(image_size)
        self._registration = {
            sample: np.asarray(R, dtype=np.float64) for sample, R in (matrices or {}).items()
        }

    def _register(
        self, sample: str, images: list[np.ndarray], out_size: tuple[int, int]
    ) -> tuple[list[np.ndarray], Tensor]:
        """The sample's views warped into their reference frames at the stored resolution
        (bilinear, border replicated), and ``(V, 3, 3)`` float64 ``R_v`` at ``out_size``."""
        V = len(self.view_names)
        R = self._registration.get(sample)
        if R is None:
            return images, torch.eye(3, dtype=torch.float64).repeat(V, 1, 1)
        if R.shape != (V, 3, 3):
            raise DataError(
                f"registration of sample {sample!r}: expected {V} matrices (V, 3, 3) for views "
                f"{self.view_names}, got shape {R.shape}"
            )
        native = (images[0].shape[1], images[0].shape[0])
        at_native = scale_homography(torch.from_numpy(R), self._registration_size, native)
        warped = [
            cv2.warpPerspective(
                image,
                to_opencv_convention(at_native[v].numpy()),
                native,
                flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_REPLICATE,
            )
            for v, image in enumerate(images)
        ]
        return warped, scale_homography(torch.from_numpy(R), self._registration_size, out_size)

    def _own_homographies(self, sample: str, base: Tensor, out_size: tuple[int, int]) -> Tensor:
        """``base`` (the category's, at ``out_size``) with the sample's own pairs put in."""
        out = base.clone()
        own = self._sample_matrices.get(sample)
        if not own:
            return out
        index = {v: i for i, v in enumerate(self.view_names)}
        for key, H in own.items():
            src, dst = key.split("->")
            if src in index and dst in index and src != dst:
                scaled = scale_homography(torch.from_numpy(H), self._sample_size, out_size)
                out[index[src], index[dst]] = scaled.to(out.dtype)
        return out

    def __len__(self) -> int:
        return len(self.records)

    def check_files(self, mode: str = "header", what: str = "") -> None:
        """Check every sample's files now, so that bad input stops a run before training.

        Every record is checked (``check_sample_files``; ``mode`` ``"none"`` skips it), and
        every distinct view size against the homography cache's aspect ratio. All problems
        are collected and raised as one ``DataError``: the first in full, then the count and
        the other bad samples' ids, so one pass over 150,000 files lists them all.

        Args:
            mode: ``"header"``, ``"decode"`` or ``"none"`` (config option ``data.check_files``).
            what: names the split in the message, e.g. ``"training"``.
        """
        if mode not in FILE_CHECKS:
            raise DataError(f"data.check_files must be one of {FILE_CHECKS}, got {mode!r}")
        if mode == "none":
            return
        problems: list[tuple[str, DataError]] = []
        sizes: dict[tuple[int, int], str] = {}
        for record in self.records:
            try:
                sizes.setdefault(check_sample_files(record, mode), record.sample_id)
            except DataError as e:
                problems.append((record.sample_id, e))
        for size, sample in sizes.items():
            try:  # the aspect-ratio rule of __getitem__, once per distinct size
                homographies_for(self.homographies, self.view_names, size, size, sample)
            except DataError as e:
                problems.append((sample, e))
        if not problems:
            return
        message = str(problems[0][1])
        if len(problems) > 1:
            others = [sample for sample, _ in problems[1 : 1 + MAX_LISTED_PROBLEMS]]
            more = " ..." if len(problems) > 1 + MAX_LISTED_PROBLEMS else ""
            split = f" of the {what} split" if what else ""
            message += (
                f" (and {len(problems) - 1} more bad samples{split} of category "
                f"{self.category!r}: {others}{more})"
            )
        raise DataError(message)

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
        registration = None
        if self._registration_size is not None:  # masks stay in the original frames
            images, registration = self._register(record.sample_id, images, out_size)
        image_tensor, mask_tensor = views_to_tensors(images, masks, out_size)
        key = (native, out_size)
        if key not in self._homography_memo:
            self._homography_memo[key] = homographies_for(
                self.homographies, self.view_names, native, out_size, record.sample_id
            )
        # Labelled at the native size: a defect too small to survive the resize still makes
        # its view anomalous. An all-zero mask file marks nothing.
        view_labels = torch.tensor([int(m is not None and bool(m.any())) for m in masks])
        homographies = self._own_homographies(
            record.sample_id, self._homography_memo[key], out_size
        )
        if registration is not None:
            homographies = registered_homographies(homographies, registration)
        return MultiViewSample(
            images=image_tensor,
            masks=mask_tensor,
            view_labels=view_labels,
            sample_label=view_labels.max(),
            homographies=homographies,
            registration=None if registration is None else registration.to(torch.float32),
            sample_id=record.sample_id,
            category=record.category,
            view_names=list(self.view_names),
            image_paths=[str(v.image_path) for v in record.views],
        )
