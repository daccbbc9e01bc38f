"""Load a category's homography cache, or estimate and write it (docs/datasets.md).

``ensure_homography_cache`` is the one place that decides where a cache lives and builds a
missing one from ``K`` normal training samples; ``vsad-homography`` and the DataModule's
``prepare_data`` both call it. The datasets themselves only ever *load* a cache.

Each sample's own homographies (the category cache as prior) are estimated per split by
``data.sample_homographies.ensure_sample_homographies``; ``index_split`` lists a split's samples
for it (``vsad-homography --per-sample``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from vsad_lightning.data.dataset import SampleRecord, cache_path_for, read_sample_views
from vsad_lightning.data.folder import FOLDER_RESOLUTION, index_folder
from vsad_lightning.data.manta import MANTA_RESOLUTION, index_manta
from vsad_lightning.data.realiad import index_realiad
from vsad_lightning.errors import DataError
from vsad_lightning.geometry.cache import HomographyCache
from vsad_lightning.geometry.estimation import estimate_homographies
from vsad_lightning.utils.progress import Progress

DatasetKind = Literal["realiad", "manta", "folder"]
DATASET_KINDS = ("realiad", "manta", "folder")


def default_cache_for(
    dataset: str, root: str | os.PathLike, category: str, resolution: int | str
) -> Path:
    """Where each dataset kind keeps its cache by default (inside ``<root>/vsad_cache/``).

    Real-IAD: ``homographies_<category>_<resolution>.json``; MANTA: ``..._manta.json``
    (``domain/class`` -> ``domain__class``); folder: ``..._folder.json``.
    """
    tag = {"realiad": resolution, "manta": MANTA_RESOLUTION, "folder": FOLDER_RESOLUTION}
    if dataset not in tag:
        raise DataError(f"unknown dataset kind {dataset!r}; expected one of {DATASET_KINDS}")
    return cache_path_for(root, category, tag[dataset])


def index_split(
    dataset: str,
    root: str | os.PathLike,
    category: str,
    split: str,
    resolution: int | str = 256,
    views: Sequence[str] | None = None,
    num_views: int = 5,
) -> tuple[list[SampleRecord], list[str]]:
    """Every sample of one split (normal and anomalous) and the view order."""
    if dataset == "realiad":
        return index_realiad(root, category, split, resolution, views)
    if dataset == "manta":
        return index_manta(root, category, split, num_views, views)
    if dataset == "folder":
        return index_folder(root, split, views, category)
    raise DataError(f"unknown dataset kind {dataset!r}; expected one of {DATASET_KINDS}")


def index_training_normals(
    dataset: str,
    root: str | os.PathLike,
    category: str,
    resolution: int | str = 256,
    views: Sequence[str] | None = None,
    num_views: int = 5,
) -> tuple[list[SampleRecord], list[str]]:
    """The normal samples of the training split and the view order."""
    records, view_order = index_split(
        dataset, root, category, "train", resolution, views, num_views
    )
    normals = [r for r in records if r.label == 0]
    if not normals:
        raise DataError(
            f"category {category!r} has no normal training samples to estimate homographies from"
        )
    return normals, view_order


def spread_pick(count: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(count)`` (all of them when ``k >= count``)."""
    if k >= count:
        return list(range(count))
    return sorted({int(i) for i in np.linspace(0, count - 1, k).round()})


def build_homography_cache(
    root: str | os.PathLike,
    category: str,
    resolution: int | str = 256,
    num_samples: int = 8,
    *,
    dataset: str = "realiad",
    views: Sequence[str] | None = None,
    num_views: int = 5,
    progress: Callable[[str], None] | None = None,
    **estimation_options,
) -> HomographyCache:
    """Estimate the cache from ``num_samples`` normal training samples (spread over the sorted
    sample list, so the choice is deterministic), at the images' stored size."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    normals, view_order = index_training_normals(
        dataset, root, category, resolution, views, num_views
    )
    groups = []
    size = None
    for i in spread_pick(len(normals), num_samples):
        images, _ = read_sample_views(normals[i])
        sample_size = (images[0].shape[1], images[0].shape[0])
        if size is not None and sample_size != size:
            raise DataError(
                f"sample {normals[i].sample_id!r} has {sample_size[0]}x{sample_size[1]} px views "
                f"but the other estimation samples have {size[0]}x{size[1]} px"
            )
        size = sample_size
        groups.append(dict(zip(view_order, images, strict=True)))
    return estimate_homographies(
        groups,
        view_order,
        category=category,
        image_size=size,
        progress=progress,
        **estimation_options,
    )


def ensure_homography_cache(
    root: str | os.PathLike,
    category: str,
    resolution: int | str = 256,
    num_samples: int = 8,
    *,
    dataset: str = "realiad",
    path: str | os.PathLike | None = None,
    views: Sequence[str] | None = None,
    num_views: int = 5,
    rebuild: bool = False,
    progress: Callable[[str], None] | None = None,
    **estimation_options,
) -> HomographyCache:
    """Load the category's cache, or estimate it and write it atomically.

    Args:
        root, category, resolution: the dataset (``resolution`` names Real-IAD's folder).
        num_samples: ``K``, the normal training samples whose matches are pooled.
        dataset: ``"realiad"``, ``"manta"`` or ``"folder"``.
        path: the cache file; default ``default_cache_for(dataset, root, category, resolution)``.
        views: estimate for these views only (default: every view of the category, so that
            any subset can use the cache later).
        num_views: views per MANTA strip.
        rebuild: estimate even when the file exists (``vsad-homography`` does).
        progress: receives one line per estimation step (e.g. ``print``); ``None``: a
            progress meter on stderr (``vsad_lightning.utils.progress``).
        estimation_options: passed on to ``estimate_homographies``.

    An existing file that is not a valid cache, or lacks a requested view, is a ``DataError``
    (it is never silently overwritten).
    """
    path = (
        Path(path) if path is not None else default_cache_for(dataset, root, category, resolution)
    )
    if path.is_file() and not rebuild:
        cache = HomographyCache.load(path)
        missing = [v for v in (views or []) if v not in cache.views]
        if missing:
            raise DataError(
                f"homography cache {path} has views {cache.views}, but {missing} are needed; "
                "rebuild it with vsad-homography"
            )
        return cache
    meter = None
    if progress is None:  # no caller's lines: a progress meter (bar or plain log lines)
        meter = Progress(None, f"homographies of {category!r}", unit="steps")

        def progress(line: str) -> None:
            meter.update(1)

    cache = build_homography_cache(
        root,
        category,
        resolution,
        num_samples,
        dataset=dataset,
        views=views,
        num_views=num_views,
        progress=progress,
        **estimation_options,
    )
    if meter is not None:
        meter.close()
    cache.save(path)
    return cache
