"""Per-sample homographies of one split, estimated once and cached next to the category cache.

Parts are placed by hand, so each sample's true homographies differ from the category's by a
few pixels (``geometry.per_sample``). ``ensure_sample_homographies`` is the one driver that
estimates the samples of a split from their own stored images with
``estimate_sample_homographies`` (the category cache as prior), for the given pairs only, and
keeps the results in one file per split, by default (``sample_cache_path``)::

    <root>/vsad_cache/homographies_<category>_<res>_samples_<split>.json

Both ``MultiViewDataModule`` (``prepare_data``/``setup``, the reduced neighbour graph's pairs)
and ``vsad-homography --per-sample`` (``graph_pairs(..., bridged=True)``) call it, so a file the
command writes is the one a later ``vsad-fit`` reads and reuses. The format and its validation
are ``geometry.per_sample.SampleHomographyFile`` (docs/conventions.md); this module adds the
fingerprints that say when an entry is stale.

Reuse: an entry is re-estimated only when its sample is new, lacks a requested pair, or its
view files changed (``sources``: file names and byte sizes); a rebuilt category cache
(``prior``) invalidates the whole file. ``prior`` and ``sources`` are optional: a file written
by hand without them (``image_size`` and ``samples`` only) is trusted as it is.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from vsad_lightning.data.dataset import SampleRecord, read_sample_views
from vsad_lightning.data.transforms import ASPECT_TOLERANCE
from vsad_lightning.errors import DataError
from vsad_lightning.geometry.cache import HomographyCache
from vsad_lightning.geometry.per_sample import (
    SampleHomographies,
    SampleHomographyFile,
    estimate_sample_homographies,
)
from vsad_lightning.geometry.projection import scale_homography
from vsad_lightning.utils.progress import format_duration, progress_interval


def sample_cache_path(category_cache: str | os.PathLike, split: str) -> Path:
    """The per-sample file of ``split`` next to the category cache: ``homographies_<category>_
    <res>.json`` -> ``homographies_<category>_<res>_samples_<split>.json``."""
    path = Path(category_cache)
    return path.with_name(f"{path.stem}_samples_{split}.json")


def prior_fingerprint(prior: HomographyCache) -> str:
    """A short hash of the category cache's content (a rebuilt cache changes it)."""
    text = json.dumps(prior.to_json(), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def source_fingerprint(record: SampleRecord) -> str:
    """A short hash of the sample's view files: view token, file name, crop and byte size.

    Names, not full paths, so a copied or moved dataset keeps its cache; the byte size catches
    a replaced image (e.g. another predict folder with the same sample names).
    """
    parts = []
    for vf in record.views:
        try:
            size = vf.image_path.stat().st_size
        except OSError:
            size = -1
        parts.append(f"{vf.view}|{vf.image_path.name}|{vf.crop}|{size}")
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:16]


def _to_size(H: np.ndarray, size: tuple[int, int], to: tuple[int, int], what: str) -> np.ndarray:
    """``H`` at ``size`` -> at ``to`` (pixel-centre scaling); another aspect ratio is an error."""
    if size == to:
        return H
    if abs((size[0] / size[1]) / (to[0] / to[1]) - 1.0) > ASPECT_TOLERANCE:
        raise DataError(
            f"{what} has {size[0]}x{size[1]} px views, but the split's per-sample homographies "
            f"are at {to[0]}x{to[1]} px (another aspect ratio)"
        )
    return scale_homography(torch.from_numpy(H), size, to).numpy()


def _print_progress(line: str) -> None:
    print(line, flush=True)


def missing_samples(
    cache: SampleHomographyFile | None,
    records: Sequence[SampleRecord],
    pairs: Sequence[tuple[str, str]],
    prior: HomographyCache,
) -> list[SampleRecord]:
    """The records whose entry is absent, lacks one of ``pairs``, or was estimated from other
    files or another category cache (where the file records them)."""
    if cache is None or cache.prior not in (None, prior_fingerprint(prior)):
        return list(records)
    keys = [HomographyCache.pair_key(src, dst) for src, dst in pairs]
    todo = []
    for record in records:
        entry = cache.samples.get(record.sample_id)
        source = source_fingerprint(record)
        if (
            entry is None
            or any(k not in entry.H for k in keys)
            or cache.sources.get(record.sample_id, source) != source
        ):
            todo.append(record)
    return todo


def ensure_sample_homographies(
    records: Sequence[SampleRecord],
    prior: HomographyCache,
    pairs: Sequence[tuple[str, str]],
    path: str | os.PathLike,
    *,
    split: str,
    write: bool,
    rebuild: bool = False,
    progress: Callable[[str], None] | None = _print_progress,
    timings: dict[str, float] | None = None,
    extra_images: Mapping[str, np.ndarray] | None = None,
    label: str = "per-sample homographies",
    sample_prior: Callable[[SampleRecord, Mapping[str, np.ndarray]], HomographyCache] | None = None,
    **estimation_options,
) -> SampleHomographyFile:
    """Load the split's per-sample file, estimating and writing (atomically) what it lacks.

    Args:
        records: the split's samples.
        prior: the category cache (prior and fallback of the estimator).
        pairs: ordered ``(src, dst)`` view pairs to estimate (``geometry.per_sample.
            graph_pairs``).
        path: the per-sample file (default location: ``sample_cache_path``).
        split: names the split in progress lines and errors.
        write: estimate and write missing entries. ``False`` (every DDP process's ``setup``
            under a Trainer) only reads: a missing entry is a ``DataError``, since
            ``prepare_data`` must have written it.
        rebuild: ignore the existing file and estimate every sample (``vsad-homography``
            rebuilds what it is asked for, as it does the category cache).
        progress: receives progress lines (samples done / total, seconds per sample, ETA):
            one per tenth of the samples estimated, and one at least every
            ``VSAD_PROGRESS_INTERVAL`` seconds (``vsad_lightning.utils.progress``, default 15).
        timings: receives the summed CPU milliseconds per estimation stage of the samples
            estimated (``estimate_sample_homographies``'s ``timings``).
        extra_images: images added to every sample's views under their own names (not view
            tokens of the records), so that ``pairs`` may end in them: the reference views of
            ``data.registration``, which registers each view onto the reference sample's.
        label: what the progress lines call the estimates.
        sample_prior: ``(record, images by view) -> prior`` for one sample, instead of
            ``prior`` (which still names the file's fingerprint): the registration's placement
            prior (``data.registration.PlacementPrior``).
        estimation_options: passed on to ``estimate_sample_homographies``.
    """
    path = Path(path)
    if not records:
        raise DataError(f"the {split} split has no samples to estimate homographies for")
    cache = None
    if path.is_file() and not rebuild:
        try:
            cache = SampleHomographyFile.load(path)
        except DataError as e:
            raise DataError(f"{e}; delete it to re-estimate") from e
    todo = missing_samples(cache, records, pairs, prior)
    if not todo:
        return cache
    if not write:
        raise DataError(
            f"per-sample homography file {path} lacks {len(todo)} of the {len(records)} "
            f"samples of the {split} split (e.g. {todo[0].sample_id!r}); the datamodule's "
            "prepare_data estimates them before setup"
        )
    fingerprint = prior_fingerprint(prior)
    if cache is not None and cache.prior not in (None, fingerprint):
        cache = None  # estimated from another category cache: start again
    step = max(1, math.ceil(len(todo) / 10))
    start = time.perf_counter()
    last_line = start
    interval = progress_interval()
    for done, record in enumerate(todo, start=1):
        sample, source = record.sample_id, source_fingerprint(record)
        images, _ = read_sample_views(record)
        views = [vf.view for vf in record.views]
        if cache is None:  # the file's size is the first estimated sample's (stored images)
            cache = SampleHomographyFile(image_size=(images[0].shape[1], images[0].shape[0]))
        # Same files: keep the pairs already estimated (another graph's), add the missing ones.
        entry = cache.samples.get(sample)
        if entry is None or cache.sources.get(sample, source) != source:
            entry = SampleHomographies(image_size=cache.image_size)
        needed = [(s, d) for s, d in pairs if HomographyCache.pair_key(s, d) not in entry.H]
        named = dict(zip(views, images, strict=True))
        named.update(extra_images or {})
        estimate = estimate_sample_homographies(
            named,
            prior if sample_prior is None else sample_prior(record, named),
            needed,
            timings=timings,
            **estimation_options,
        )
        size = (int(estimate.image_size[0]), int(estimate.image_size[1]))
        what = f"sample {sample!r} of the {split} split"
        for key, H in estimate.H.items():
            entry.H[key] = _to_size(np.asarray(H, dtype=np.float64), size, cache.image_size, what)
            entry.status[key] = estimate.status[key]
        cache.add(sample, entry)
        cache.sources[sample] = source
        now = time.perf_counter()
        due = done % step == 0 or done == len(todo) or now - last_line >= interval
        if progress is not None and due:
            last_line = now
            seconds = (now - start) / done
            eta = format_duration(seconds * (len(todo) - done))
            progress(
                f"{label} ({split}): {done}/{len(todo)} samples, {seconds:.2f} s per sample, "
                f"ETA {eta}"
            )
    cache.prior = fingerprint
    cache.save(path)
    return cache
