"""Registration of every sample's views to the category's reference pose (``data.register_views``).

Parts are placed by hand, so between samples the part shifts and turns by a few pixels in every
view; the positional memory bank compares a test view with the normals' features at the same
place, which a few pixels of misplacement ruin on busy textures. Registration maps every
sample's view ``v`` onto the *reference sample*'s view ``v`` with a homography ``R_v``
(pixel-centre convention, at the stored resolution) before anything else sees it
(docs/method.md#registration).

- Reference: the category's first normal training sample in sorted sample-id order
  (``reference_record``); deterministic, and the same for every split. It gets the identity.
- Estimation: ``estimate_sample_homographies`` (``geometry.per_sample``) on the pair
  ``(v, v@ref)`` of each view, with an identity prior (the placement jitter is a few pixels,
  well inside the estimator's gate); a rejected estimate falls back to the prior, the identity,
  and its status says so.
- Cache: one file per split next to the per-sample homographies, written by the same driver
  (``data.sample_homographies.ensure_sample_homographies``) and in the same format
  (``SampleHomographyFile``), pair key ``"C1->C1@ref"`` = the sample's view -> the reference's
  view::

      <root>/vsad_cache/homographies_<category>_<res>_registration_<split>.json

  The identity prior names the reference sample and its files' fingerprint, so the driver's
  prior fingerprint changes, and the file is rebuilt, when the reference does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from vsad_lightning.data.dataset import NORMAL_CLASS, SampleRecord, read_sample_views
from vsad_lightning.data.sample_homographies import (
    _print_progress,
    ensure_sample_homographies,
    source_fingerprint,
)
from vsad_lightning.errors import DataError
from vsad_lightning.geometry.cache import HomographyCache, PairEstimate
from vsad_lightning.geometry.per_sample import SampleHomographyFile

REFERENCE_SUFFIX = "@ref"
"""Appended to a view token to name the reference sample's view in the registration pairs."""


def reference_view(view: str) -> str:
    """The name of the reference sample's ``view`` in registration pairs: ``C1 -> C1@ref``."""
    return f"{view}{REFERENCE_SUFFIX}"


def registration_cache_path(category_cache: str | os.PathLike, split: str) -> Path:
    """The registration file of ``split`` next to the category cache: ``homographies_<category>_
    <res>.json`` -> ``homographies_<category>_<res>_registration_<split>.json``."""
    path = Path(category_cache)
    return path.with_name(f"{path.stem}_registration_{split}.json")


def reference_record(records: Sequence[SampleRecord], category: str) -> SampleRecord:
    """The category's reference sample: the first normal training sample in sorted sample-id
    order."""
    normals = [r for r in records if r.label == 0 and r.anomaly_class == NORMAL_CLASS]
    if not normals:
        raise DataError(
            f"data.register_views: the training split of category {category!r} has no normal "
            "sample to be the reference pose"
        )
    return min(normals, key=lambda r: r.sample_id)


def identity_prior(reference: SampleRecord, image_size: tuple[int, int]) -> HomographyCache:
    """The estimator's prior: identity between every view and the reference's same view.

    Its ``category`` names the reference sample and its files' fingerprint, so the cache's
    prior fingerprint (``data.sample_homographies.prior_fingerprint``) changes with them."""
    eye = np.eye(3).tolist()
    views = [vf.view for vf in reference.views]
    pairs = {}
    for view in views:
        for src, dst in ((view, reference_view(view)), (reference_view(view), view)):
            pairs[HomographyCache.pair_key(src, dst)] = PairEstimate(eye, 0, 1.0, 0.0)
    return HomographyCache(
        category=(
            f"{reference.category} registered to {reference.sample_id} "
            f"({source_fingerprint(reference)})"
        ),
        image_size=tuple(image_size),
        views=views + [reference_view(v) for v in views],
        pairs=pairs,
    )


def ensure_registration(
    records: Sequence[SampleRecord],
    reference: SampleRecord,
    path: str | os.PathLike,
    *,
    split: str,
    write: bool,
    progress: Callable[[str], None] | None = _print_progress,
    timings: dict[str, float] | None = None,
) -> SampleHomographyFile | None:
    """Load the split's registration file, estimating and writing what it lacks.

    The reference sample itself (the same files) is not estimated: it keeps the identity.
    ``None`` when the split holds nothing but the reference. ``write``, ``progress`` and
    ``timings`` are ``ensure_sample_homographies``'.
    """
    reference_paths = [vf.image_path for vf in reference.views]
    others = [r for r in records if [vf.image_path for vf in r.views] != reference_paths]
    if not others:
        return None
    images, _ = read_sample_views(reference)
    size = (images[0].shape[1], images[0].shape[0])
    views = [vf.view for vf in reference.views]
    return ensure_sample_homographies(
        others,
        identity_prior(reference, size),
        [(view, reference_view(view)) for view in views],
        path,
        split=split,
        write=write,
        progress=progress,
        timings=timings,
        extra_images={reference_view(v): image for v, image in zip(views, images, strict=True)},
        label="registration",
    )


def registration_matrices(
    found: SampleHomographyFile | None, sample_id: str, views: Sequence[str]
) -> np.ndarray:
    """``(V, 3, 3)`` float64 ``R_v`` of one sample at the file's ``image_size``: the identity
    for the reference sample (absent from the file) and for any view the file lacks."""
    out = np.tile(np.eye(3), (len(views), 1, 1))
    own = found.matrices(sample_id) if found is not None else {}
    for i, view in enumerate(views):
        H = own.get(HomographyCache.pair_key(view, reference_view(view)))
        if H is not None:
            out[i] = H
    return out
