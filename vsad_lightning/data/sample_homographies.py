"""Per-sample homographies of one split, estimated once and cached next to the category cache.

Parts are placed by hand, so each sample's true homographies differ from the category's by a
few pixels (``geometry.per_sample``). ``ensure_sample_homographies`` estimates every sample of a
split from its own stored images with ``estimate_sample_homographies`` (the category cache as
prior), for the given pairs only, and keeps the results in one JSON file per split::

    <root>/vsad_cache/homographies_<category>_<res>_samples_<split>.json

    {"image_size": [W, H],
     "prior": "<fingerprint of the category cache the estimates started from>",
     "sources": {"<sample id>": "<fingerprint of the sample's view files>"},
     "samples": {"<sample id>": {"C1->C2": {"H": [[...], [...], [...]], "status": "..."}}}}

``H`` maps pixel-centre coordinates of the source view to the target view at ``image_size``
(the stored images' size). The file is written atomically and read with ``json`` only.

Reuse: an entry is re-estimated only when its sample is new, lacks a requested pair, or its
view files changed (``sources``: file names and byte sizes); a rebuilt category cache
(``prior``) invalidates the whole file. ``prior`` and ``sources`` are optional: a file written
by hand without them (``image_size`` and ``samples`` only) is trusted as it is.
``SampleHomographyFile`` is this package's only reader and writer of the format.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vsad_lightning.data.dataset import SampleRecord, read_sample_views
from vsad_lightning.data.transforms import ASPECT_TOLERANCE
from vsad_lightning.errors import DataError
from vsad_lightning.geometry.cache import HomographyCache
from vsad_lightning.geometry.per_sample import estimate_sample_homographies
from vsad_lightning.geometry.projection import scale_homography
from vsad_lightning.utils.io import atomic_write_json

PairEntry = tuple[np.ndarray, str]
"""One pair of one sample: ``(3, 3)`` float64 ``H`` and its status."""


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


@dataclass
class SampleHomographyFile:
    """The per-sample homographies of one split (the format in the module docstring)."""

    image_size: tuple[int, int]
    prior: str | None = None
    sources: dict[str, str] = field(default_factory=dict)
    samples: dict[str, dict[str, PairEntry]] = field(default_factory=dict)

    def to_json(self) -> dict:
        out: dict = {"image_size": [int(self.image_size[0]), int(self.image_size[1])]}
        if self.prior is not None:
            out["prior"] = self.prior
        return {
            **out,
            "sources": dict(self.sources),
            "samples": {
                sample: {
                    key: {"H": [[float(x) for x in row] for row in H], "status": status}
                    for key, (H, status) in pairs.items()
                }
                for sample, pairs in self.samples.items()
            },
        }

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def from_json(cls, obj: object, source: str = "<memory>") -> SampleHomographyFile:
        """Validate and parse; every problem is one ``DataError`` naming ``source``."""

        def fail(what: str) -> DataError:
            return DataError(
                f"per-sample homography cache {source}: {what} (delete the file to re-estimate)"
            )

        if not isinstance(obj, dict):
            raise fail("expected a JSON object at the top level")
        for key in ("image_size", "samples"):
            if key not in obj:
                raise fail(f"missing key {key!r}")
        size = obj["image_size"]
        if not (
            isinstance(size, list)
            and len(size) == 2
            and all(isinstance(s, int) and s > 0 for s in size)
        ):
            raise fail(f"'image_size' must be [W, H] positive integers, got {size!r}")
        sources = obj.get("sources", {})
        if not isinstance(sources, dict):
            raise fail("'sources' must be an object")
        if not isinstance(obj["samples"], dict):
            raise fail("'samples' must be an object of sample id -> pairs")
        samples: dict[str, dict[str, PairEntry]] = {}
        for sample, pairs in obj["samples"].items():
            if not isinstance(pairs, dict):
                raise fail(f"sample {sample!r}: expected an object of pair -> {{H, status}}")
            parsed: dict[str, PairEntry] = {}
            for key, raw in pairs.items():
                try:
                    H = np.asarray(raw["H"], dtype=np.float64)
                    status = str(raw["status"])
                except (KeyError, TypeError, ValueError) as e:
                    raise fail(f"sample {sample!r} pair {key!r} is malformed ({e!r})") from e
                if H.shape != (3, 3):
                    raise fail(f"sample {sample!r} pair {key!r}: 'H' must be 3x3")
                if not np.isfinite(H).all() or abs(np.linalg.det(H)) < 1e-12:
                    raise fail(f"sample {sample!r} pair {key!r}: 'H' is not finite or singular")
                parsed[key] = (H, status)
            samples[str(sample)] = parsed
        return cls(
            image_size=(size[0], size[1]),
            prior=None if obj.get("prior") is None else str(obj["prior"]),
            sources={str(k): str(v) for k, v in sources.items()},
            samples=samples,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> SampleHomographyFile:
        path = Path(path)
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise DataError(f"per-sample homography cache {path} does not exist") from e
        except json.JSONDecodeError as e:
            raise DataError(
                f"per-sample homography cache {path} is not valid JSON ({e}); delete it to "
                "re-estimate"
            ) from e
        return cls.from_json(obj, source=str(path))

    def matrices(self, sample: str) -> dict[str, np.ndarray]:
        """Pair key -> ``H`` at ``image_size`` for one sample (empty when absent)."""
        return {key: H for key, (H, _) in self.samples.get(sample, {}).items()}

    def status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for pairs in self.samples.values():
            for _, status in pairs.values():
                counts[status] = counts.get(status, 0) + 1
        return counts


def _to_size(H: np.ndarray, size: tuple[int, int], to: tuple[int, int], what: str) -> np.ndarray:
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
            or any(k not in entry for k in keys)
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
    progress: Callable[[str], None] | None = _print_progress,
) -> SampleHomographyFile:
    """Load the split's per-sample file, estimating and writing what it lacks.

    Args:
        records: the split's samples.
        prior: the category cache (prior and fallback of the estimator).
        pairs: ordered ``(src, dst)`` view pairs to estimate (the reduced neighbour graph's).
        path: the per-sample file (``sample_cache_path``).
        split: names the split in progress lines and errors.
        write: estimate and write missing entries. ``False`` (every DDP process's ``setup``
            under a Trainer) only reads: a missing entry is a ``DataError``, since
            ``prepare_data`` must have written it.
        progress: receives progress lines (samples done / total, seconds per sample).
    """
    path = Path(path)
    cache = SampleHomographyFile.load(path) if path.is_file() else None
    todo = missing_samples(cache, records, pairs, prior)
    if not todo:
        return cache
    if not write:
        raise DataError(
            f"per-sample homography cache {path} lacks {len(todo)} of the {len(records)} "
            f"samples of the {split} split (e.g. {todo[0].sample_id!r}); the datamodule's "
            "prepare_data estimates them before setup"
        )
    fingerprint = prior_fingerprint(prior)
    if cache is None or cache.prior not in (None, fingerprint):
        cache = SampleHomographyFile(image_size=(0, 0))
    cache.prior = fingerprint
    step = max(1, math.ceil(len(todo) / 10))
    start = time.perf_counter()
    for done, record in enumerate(todo, start=1):
        sample, source = record.sample_id, source_fingerprint(record)
        # Same files: keep the pairs already estimated (another graph's), add the missing ones.
        entry = cache.samples.get(sample, {}) if cache.sources.get(sample, source) == source else {}
        needed = [(s, d) for s, d in pairs if HomographyCache.pair_key(s, d) not in entry]
        images, _ = read_sample_views(record)
        views = [vf.view for vf in record.views]
        estimate = estimate_sample_homographies(
            dict(zip(views, images, strict=True)), prior, needed
        )
        size = (int(estimate.image_size[0]), int(estimate.image_size[1]))
        if cache.image_size == (0, 0):
            cache.image_size = size
        what = f"sample {sample!r} of the {split} split"
        for key, H in estimate.H.items():
            H = _to_size(np.asarray(H, dtype=np.float64), size, cache.image_size, what)
            entry[key] = (H, estimate.status[key])
        cache.samples[sample] = entry
        cache.sources[sample] = source
        if progress is not None and (done % step == 0 or done == len(todo)):
            seconds = (time.perf_counter() - start) / done
            progress(
                f"per-sample homographies ({split}): {done}/{len(todo)} samples, "
                f"{seconds:.2f} s per sample"
            )
    cache.save(path)
    return cache
