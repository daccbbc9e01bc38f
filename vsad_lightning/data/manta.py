"""MANTA: each image is a horizontal strip of ``V`` equal views (docs/datasets.md#manta).

Layout (``category`` is ``"<domain>/<class>"``)::

    <root>/<domain>/<class>/train/good/<name>.<ext>
    <root>/<domain>/<class>/test/good/<name>.<ext>
    <root>/<domain>/<class>/test/<defect>/<name>.<ext>
    <root>/<domain>/<class>/ground_truth/<defect>/<mask>

The mask of ``test/<defect>/<name>.<ext>`` is a strip of the same size in
``ground_truth/<defect>/``, named (first match wins) ``<name>.<ext>``, ``<name>.png`` or
``<name>_mask.png``. Each strip is split into ``V`` crops named ``C1..CV`` left to right; a
crop of the mask with no defect pixel is a normal view. A strip whose width is not divisible by
``V`` is a ``DataError`` naming the file. A defect image without a mask is an error (its views
could not be labelled). The sample id is ``<good|defect>/<name>``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import cv2

from vsad_lightning.data.dataset import (
    NORMAL_CLASS,
    MultiViewDataset,
    SampleRecord,
    ViewFile,
    cache_path_for,
    natural_key,
    resolve_homographies,
    select_views,
)
from vsad_lightning.data.images import IMAGE_EXTENSIONS
from vsad_lightning.errors import DataError
from vsad_lightning.geometry.cache import HomographyCache

GOOD_FOLDER = "good"
MANTA_RESOLUTION = "manta"
"""The resolution tag of MANTA homography caches (MANTA ships one resolution)."""


def manta_category_dir(root: str | os.PathLike, category: str) -> Path:
    """``<root>/<domain>/<class>``; unknown categories list the ones there are."""
    root = Path(root)
    parts = [p for p in category.split("/") if p]
    if len(parts) != 2:
        raise DataError(f"MANTA category must be '<domain>/<class>', got {category!r}")
    folder = root.joinpath(*parts)
    if not (folder / "train").is_dir() and not (folder / "test").is_dir():
        available = sorted(
            f"{d.parent.name}/{d.name}" for d in root.glob("*/*") if (d / "train").is_dir()
        )
        raise DataError(
            f"unknown MANTA category {category!r} (no {folder}/train); available: {available}"
        )
    return folder


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda p: natural_key(p.name),
    )


def _strip_width(path: Path) -> int:
    """Width of an image file (decoded once at indexing, so a bad strip fails early)."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise DataError(f"MANTA image {path} cannot be decoded by OpenCV (corrupt or not an image)")
    return image.shape[1]


def _mask_for(gt_dir: Path, image: Path) -> Path | None:
    for name in (image.name, f"{image.stem}.png", f"{image.stem}_mask.png"):
        if (gt_dir / name).is_file():
            return gt_dir / name
    return None


def index_manta(
    root: str | os.PathLike,
    category: str,
    split: str,
    num_views: int = 5,
    views: Sequence[str] | None = None,
    check_widths: bool = True,
) -> tuple[list[SampleRecord], list[str]]:
    """Index one split: ``(records, view order)``.

    ``check_widths`` reads every strip once to check its width divides into ``num_views``
    (cheap for MANTA's small images); otherwise the check happens when a sample is read.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    folder = manta_category_dir(root, category)
    split_dir = folder / split
    if not split_dir.is_dir():
        raise DataError(f"MANTA category {category!r} has no {split} folder {split_dir}")
    all_views = [f"C{k + 1}" for k in range(num_views)]
    view_order = select_views(all_views, views, f"MANTA category {category!r}")
    records = []
    for class_dir in sorted((d for d in split_dir.iterdir() if d.is_dir()), key=lambda d: d.name):
        defect = class_dir.name
        normal = defect == GOOD_FOLDER
        gt_dir = folder / "ground_truth" / defect
        for image in _images_in(class_dir):
            mask = None
            if not normal:
                mask = _mask_for(gt_dir, image)
                if mask is None:
                    raise DataError(
                        f"MANTA defect image {image} has no mask strip in {gt_dir} (looked for "
                        f"{image.name}, {image.stem}.png, {image.stem}_mask.png)"
                    )
            if check_widths:
                width = _strip_width(image)
                if width % num_views != 0:
                    raise DataError(
                        f"MANTA image {image} is {width} px wide, not divisible into "
                        f"{num_views} equal views"
                    )
            # A mask strip is shared by all views; crops without defect pixels read as empty
            # masks and are labelled normal by the dataset.
            view_files = tuple(
                ViewFile(view, image, mask, (all_views.index(view), num_views), str(image))
                for view in view_order
            )
            anomaly_class = NORMAL_CLASS if normal else defect
            records.append(
                SampleRecord(f"{defect}/{image.stem}", category, anomaly_class, view_files)
            )
    if not records:
        raise DataError(f"MANTA category {category!r} has no images in {split_dir}")
    return records, view_order


class MantaDataset(MultiViewDataset):
    """MANTA samples (layout in the module docstring).

    Args:
        root: the MANTA root holding ``<domain>/<class>/``.
        category: ``"<domain>/<class>"``.
        split: ``"train"`` or ``"test"``.
        num_views: views per strip (MANTA: 5).
        views: a subset of ``C1..CV``, in this order.
        image_size: output size per view; ``None`` keeps the crop size.
        homographies: a ``HomographyCache`` or its path; ``None`` reads
            ``<root>/vsad_cache/homographies_<domain>__<class>_manta.json``, and a missing
            cache is a ``DataError`` that says to run ``vsad-homography --dataset manta``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        category: str,
        split: str = "train",
        num_views: int = 5,
        views: Sequence[str] | None = None,
        image_size: int | tuple[int, int] | None = None,
        homographies: HomographyCache | str | os.PathLike | None = None,
    ) -> None:
        records, view_order = index_manta(root, category, split, num_views, views)
        cache = resolve_homographies(
            homographies, cache_path_for(root, category, MANTA_RESOLUTION), category
        )
        super().__init__(
            records,
            category=category,
            view_names=view_order,
            homographies=cache,
            image_size=image_size,
        )
        self.root = Path(root)
        self.split = split
