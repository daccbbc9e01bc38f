"""A generic layout for users' own rigs: one folder per sample, one file per view.

Layout::

    <root>/<split>/<sample_id>/<view>.<ext>          e.g. train/part_0001/C1.png
    <root>/<split>/<sample_id>/masks/<view>.png      optional: the defect mask of that view

``<ext>`` is any of ``IMAGE_EXTENSIONS``; the view token is the file stem (``C1``, ``top``,
...). Views are ordered naturally (``C2`` before ``C10``) unless ``views`` gives the order;
every sample must have every selected view (an error names the sample otherwise) and exactly
one file per view. A view is anomalous when it has a mask with a defect pixel; a sample
without masks is normal (for unlabelled data, e.g. ``vsad-predict``, that means label 0).
With ``split=None`` the sample folders sit directly in ``root``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

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

MASK_FOLDER = "masks"
FOLDER_RESOLUTION = "folder"
"""The resolution tag of folder-layout homography caches."""


def _view_files(folder: Path, what: str) -> dict[str, Path]:
    """``view token -> file`` of the images directly in ``folder`` (two files, one view: error)."""
    out: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not (path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS):
            continue
        if path.stem in out:
            raise DataError(
                f"{what} has two files for view {path.stem!r}: {out[path.stem]} and {path}"
            )
        out[path.stem] = path
    return out


def index_folder(
    root: str | os.PathLike,
    split: str | None,
    views: Sequence[str] | None = None,
    category: str = "",
) -> tuple[list[SampleRecord], list[str]]:
    """Index ``<root>/<split>/``: ``(records sorted by sample id, view order)``."""
    base = Path(root) / split if split else Path(root)
    if not base.is_dir():
        raise DataError(f"no folder {base} (expected <root>/<split>/<sample_id>/<view>.<ext>)")
    category = category or Path(root).name
    sample_dirs = sorted(
        (d for d in base.iterdir() if d.is_dir()), key=lambda d: natural_key(d.name)
    )
    found: dict[str, tuple[dict[str, Path], dict[str, Path]]] = {}
    for d in sample_dirs:
        images = _view_files(d, f"sample folder {d}")
        if not images:
            continue
        masks = (
            _view_files(d / MASK_FOLDER, f"mask folder {d / MASK_FOLDER}")
            if (d / MASK_FOLDER).is_dir()
            else {}
        )
        stray = sorted(set(masks) - set(images))
        if stray:
            raise DataError(f"sample {d.name!r} ({d}) has masks for views {stray} but no images")
        found[d.name] = (images, masks)
    if not found:
        raise DataError(f"no sample folders with images in {base}")
    all_views = {v for images, _ in found.values() for v in images}
    view_order = select_views(all_views, views, f"folder dataset {base}")
    records = []
    for sample_id, (images, masks) in found.items():
        missing = [v for v in view_order if v not in images]
        if missing:
            raise DataError(
                f"sample {sample_id!r} ({base / sample_id}) has no view {missing} (it has "
                f"{sorted(images, key=natural_key)})"
            )
        view_files = tuple(
            ViewFile(v, images[v], masks.get(v), None, str(base / sample_id)) for v in view_order
        )
        anomaly_class = "anomalous" if any(vf.mask_path for vf in view_files) else NORMAL_CLASS
        records.append(SampleRecord(sample_id, category, anomaly_class, view_files))
    return records, view_order


class MultiViewFolderDataset(MultiViewDataset):
    """Samples from the folder layout of the module docstring.

    Args:
        root: the dataset root.
        split: the sub-folder to read (``"train"``, ``"test"``), or ``None`` for ``root``
            itself.
        views: the views to use, in this order (default: all, naturally sorted).
        image_size: output size (int or ``(W, H)``); ``None`` keeps the stored size.
        homographies: a ``HomographyCache`` or its path; ``None`` reads
            ``<root>/vsad_cache/homographies_<category>_folder.json`` (missing: ``DataError``).
        category: the name carried by the samples (default: the root folder's name).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | None = "train",
        views: Sequence[str] | None = None,
        image_size: int | tuple[int, int] | None = None,
        homographies: HomographyCache | str | os.PathLike | None = None,
        category: str | None = None,
    ) -> None:
        category = category or Path(root).resolve().name
        records, view_order = index_folder(root, split, views, category)
        cache = resolve_homographies(
            homographies, cache_path_for(root, category, FOLDER_RESOLUTION), category
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
