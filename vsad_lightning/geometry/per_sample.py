"""Per-sample homographies: each sample's view-to-view maps, with the category's as prior.

Parts are placed by hand, so every sample's true homographies differ from the category's by a
few pixels. ``estimate_sample_homographies`` estimates them from the sample's own images, with
the category cache as prior and fallback.

This module states the contract; the estimator itself lands in a later change (until then it
returns the prior, rescaled to the sample's image size, with status ``"prior"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from vsad_lightning.geometry.cache import HomographyCache
from vsad_lightning.geometry.projection import scale_homography

SAMPLE_STATUSES = ("refined", "matched", "prior")
"""``refined``: photometric refinement converged; ``matched``: the sample's own feature
matches; ``prior``: the category's homography (rescaled) was kept."""


@dataclass
class SampleHomographies:
    """One sample's estimated homographies.

    Attributes:
        image_size: ``(W, H)`` the matrices refer to (pixel-centre convention).
        H: pair key ``"C1->C2"`` -> ``(3, 3)`` float64, mapping the source view to the target.
        status: pair key -> one of ``SAMPLE_STATUSES``.
    """

    image_size: tuple[int, int]
    H: dict[str, np.ndarray] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)


def prior_pairs(prior: HomographyCache, views: Sequence[str]) -> list[tuple[str, str]]:
    """Ordered pairs of ``views`` whose category homography is reliable (``status == "ok"``)."""
    return [
        (src, dst)
        for src in views
        for dst in views
        if src != dst and prior.pairs[HomographyCache.pair_key(src, dst)].status == "ok"
    ]


def estimate_sample_homographies(
    images: Mapping[str, np.ndarray],
    prior: HomographyCache,
    pairs: Sequence[tuple[str, str]] | None = None,
) -> SampleHomographies:
    """Homographies of one sample.

    Args:
        images: view token -> ``(H, W, 3)`` uint8 RGB, all of one size (the stored images).
        prior: the category's cache (any image size with the same aspect ratio; rescaled).
        pairs: ordered ``(src, dst)`` pairs to estimate; default: every pair of ``images``'
            views that is reliable in ``prior`` (``prior_pairs``).

    Returns:
        ``SampleHomographies`` at the images' size, one entry per requested pair.
    """
    views = list(images)
    first = next(iter(images.values()))
    size = (int(first.shape[1]), int(first.shape[0]))
    pairs = prior_pairs(prior, views) if pairs is None else list(pairs)
    out = SampleHomographies(image_size=size)
    for src, dst in pairs:
        key = HomographyCache.pair_key(src, dst)
        H = torch.tensor(prior.pairs[key].H, dtype=torch.float64)
        out.H[key] = scale_homography(H, tuple(prior.image_size), size).numpy()
        out.status[key] = "prior"
    return out
