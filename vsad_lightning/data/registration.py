"""Registration of every sample's views to the category's reference pose (``data.register_views``).

Parts are placed by hand, so between samples the part shifts and turns by a few pixels in every
view; the positional memory bank compares a test view with the normals' features at the same
place, which a few pixels of misplacement ruin on busy textures. Registration maps every
sample's view ``v`` onto the *reference sample*'s view ``v`` with a homography ``R_v``
(pixel-centre convention, at the stored resolution) before anything else sees it
(docs/method.md#registration).

- Reference: the category's first normal training sample in sorted sample-id order
  (``reference_record``); deterministic, and the same for every split. It gets the identity.
- Estimation, in two steps per sample:

  1. **Placement** (``placement_prior``): the part's move between the sample and the
     reference is found once, in the anchor view that sees the whole part (the first view, C1
     on Real-IAD's rig), by an unguided SIFT + MAGSAC fit of ``anchor -> anchor@ref``
     (``geometry.estimation``). A hand placement shifts the part by up to ~7 px and turns it
     by up to 4 deg, so two samples differ by up to ~15 px at the part's corners: beyond the
     per-sample estimator's gate (10 px), where an identity prior lost about a fifth of the
     views on repetitive textures (brick: 44 of 195 training views kept the identity).
     The move of the part in its own plane is the same for every camera, so each other view's
     prior follows through the category's homographies:
     ``R_v = H_{anchor->v} R_anchor H_{v->anchor}`` (exact for a shift and a turn on the
     table; a tilt or a height change leaves the pixel or two the next step removes).
  2. **Refinement**: ``estimate_sample_homographies`` (``geometry.per_sample``) on the pair
     ``(v, v@ref)`` of each view from that prior (guided matching, dense refinement, sanity
     checks); a rejected estimate falls back to the prior, and its status says so.

  Without a category cache (or when the anchor fit fails) the prior is the identity.
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from vsad_lightning.data.dataset import NORMAL_CLASS, SampleRecord, read_sample_views
from vsad_lightning.data.sample_homographies import (
    _print_progress,
    ensure_sample_homographies,
    prior_fingerprint,
    source_fingerprint,
)
from vsad_lightning.errors import DataError
from vsad_lightning.geometry.cache import HomographyCache, PairEstimate
from vsad_lightning.geometry.estimation import (
    detect_features,
    estimate_pair_from_features,
    normalise_homography,
)
from vsad_lightning.geometry.per_sample import SampleHomographyFile
from vsad_lightning.geometry.projection import scale_homography

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


def registration_pairs(
    views: Sequence[str], matrices: Mapping[str, np.ndarray]
) -> dict[str, PairEstimate]:
    """The prior's pairs ``v -> v@ref`` (``matrices[v]``, default the identity) and their
    inverses ``v@ref -> v``."""
    pairs = {}
    for view in views:
        R = np.asarray(matrices.get(view, np.eye(3)), dtype=np.float64)
        back = normalise_homography(np.linalg.inv(R))
        pairs[HomographyCache.pair_key(view, reference_view(view))] = PairEstimate(
            R.tolist(), 0, 1.0, 0.0
        )
        pairs[HomographyCache.pair_key(reference_view(view), view)] = PairEstimate(
            back.tolist(), 0, 1.0, 0.0
        )
    return pairs


def identity_prior(
    reference: SampleRecord,
    image_size: tuple[int, int],
    category: HomographyCache | None = None,
) -> HomographyCache:
    """The estimator's prior: identity between every view and the reference's same view
    (``PlacementPrior`` replaces the matrices per sample).

    Its ``category`` names the reference sample and its files' fingerprint, and the category
    cache the placement prior propagates through, so the file's prior fingerprint
    (``data.sample_homographies.prior_fingerprint``) changes with any of them."""
    views = [vf.view for vf in reference.views]
    pairs = registration_pairs(views, {})
    through = "" if category is None else f" via {prior_fingerprint(category)}"
    return HomographyCache(
        category=(
            f"{reference.category} registered to {reference.sample_id} "
            f"({source_fingerprint(reference)}){through}"
        ),
        image_size=tuple(image_size),
        views=views + [reference_view(v) for v in views],
        pairs=pairs,
    )


def anchor_view(category: HomographyCache, views: Sequence[str]) -> str | None:
    """The view the placement is measured in: the first of ``views`` with a reliable pair to
    every other view in the category cache (C1, the top camera, on Real-IAD's rig)."""
    for anchor in views:
        if all(
            category.pairs.get(HomographyCache.pair_key(anchor, v)) is not None
            and category.pairs[HomographyCache.pair_key(anchor, v)].status == "ok"
            for v in views
            if v != anchor
        ):
            return anchor
    return None


class PlacementPrior:
    """Each sample's registration prior from the part's placement (the module docstring, step 1).

    Args:
        reference_images: view token -> the reference sample's ``(H, W, 3)`` uint8 view.
        category: the category cache: the view-to-view homographies the anchor's placement is
            carried through (rescaled to the images' size).
        base: the identity prior (``identity_prior``): its name and pairs are kept, its
            matrices replaced per sample.
    """

    def __init__(
        self,
        reference_images: Mapping[str, np.ndarray],
        category: HomographyCache,
        base: HomographyCache,
    ) -> None:
        views = list(reference_images)
        self.anchor = anchor_view(category, views)
        self.base = base
        self.to_view: dict[str, np.ndarray] = {}
        self.from_view: dict[str, np.ndarray] = {}
        self.reference_features = None
        if self.anchor is None:  # no view reaches every other: identity priors
            return
        first = reference_images[views[0]]
        size = (int(first.shape[1]), int(first.shape[0]))
        H = category.matrices(views).to(torch.float64)
        H = scale_homography(H, tuple(category.image_size), size).numpy()
        a = views.index(self.anchor)
        self.to_view = {v: H[a, i] for i, v in enumerate(views)}
        self.from_view = {v: H[i, a] for i, v in enumerate(views)}
        self.reference_features = detect_features(reference_images[self.anchor], max_keypoints=None)

    def matrices(self, images: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """view -> prior ``R_v`` of one sample (its views by token); ``None`` when the anchor's
        fit fails (the identity prior then stands)."""
        if self.anchor is None:
            return None
        own = detect_features(images[self.anchor], max_keypoints=None)
        fit = estimate_pair_from_features([own], [self.reference_features])
        if fit.status != "ok":
            return None
        R_anchor = np.asarray(fit.H, dtype=np.float64)
        return {
            v: normalise_homography(self.to_view[v] @ R_anchor @ self.from_view[v])
            for v in self.to_view
        }

    def __call__(self, record: SampleRecord, images: Mapping[str, np.ndarray]) -> HomographyCache:
        matrices = self.matrices(images)
        if matrices is None:
            return self.base
        return replace(
            self.base, pairs={**self.base.pairs, **registration_pairs(list(matrices), matrices)}
        )


def ensure_registration(
    records: Sequence[SampleRecord],
    reference: SampleRecord,
    path: str | os.PathLike,
    *,
    split: str,
    write: bool,
    category: HomographyCache | None = None,
    progress: Callable[[str], None] | None = _print_progress,
    timings: dict[str, float] | None = None,
) -> SampleHomographyFile | None:
    """Load the split's registration file, estimating and writing what it lacks.

    The reference sample itself (the same files) is not estimated: it keeps the identity.
    ``None`` when the split holds nothing but the reference. ``category``: the category cache
    the placement prior is carried through (``PlacementPrior``); ``None``: identity priors.
    ``write``, ``progress`` and ``timings`` are ``ensure_sample_homographies``'.
    """
    reference_paths = [vf.image_path for vf in reference.views]
    others = [r for r in records if [vf.image_path for vf in r.views] != reference_paths]
    if not others:
        return None
    images, _ = read_sample_views(reference)
    size = (images[0].shape[1], images[0].shape[0])
    views = [vf.view for vf in reference.views]
    base = identity_prior(reference, size, category)
    named = dict(zip(views, images, strict=True))
    sample_prior = None if category is None else PlacementPrior(named, category, base)
    return ensure_sample_homographies(
        others,
        base,
        [(view, reference_view(view)) for view in views],
        path,
        split=split,
        write=write,
        progress=progress,
        timings=timings,
        extra_images={reference_view(v): image for v, image in named.items()},
        label="registration",
        sample_prior=sample_prior,
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
