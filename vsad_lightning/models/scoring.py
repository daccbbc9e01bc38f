"""Anomaly maps, view scores and sample scores from memory-bank distances.

docs/method.md#scoring:
``s_v(p) = sum_l w_l * Up( min_{m in M^(l)} || F^(l)_v(p) - m ||_2 )``, bilinear upsampling to
image size, then Gaussian smoothing (sigma = 4). View score = max over pixels; sample score =
max over its views. The values are raw distances, not probabilities (docs/evaluation.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d
from torch import Tensor

from vsad_lightning.bank.knn import DEFAULT_MAX_CHUNK_BYTES, KnnBackend
from vsad_lightning.bank.storage import MemoryBank, flatten_features, unflatten_features


@dataclass(frozen=True)
class ScoreOutput:
    """Scores of one batch; every value is a raw distance (never a probability).

    Attributes:
        anomaly_maps: ``(B, V, 1, H, W)`` pixel scores at image resolution.
        view_scores: ``(B, V)`` max of each view's map.
        sample_scores: ``(B,)`` max over the sample's views.
    """

    anomaly_maps: Tensor
    view_scores: Tensor
    sample_scores: Tensor


def gaussian_kernel_size(sigma: float) -> int:
    """``2 * ceil(3 sigma) + 1``: the kernel covers +-3 sigma."""
    return 2 * math.ceil(3 * sigma) + 1


def anomaly_maps(
    level_distances: Mapping[int, Tensor],
    image_size: tuple[int, int],
    weights: Mapping[int, float] | None = None,
    sigma: float = 4.0,
) -> Tensor:
    """Pixel anomaly maps ``(B, V, 1, H, W)`` from per-level distance maps.

    Args:
        level_distances: level -> ``(B, V, h_l, w_l)`` nearest-bank distances.
        image_size: ``(W, H)`` of the images (the order of ``MultiViewBatch.image_size``).
        weights: level -> ``w_l``; ``None`` weights every level 1.0. Every level present in
            ``level_distances`` needs a weight.
        sigma: standard deviation of the Gaussian smoothing in image pixels (kernel size
            ``2 ceil(3 sigma) + 1``, reflected border); 0 disables the smoothing.

    Returns:
        ``(B, V, 1, H, W)`` float32 maps on the distances' device.
    """
    if not level_distances:
        raise ValueError("anomaly_maps needs at least one level of distances")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    width, height = (int(s) for s in image_size)
    shapes = {level: tuple(d.shape) for level, d in level_distances.items()}
    batch_views = {shape[:2] for shape in shapes.values()}
    if any(len(shape) != 4 for shape in shapes.values()) or len(batch_views) != 1:
        raise ValueError(
            f"expected per-level distances (B, V, h_l, w_l) with the same B and V, got {shapes}"
        )
    if weights is not None and (missing := sorted(set(level_distances) - set(weights))):
        raise ValueError(f"no weight for levels {missing}; weights given for {sorted(weights)}")
    batch, views = next(iter(batch_views))

    total: Tensor | None = None
    for level in sorted(level_distances):
        distances = level_distances[level].float()
        h, w = distances.shape[-2:]
        # Bilinear, align_corners=False: pixel centres map to pixel centres, the convention of
        # the whole suite (docs/conventions.md#coordinates: pixel x covers [x, x+1)).
        upsampled = F.interpolate(
            distances.reshape(batch * views, 1, h, w),
            size=(height, width),
            mode="bilinear",
            align_corners=False,
        )
        weight = 1.0 if weights is None else float(weights[level])
        total = weight * upsampled if total is None else total.add_(upsampled, alpha=weight)

    if sigma > 0:
        kernel = gaussian_kernel_size(sigma)
        radius = kernel // 2
        if radius >= min(height, width):
            raise ValueError(
                f"image size (W, H) = {(width, height)} is too small for sigma={sigma}: the "
                f"reflected border needs both sides > {radius} pixels"
            )
        total = gaussian_blur2d(total, (kernel, kernel), (sigma, sigma), border_type="reflect")
    return total.reshape(batch, views, 1, height, width)


def view_scores(maps: Tensor) -> Tensor:
    """``(B, V, 1, H, W)`` maps -> ``(B, V)``: the max over each view's pixels."""
    if maps.dim() != 5:
        raise ValueError(f"expected anomaly maps (B, V, 1, H, W), got {tuple(maps.shape)}")
    return maps.amax(dim=(-3, -2, -1))


def sample_scores(scores: Tensor) -> Tensor:
    """``(B, V)`` view scores -> ``(B,)``: a sample is as anomalous as its worst view."""
    if scores.dim() != 2:
        raise ValueError(f"expected view scores (B, V), got {tuple(scores.shape)}")
    return scores.amax(dim=-1)


@torch.no_grad()
def level_distance_maps(
    bank: MemoryBank,
    features: Mapping[int, Tensor],
    *,
    backend: KnnBackend = "auto",
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    positional_radius: int | None = None,
    exclude: Tensor | None = None,
) -> dict[int, Tensor]:
    """Level -> ``(B, V, h_l, w_l)`` distance of every feature position to the level's bank.

    ``positional_radius`` ``None`` searches the whole bank (the paper's global bank); an integer
    searches only the same view within that many positions (``MemoryBank.positional_distances``).
    ``exclude`` (positional bank only): ``(B,)`` bank sample each query leaves out, -1 for none
    (leave-one-out calibration; a global bank leaves samples out by k-fold sub-banks instead).
    """
    if exclude is not None and positional_radius is None:
        raise ValueError("exclude needs the positional bank (positional_radius); use sub-banks")
    out = {}
    for level, feats in features.items():
        if feats.dim() != 5:
            raise ValueError(
                f"level {level}: expected features (B, V, C, h, w), got {tuple(feats.shape)}"
            )
        if positional_radius is not None:
            out[level] = bank.positional_distances(
                level, feats, positional_radius, max_chunk_bytes=max_chunk_bytes, exclude=exclude
            )
            continue
        batch, views, _, height, width = feats.shape
        distances = bank.distances(
            level, flatten_features(feats), backend=backend, max_chunk_bytes=max_chunk_bytes
        )
        out[level] = unflatten_features(distances, (batch, views, height, width))
    return out


@torch.no_grad()
def score_features(
    bank: MemoryBank,
    features: Mapping[int, Tensor],
    image_size: tuple[int, int],
    weights: Mapping[int, float] | None = None,
    sigma: float = 4.0,
    *,
    backend: KnnBackend = "auto",
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    positional_radius: int | None = None,
) -> ScoreOutput:
    """Score a batch end to end: kNN distances per level -> maps -> view and sample scores.

    Args:
        bank: a built ``MemoryBank`` with a bank for every level in ``features``.
        features: level -> ``(B, V, C_l, h_l, w_l)`` test features.
        image_size: ``(W, H)`` of the images.
        weights, sigma: see ``anomaly_maps``.
        backend, max_chunk_bytes: see ``vsad_lightning.bank.knn.nearest_distance``.
        positional_radius: see ``level_distance_maps``.
    """
    distances = level_distance_maps(
        bank,
        features,
        backend=backend,
        max_chunk_bytes=max_chunk_bytes,
        positional_radius=positional_radius,
    )
    maps = anomaly_maps(distances, image_size, weights=weights, sigma=sigma)
    per_view = view_scores(maps)
    return ScoreOutput(maps, per_view, sample_scores(per_view))
