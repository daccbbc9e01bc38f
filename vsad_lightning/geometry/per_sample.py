"""Per-sample homographies: each sample's view-to-view maps, with the category's as prior.

Parts are placed by hand, so every sample's true homographies differ from the category's by a
few pixels (1-3 px at 256 px on Real-IAD-like rigs). ``estimate_sample_homographies`` estimates
them from the sample's own images, with the category cache as prior and fallback, in three
stages per unordered view pair (one direction is estimated, the reverse is its exact inverse):

1. **matched**: SIFT once per view (:func:`~vsad_lightning.geometry.estimation.detect_features`),
   guided matching (a source keypoint is only compared with target keypoints within
   ``gate_px`` of where the prior sends it, then Lowe's ratio test among those), and one
   MAGSAC++ fit at a small threshold polished by least squares (:func:`fit_matches`).
2. **refined**: a dense Gauss-Newton (Lucas-Kanade) alignment of the two views with the
   efficient second-order (ESM) Jacobian, initialised from stage 1 (or the prior), coarse to
   fine over octaves (:func:`refine_homography`). It compares
   *locally normalised* grayscale (each pixel minus the local mean, divided by the local
   contrast, :func:`structure_image`), which cancels exposure, colour gain, smooth shading
   and the broad part of specular highlights; what survives (clipped highlights, defects,
   occlusions) is down-weighted by Huber weights on the residual. Only pixels where the
   template view has texture and the prior lands inside the target count.
3. **sanity**: a result that moves more than ``max_deviation_px`` from the prior over the
   overlap (mean over a grid), that is not a proper homography, that did not converge, or
   whose photometric agreement is below the other candidates', is discarded; the pair then
   keeps the better (by that agreement) of the matched fit and the prior, and says so in its
   status.

Pairs the category marks unreliable (two side cameras 90 degrees apart, which SIFT rarely
matches) are composed through a bridge view both ends match (:func:`bridge_view`, the top
camera on Real-IAD's rig) from the sample's own estimates, then refined directly; pairs with
no bridge keep the cache's identity, status ``unreliable``.

Measured on the realistic synthetic rig (``benchmarks/homography_accuracy.py``, results in
``benchmarks/results/homography_accuracy.md``): median transfer error against each sample's
true homographies 0.009-0.060 px per category at 256 px, against 0.05-0.64 px for a plain
per-sample SIFT + MAGSAC fit and 1.5-2.2 px for the category's homographies; 0.2-0.4 s of
CPU per sample (8 view pairs, one thread).

Pixel thresholds are given at 256 px and scale with the image (``REFERENCE_SIZE``). Matrices
are in the project's pixel-centre convention; OpenCV's keypoints and warps put centres on
integers and are converted with :func:`~vsad_lightning.geometry.projection.from_opencv_convention`.

Which pairs a sample needs is :func:`graph_pairs`. The per-sample file of a split (written by
``data.sample_homographies.ensure_sample_homographies``, for the datamodule and for
``vsad-homography --per-sample`` alike) is read and written by :class:`SampleHomographyFile`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from vsad_lightning.errors import DataError
from vsad_lightning.geometry.cache import HomographyCache
from vsad_lightning.geometry.estimation import (
    DEFAULT_MAX_KEYPOINTS,
    ImageFeatures,
    detect_features,
    normalise_homography,
    polish_on_inliers,
    project_points,
    to_gray,
)
from vsad_lightning.geometry.projection import neighbour_mask, scale_homography
from vsad_lightning.utils.io import atomic_write_json, read_json

SAMPLE_STATUSES = ("refined", "matched", "prior", "composed", "unreliable")
"""``refined``: photometric refinement converged; ``matched``: the sample's own feature
matches; ``prior``: the category's homography (rescaled) was kept; ``composed``: a pair the
category marks unreliable, composed from the sample's estimates through a bridge view (the
refinement did not confirm it); ``unreliable``: no reliable path, identity (as in the cache)."""

REFERENCE_SIZE = 256
"""Pixel thresholds below are stated at this image size and scale with ``max(W, H)``."""

DEFAULT_GATE_PX = 10.0
"""Guided matching: a target keypoint is a candidate when it lies within this distance of
where the prior sends the source keypoint. A hand placement moves a top-to-side homography by
1-3 px, but a side-to-side pair compounds two such moves: up to 9 px on the realistic
synthetic rig (tissue C2->C3), where a 6 px gate lost the true matches."""

DEFAULT_GUIDED_RATIO = 0.85
"""Lowe's ratio among the gated candidates; looser than the global 0.75 because the gate
already removed almost every distractor."""

DEFAULT_MATCH_THRESHOLD_PX = 1.5
"""MAGSAC++ threshold of the per-sample fit (:func:`fit_matches`)."""

DEFAULT_MIN_MATCHES = 12
"""Inliers below which the matched fit is not used."""

DEFAULT_MAX_DEVIATION_PX = 12.0
"""A per-sample estimate whose mean distance from the prior over the overlap exceeds this is
rejected: a hand-placed part moves the homography by a few pixels (up to 9 px on side-to-side
pairs, see ``DEFAULT_GATE_PX``), a wrong basin or a degenerate fit by more."""

DEFAULT_ITERATIONS = (12, 6)
"""Gauss-Newton iterations per octave, coarsest first (they stop earlier on convergence);
one count per octave, so its length sets the number of octaves."""

NORMALISATION_SIGMA_PX = 4.0
"""Gaussian scale of the local mean and contrast in :func:`structure_image` (at 256 px)."""

_PRESMOOTH_SIGMA = 0.7
"""Gaussian pre-smoothing (pixels of the level) against aliasing in the bilinear warp."""

_CONTRAST_FLOOR = 4.0
"""Grey levels added to the local contrast: flat regions (sensor noise, ~1-2 levels) map to
about zero instead of being amplified into fake texture."""

_TEXTURE_THRESHOLD = 6.0
"""Local contrast (grey levels) above which a template pixel takes part in the refinement."""

_MIN_OCTAVE_SIZE = 64
"""The refinement's coarsest octave is at least this many pixels on its shorter side (at
64 px images: one octave; at 256 px: 128 and 256)."""

_MIN_REFINE_PIXELS = 400
"""Fewer textured overlap pixels than this at the finest octave (a quarter of it per coarser
octave): no refinement."""

_CONVERGED_PX = 0.01
"""A Gauss-Newton step that moves no corner of the overlap more than this (pixels of the
octave) ends the octave."""

_ACCEPT_STEP_PX = 0.05
"""The refinement counts as converged when its last step at the finest octave moved no
corner of the overlap more than this (px)."""

_HUBER_K = 1.345
"""Huber constant in units of the robust residual scale (95 % efficiency on Gaussian noise)."""

_SCORE_TOLERANCE = 0.01
"""The refined fit is kept unless its agreement (ZNCC of the structure images) falls more than
this below the best other candidate's. Its optimum is robust-weighted, so on an exact prior it
scores a hair lower (about 5e-4 at 0.03 px from the truth on the simple synthetic rig); a
wrong basin scores tenths lower."""

_DEVIATION_GRID = 16
"""Grid points per side on which a candidate's deviation from the prior is measured."""


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


# --------------------------------------------------------------------------- conventions


_T = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
_T_INV = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])


def _to_cv(H: np.ndarray) -> np.ndarray:
    """Pixel-centre -> OpenCV convention (centres on integers): ``T^-1 H T``."""
    return _T_INV @ H @ _T


def _from_cv(H_cv: np.ndarray) -> np.ndarray:
    """OpenCV -> pixel-centre convention (``from_opencv_convention`` in numpy)."""
    return normalise_homography(_T @ H_cv @ _T_INV)


def _at_level(H: np.ndarray, level: int) -> np.ndarray:
    """A pixel-centre ``H`` at full size -> OpenCV convention at octave ``level``.

    Octave ``l`` halves the size ``l`` times with area averaging, which is the exact scaling
    ``diag(2^-l, 2^-l, 1)`` of pixel-centre coordinates (``H_l = S H S^-1``)."""
    s = 0.5**level
    S, S_inv = np.diag([s, s, 1.0]), np.diag([1 / s, 1 / s, 1.0])
    return _to_cv(S @ H @ S_inv)


def _from_level(H_cv: np.ndarray, level: int) -> np.ndarray:
    """Inverse of :func:`_at_level`."""
    s = 0.5**level
    S, S_inv = np.diag([s, s, 1.0]), np.diag([1 / s, 1 / s, 1.0])
    return normalise_homography(S_inv @ _from_cv(H_cv) @ S)


# ------------------------------------------------------------------------ per-view data


def structure_image(gray: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Locally normalised grayscale and the local contrast of a ``float32`` image.

    ``(g - G*g) / (sqrt(G*(g - G*g)^2) + floor)`` with ``G`` a Gaussian of ``sigma`` pixels:
    invariant to a gain and offset that vary slowly over the image (exposure, colour balance,
    shading, the broad body of a highlight), unlike raw intensities, which is what a
    photometric alignment across cameras needs. Returns ``(normalised, contrast)``.
    """
    g = cv2.GaussianBlur(gray, (0, 0), _PRESMOOTH_SIGMA)
    centred = g - cv2.GaussianBlur(g, (0, 0), sigma)
    contrast = np.sqrt(np.maximum(cv2.GaussianBlur(centred * centred, (0, 0), sigma), 0.0))
    return (centred / (contrast + _CONTRAST_FLOOR)).astype(np.float32), contrast


@dataclass
class _View:
    """What every pair of one view reuses: SIFT features and the refinement pyramid."""

    features: ImageFeatures | None
    normalised: list[np.ndarray]  # per octave, finest first
    contrast: list[np.ndarray]


def _prepare_view(
    image: np.ndarray, name: str, levels: int, scale: float, *, features: bool, dense: bool
) -> tuple[_View, float, float]:
    """SIFT features and the per-octave structure images; returns the two stages' ms."""
    gray = to_gray(image, name=name)
    start = time.process_time()
    feats = (
        detect_features(gray, max_keypoints=DEFAULT_MAX_KEYPOINTS, name=name) if features else None
    )
    t_features = time.process_time() - start
    start = time.process_time()
    normalised, contrast = [], []
    if dense:
        level_image = gray.astype(np.float32)
        for level in range(levels):
            if level > 0:
                # An odd last row or column is dropped first, so that the octave is the exact
                # scaling diag(1/2, 1/2, 1) of pixel-centre coordinates (``_at_level``).
                h, w = level_image.shape
                level_image = cv2.resize(
                    level_image[: h - h % 2, : w - w % 2],
                    (w // 2, h // 2),
                    interpolation=cv2.INTER_AREA,
                )
            sigma = max(NORMALISATION_SIGMA_PX * scale * 0.5**level, 1.0)
            n, c = structure_image(level_image, sigma)
            normalised.append(n)
            contrast.append(c)
    t_dense = time.process_time() - start
    return _View(feats, normalised, contrast), 1000 * t_features, 1000 * t_dense


# ---------------------------------------------------------------------------- matching


def _pairs_within(
    points: np.ndarray, targets: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """All ``(i, j)`` with ``|points[i] - targets[j]| <= radius``, without the full distance
    matrix (4000 x 4000 keypoints would need 256 MB): targets sorted by ``x``, each point's
    candidates are the ``x`` strip of width ``2 radius`` around it, then filtered."""
    order = np.argsort(targets[:, 0], kind="stable")
    xs = targets[order, 0]
    lo = np.searchsorted(xs, points[:, 0] - radius, side="left")
    hi = np.searchsorted(xs, points[:, 0] + radius, side="right")
    counts = hi - lo
    rows = np.repeat(np.arange(len(points)), counts)
    offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    cols = order[np.repeat(lo, counts) + offsets]
    diff = points[rows] - targets[cols]
    near = np.einsum("ij,ij->i", diff, diff) <= radius * radius
    return rows[near], cols[near]


def guided_matches(
    src: ImageFeatures,
    dst: ImageFeatures,
    H_prior_cv: np.ndarray,
    *,
    gate_px: float,
    ratio: float = DEFAULT_GUIDED_RATIO,
) -> tuple[np.ndarray, np.ndarray]:
    """Matches consistent with the prior: ``(src_points, dst_points)`` in OpenCV convention.

    Each source keypoint is compared only with the target keypoints within ``gate_px`` of its
    image under ``H_prior_cv``; it is matched to the nearest descriptor among them when that is
    closer than ``ratio`` times the second nearest (or is the only candidate). Only gated
    descriptor distances are computed, a few per keypoint instead of all of them.

    The points are in OpenCV's convention (``ImageFeatures.points``), as is ``H_prior_cv``.
    """
    empty = np.zeros((0, 2), dtype=np.float32)
    if len(src) == 0 or len(dst) == 0:
        return empty, empty.copy()
    predicted, w = project_points(H_prior_cv, src.points)
    rows, cols = _pairs_within(predicted, dst.points.astype(np.float64), gate_px)
    keep = w[rows] > 0
    rows, cols = rows[keep], cols[keep]
    if rows.size == 0:
        return empty, empty.copy()
    delta = src.descriptors[rows] - dst.descriptors[cols]
    distance = np.sqrt(np.einsum("ij,ij->i", delta, delta))
    order = np.lexsort((distance, rows))  # by source, then by descriptor distance
    rows, cols, distance = rows[order], cols[order], distance[order]
    first = np.ones(rows.size, dtype=bool)
    first[1:] = rows[1:] != rows[:-1]
    starts = np.nonzero(first)[0]  # each source's nearest candidate
    second = np.full(starts.size, np.inf)  # its second nearest, inf when it has none
    nxt = starts + 1
    has_second = nxt < rows.size
    has_second[has_second] = rows[nxt[has_second]] == rows[starts[has_second]]
    second[has_second] = distance[nxt[has_second]]
    chosen = starts[distance[starts] < ratio * second]
    return src.points[rows[chosen]], dst.points[cols[chosen]]


def fit_matches(
    src_points: np.ndarray, dst_points: np.ndarray, threshold_px: float, min_inliers: int
) -> np.ndarray | None:
    """The homography of prior-consistent matches (OpenCV convention in, pixel-centre out).

    One MAGSAC++ fit at ``threshold_px``, then least squares on the matches within
    ``min(1, threshold_px)`` px until that set is stable (``estimation.polish_on_inliers``).
    The gate has already removed almost every outlier, so the category estimator's threshold ladder
    (``estimation._robust_fit``) buys nothing here: on 48 development pairs (the simple rig
    with tilted part planes) it cost 9x the time for the same accuracy (median 0.16 px both).
    ``None`` below ``min_inliers``.
    """
    if len(src_points) < max(min_inliers, 4):
        return None
    H_cv, _ = cv2.findHomography(
        src_points, dst_points, cv2.USAC_MAGSAC, threshold_px, maxIters=2000, confidence=0.999
    )
    if H_cv is None or H_cv.shape != (3, 3) or not np.all(np.isfinite(H_cv)):
        return None
    polish_px = min(1.0, threshold_px)
    H_cv, support = polish_on_inliers(
        H_cv.astype(np.float64),
        src_points.astype(np.float64),
        dst_points.astype(np.float64),
        polish_px,
    )
    if support < min_inliers or not np.all(np.isfinite(H_cv)):
        return None
    return _from_cv(H_cv)


# --------------------------------------------------------------------------- refinement


def _warp_to_template(target: np.ndarray, H_cv: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``target(H x)`` at every pixel ``x`` of a ``size = (W, H)`` template (OpenCV
    convention, bilinear); NaN where ``H x`` falls outside the target."""
    return cv2.warpPerspective(
        target,
        H_cv,
        size,
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=float("nan"),
    )


def _homography_jacobian(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``dW/dp`` at the identity for ``D = [[1+p0, p1, p2], [p3, 1+p4, p5], [p6, p7, 1]]``."""
    zero, one = np.zeros_like(x), np.ones_like(x)
    jx = np.stack([x, y, one, zero, zero, zero, -x * x, -x * y], axis=1)
    jy = np.stack([zero, zero, zero, x, y, one, -x * y, -y * y], axis=1)
    return jx, jy


def _huber_weights(residual: np.ndarray) -> np.ndarray:
    scale = 1.4826 * float(np.median(np.abs(residual))) + 1e-6
    a = np.abs(residual) / (_HUBER_K * scale)
    return np.where(a <= 1.0, 1.0, 1.0 / np.maximum(a, 1e-12))


def _template_pixels(
    src: _View, dst: _View, level: int, H_prior: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(xs, ys)`` of the template pixels the refinement uses at ``level``: textured in the
    source (local contrast above ``_TEXTURE_THRESHOLD``) and mapped by the prior (pixel-centre,
    full size) at least two pixels inside the target. Fixed from the prior so that every
    candidate of a pair is scored on the same pixels. At the finest octave only every other
    pixel (a checkerboard) is used: neighbouring pixels of a pre-smoothed image carry nearly
    the same information, and on the realistic synthetic rig the result was unchanged (median
    error within 0.001 px on brick, coffee and facade) for a third less refinement time."""
    contrast = src.contrast[level]
    h, w = contrast.shape
    th, tw = dst.contrast[level].shape
    overlap = cv2.warpPerspective(
        np.ones((th, tw), dtype=np.uint8),
        _at_level(H_prior, level),
        (w, h),
        flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    overlap = cv2.erode(overlap, np.ones((5, 5), dtype=np.uint8))
    overlap[:2], overlap[-2:], overlap[:, :2], overlap[:, -2:] = 0, 0, 0, 0
    keep = (overlap > 0) & (contrast > _TEXTURE_THRESHOLD)
    if level == 0:  # every other pixel, as a checkerboard (see the docstring)
        keep[0::2, 1::2] = False
        keep[1::2, 0::2] = False
    ys, xs = np.nonzero(keep)
    return xs, ys


def _agreement(
    src: _View, dst: _View, H: np.ndarray, xs: np.ndarray, ys: np.ndarray, level: int
) -> float:
    """Zero-mean normalised cross-correlation of the structure images at the template pixels
    ``(xs, ys)`` of ``level`` with the target sampled through ``H`` (pixel-centre, full size)."""
    template = src.normalised[level]
    warped = _warp_to_template(dst.normalised[level], _at_level(H, level), template.shape[::-1])
    warped = warped[ys, xs]
    valid = np.isfinite(warped)
    if valid.sum() < 16:
        return -math.inf
    a = template[ys, xs][valid].astype(np.float64)
    b = warped[valid].astype(np.float64)
    a -= a.mean()
    b -= b.mean()
    denominator = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denominator if denominator > 0 else -math.inf


@dataclass
class _Alignment:
    H: np.ndarray  # pixel-centre, full size
    converged: bool


def refine_homography(
    src: _View,
    dst: _View,
    H_init: np.ndarray,
    pixels: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    iterations: Sequence[int] = DEFAULT_ITERATIONS,
    scale: float = 1.0,
) -> _Alignment | None:
    """Dense Gauss-Newton alignment from ``H_init`` (pixel-centre, full size).

    Template: the source view's structure image at the pixels ``pixels[level]`` (see
    :func:`_template_pixels`); the target's structure image is sampled through the current
    homography ``H``. Minimises ``sum_x w(x) (I_dst(H x) - I_src(x))^2`` over the 8
    parameters of a homography update composed on the right (``H <- H D``), in coordinates
    normalised to ``[-1, 1]`` for conditioning, with Huber weights ``w`` refreshed each
    iteration, coarsest octave first. The Jacobian uses the mean of the template's and the
    warped target's gradients (ESM, Benhimane and Malis 2004): the two views see the part
    under different foreshortening, and with the template's gradient alone (inverse
    compositional) the steps shrank by only ~0.6x per iteration on the realistic rig's
    side-to-side pairs, against ~0.3x with ESM. ``iterations[i]`` bounds the iterations of the
    ``i``-th octave from the coarsest; an octave ends when no corner of the overlap moves by
    ``_CONVERGED_PX``. Returns ``None`` when an octave has too few pixels or the system is
    singular; ``converged`` says whether the finest octave's last step was below
    ``_ACCEPT_STEP_PX``. Both are pixels at ``REFERENCE_SIZE``, times ``scale`` (the image's
    size over it): at 800 px (the graffiti pair) the fixed 0.05 px was not reached in the
    iteration budget though the error had halved.
    """
    levels = len(pixels)
    if len(iterations) != levels:
        raise ValueError(f"expected {levels} iteration counts (one per octave), got {iterations}")
    H = normalise_homography(np.asarray(H_init, dtype=np.float64))
    last_step = math.inf
    for level, budget in zip(reversed(range(levels)), iterations, strict=True):
        xs, ys = pixels[level]
        if xs.size < _MIN_REFINE_PIXELS * 0.25**level:
            return None
        template = src.normalised[level]
        target = dst.normalised[level]
        h, w = template.shape
        # Normalised coordinates u = (x - cx) / s, and the steepest-descent images
        # grad(T) . dW/dp (the gradient in normalised units), fixed for the level (IC).
        cx, cy, s = (w - 1) / 2, (h - 1) / 2, max(w, h) / 2
        N = np.array([[1 / s, 0, -cx / s], [0, 1 / s, -cy / s], [0, 0, 1.0]])
        N_inv = np.linalg.inv(N)
        gy, gx = np.gradient(template)
        jx, jy = _homography_jacobian((xs - cx) / s, (ys - cy) / s)
        jx, jy = (jx * s).astype(np.float32), (jy * s).astype(np.float32)
        t_values = template[ys, xs]
        t_gx, t_gy = gx[ys, xs], gy[ys, xs]
        corners = np.array(
            [
                [xs.min(), ys.min()],
                [xs.max(), ys.min()],
                [xs.max(), ys.max()],
                [xs.min(), ys.max()],
            ],
            dtype=np.float64,
        )
        for _ in range(budget):
            H_cv = _at_level(H, level)
            warped = _warp_to_template(target, H_cv, (w, h))
            w_gy, w_gx = np.gradient(warped)
            residual = warped[ys, xs] - t_values
            # ESM: the mean of the template's and the warped target's gradients.
            mean_gx = 0.5 * (t_gx + w_gx[ys, xs])
            mean_gy = 0.5 * (t_gy + w_gy[ys, xs])
            valid = np.isfinite(residual) & np.isfinite(mean_gx) & np.isfinite(mean_gy)
            if valid.sum() < 64:
                return None
            residual[~valid] = 0.0  # with weight 0 below: outside the target
            mean_gx[~valid] = 0.0
            mean_gy[~valid] = 0.0
            weight = np.zeros_like(residual)
            weight[valid] = _huber_weights(residual[valid])
            jacobian = mean_gx[:, None] * jx + mean_gy[:, None] * jy
            weighted = jacobian * weight[:, None]
            hessian = (weighted.T @ jacobian).astype(np.float64)
            gradient = (weighted.T @ residual).astype(np.float64)
            try:
                dp = -np.linalg.solve(hessian, gradient)
            except np.linalg.LinAlgError:
                return None
            D = np.array(
                [[1 + dp[0], dp[1], dp[2]], [dp[3], 1 + dp[4], dp[5]], [dp[6], dp[7], 1.0]]
            )
            # Forward composition in normalised coordinates: H_n <- H_n D.
            step = N_inv @ D @ N
            H = _from_level(H_cv @ step, level)
            if not np.all(np.isfinite(H)):
                return None
            moved, _ = project_points(step, corners)
            last_step = float(np.abs(moved - corners).max())
            if last_step < _CONVERGED_PX * scale:
                break
    # The finest octave's last step bounds the distance to its optimum (the iteration
    # contracts by about 2-3x per step): accept when it is small.
    return _Alignment(H=H, converged=last_step < _ACCEPT_STEP_PX * scale)


# ------------------------------------------------------------------------------ sanity


def deviation_px(H: np.ndarray, H_ref: np.ndarray, image_size: tuple[int, int]) -> float:
    """Mean distance between ``H`` and ``H_ref`` (pixel-centre) over the source points that
    ``H_ref`` maps inside the target; ``inf`` for a non-finite or orientation-flipping ``H``."""
    if not np.all(np.isfinite(H)):
        return math.inf
    W, Hh = image_size
    xs = (np.arange(_DEVIATION_GRID) + 0.5) * W / _DEVIATION_GRID
    ys = (np.arange(_DEVIATION_GRID) + 0.5) * Hh / _DEVIATION_GRID
    grid = np.stack(np.meshgrid(xs, ys, indexing="xy"), axis=-1).reshape(-1, 2)
    ref, w_ref = project_points(H_ref, grid)
    inside = (w_ref > 0) & (ref[:, 0] >= 0) & (ref[:, 0] <= W) & (ref[:, 1] >= 0)
    inside &= ref[:, 1] <= Hh
    if not inside.any():
        return math.inf
    est, w = project_points(H, grid[inside])
    if np.any(w <= 0) or np.linalg.det(H) * np.linalg.det(H_ref) <= 0:
        return math.inf
    return float(np.linalg.norm(est - ref[inside], axis=1).mean())


# ------------------------------------------------------------------------------ the API


@dataclass
class _PairResult:
    H: np.ndarray
    status: str


def _estimate_pair(
    src: _View,
    dst: _View,
    H_prior: np.ndarray,
    image_size: tuple[int, int],
    *,
    scale: float,
    match: bool,
    refine: bool,
    gate_px: float,
    match_threshold_px: float,
    min_matches: int,
    max_deviation_px: float,
    iterations: Sequence[int],
    times: dict[str, float],
    start_from: _PairResult | None = None,
) -> _PairResult:
    """One direction of one pair: matched, then refined, then the sanity checks.

    ``start_from`` replaces the prior as the first candidate (a composed estimate); ``H_prior``
    still sets the deviation check and the compared pixels."""
    max_deviation = max_deviation_px * scale
    candidates = [start_from if start_from is not None else _PairResult(H_prior, "prior")]
    start = time.process_time()
    if match and src.features is not None and dst.features is not None:
        src_pts, dst_pts = guided_matches(
            src.features, dst.features, _to_cv(H_prior), gate_px=gate_px * scale
        )
        H_matched = fit_matches(src_pts, dst_pts, match_threshold_px * scale, min_matches)
        if H_matched is not None and deviation_px(H_matched, H_prior, image_size) <= max_deviation:
            candidates.append(_PairResult(H_matched, "matched"))
    times["match"] += 1000 * (time.process_time() - start)
    if not refine or not src.normalised:
        return candidates[-1]
    start = time.process_time()
    try:
        levels = len(src.normalised)
        pixels = [_template_pixels(src, dst, level, H_prior) for level in range(levels)]
        aligned = refine_homography(
            src,
            dst,
            candidates[-1].H,
            pixels,
            iterations=_budgets(iterations, levels),
            scale=scale,
        )
        xs, ys = pixels[0]
        scores = [_agreement(src, dst, c.H, xs, ys, 0) for c in candidates]
        best = int(np.argmax(scores))  # the prior when nothing can be scored (all -inf)
        if (
            aligned is not None
            and aligned.converged
            and _agreement(src, dst, aligned.H, xs, ys, 0) >= scores[best] - _SCORE_TOLERANCE
            and deviation_px(aligned.H, H_prior, image_size) <= max_deviation
        ):
            return _PairResult(aligned.H, "refined")
        return candidates[best]
    finally:
        times["refine"] += 1000 * (time.process_time() - start)


def bridge_view(prior: HomographyCache, src: str, dst: str, views: Sequence[str]) -> str | None:
    """A view ``b`` of ``views`` with reliable ``src->b`` and ``b->dst`` in ``prior`` (the one
    whose weaker leg has the most inliers), or ``None``.

    Two side cameras 90 degrees apart see the part from viewpoints too different for SIFT to
    match reliably, while both match the top camera: all three see the part's plane, so the
    sample's ``H(b->dst) H(src->b)`` is that pair's homography, up to the two legs' errors,
    and the dense refinement then aligns the pair directly (``composed`` / ``refined``)."""
    best, best_support = None, -1
    for bridge in views:
        if bridge in (src, dst):
            continue
        legs = [prior.pairs[HomographyCache.pair_key(*p)] for p in ((src, bridge), (bridge, dst))]
        if all(leg.status == "ok" for leg in legs):
            support = min(leg.inliers for leg in legs)
            if support > best_support:
                best, best_support = bridge, support
    return best


def graph_pairs(
    prior: HomographyCache,
    views: Sequence[str],
    graph: str = "top_and_ring",
    *,
    bridged: bool = True,
) -> list[tuple[str, str]]:
    """Ordered neighbour pairs of ``graph`` over ``views`` (in this order; ``top_and_ring``
    takes the first view as the top camera) whose homographies a sample needs.

    A pair counts when ``prior`` marks it reliable (``status == "ok"``) in both directions: an
    unreliable pair leaves the neighbour graph in both directions
    (``MultiViewDataModule.neighbour_graph_mask`` is built from ``bridged=False``, and the
    datamodule estimates exactly those pairs). ``bridged=True`` (``vsad-homography
    --per-sample``, ``benchmarks/homography_accuracy.py``) also keeps the unreliable neighbour
    pairs that ``estimate_sample_homographies`` can compose through a bridge view
    (``bridge_view``). Row-major order, so the estimator computes the same direction of each
    view pair whichever caller asks.
    """
    mask = neighbour_mask(graph, len(views))
    reliable = set(prior_pairs(prior, views))
    return [
        (src, dst)
        for i, src in enumerate(views)
        for j, dst in enumerate(views)
        if bool(mask[i, j])
        and (
            ((src, dst) in reliable and (dst, src) in reliable)
            or (bridged and bridge_view(prior, src, dst, views) is not None)
        )
    ]


def _budgets(iterations: Sequence[int], levels: int) -> list[int]:
    """Iteration counts for ``levels`` octaves out of ``iterations`` (coarsest first): the
    finest ``levels`` counts, the coarsest of them raised to ``iterations[0]`` (it starts from
    the initial estimate, as the dropped coarser octaves would have)."""
    kept = [int(n) for n in iterations][len(iterations) - levels :]
    kept[0] = max(kept[0], int(iterations[0]))
    return kept


def estimate_sample_homographies(
    images: Mapping[str, np.ndarray],
    prior: HomographyCache,
    pairs: Sequence[tuple[str, str]] | None = None,
    *,
    match: bool = True,
    refine: bool = True,
    gate_px: float = DEFAULT_GATE_PX,
    match_threshold_px: float = DEFAULT_MATCH_THRESHOLD_PX,
    min_matches: int = DEFAULT_MIN_MATCHES,
    max_deviation_px: float = DEFAULT_MAX_DEVIATION_PX,
    iterations: Sequence[int] = DEFAULT_ITERATIONS,
    timings: dict[str, float] | None = None,
) -> SampleHomographies:
    """Homographies of one sample (see the module docstring for the three stages).

    Args:
        images: view token -> ``(H, W, 3)`` uint8 RGB, all of one size (the stored images).
        prior: the category's cache (any image size with the same aspect ratio; rescaled).
        pairs: ordered ``(src, dst)`` pairs to estimate; default: every pair of ``images``'
            views that is reliable in ``prior`` (``prior_pairs``). Of the two directions of a
            view pair the one listed first (or the only one) is estimated; the other, when
            requested, is its exact inverse.
        match: run stage 1 (guided SIFT matching and the robust fit).
        refine: run stage 2 (the dense photometric refinement).
        gate_px, match_threshold_px, min_matches, max_deviation_px: see the ``DEFAULT_*``
            constants (pixels at ``REFERENCE_SIZE``).
        iterations: Gauss-Newton iterations per octave of the refinement, coarsest first
            (``(12, 6)`` at 256 px: 12 at 128 px, then 6 at 256 px).
        timings: when given, receives the CPU milliseconds spent per stage (``features``,
            ``match``, ``dense_images``, ``refine``, ``total``), added to what it holds.
            Process CPU time, not wall time: the cost on one core when OpenCV and numpy run
            single-threaded (``cv2.setNumThreads(1)``), unaffected by other processes.

    Returns:
        ``SampleHomographies`` at the images' size, one entry per requested pair.
    """
    total_start = time.process_time()
    if not images:
        raise DataError("estimate_sample_homographies: no images given")
    views = list(images)
    first = next(iter(images.values()))
    size = (int(first.shape[1]), int(first.shape[0]))
    for view, image in images.items():
        if not isinstance(image, np.ndarray) or image.shape[:2] != (size[1], size[0]):
            shape = getattr(image, "shape", type(image).__name__)
            raise DataError(
                f"view {view}: expected an image of size W={size[0]}, H={size[1]} like view "
                f"{views[0]}, got {shape}"
            )
    if len(iterations) < 1 or any(int(n) < 1 for n in iterations):
        raise ValueError(f"iterations must be one positive count per octave, got {iterations}")
    # Octaves below _MIN_OCTAVE_SIZE px hold too few pixels to constrain 8 parameters.
    levels = min(len(iterations), 1 + int(math.log2(max(min(size) / _MIN_OCTAVE_SIZE, 1.0))))
    pairs = prior_pairs(prior, views) if pairs is None else list(pairs)
    scale = max(size) / REFERENCE_SIZE
    times = dict.fromkeys(("features", "match", "dense_images", "refine"), 0.0)

    # One direction per unordered pair, the first one requested. Pairs the category marks
    # unreliable are composed through a bridge view (its two legs estimated as well).
    estimated: list[tuple[str, str]] = []
    bridges: dict[tuple[str, str], str | None] = {}
    seen: set[frozenset[str]] = set()
    for src, dst in pairs:
        if frozenset((src, dst)) in seen:
            continue
        seen.add(frozenset((src, dst)))
        estimated.append((src, dst))
        if prior.pairs[HomographyCache.pair_key(src, dst)].status != "ok":
            bridges[(src, dst)] = bridge_view(prior, src, dst, views)
    direct = [p for p in estimated if p not in bridges]
    for (src, dst), bridge in bridges.items():
        for leg in ((src, bridge), (bridge, dst)) if bridge is not None else ():
            if frozenset(leg) not in seen:
                seen.add(frozenset(leg))
                direct.append(leg)
    needed = sorted({v for pair in direct for v in pair}, key=views.index)
    prepared: dict[str, _View] = {}
    for view in needed:
        prepared[view], t_features, t_dense = _prepare_view(
            images[view], f"view {view}", levels, scale, features=match, dense=refine
        )
        times["features"] += t_features
        times["dense_images"] += t_dense

    def prior_at_size(src: str, dst: str) -> np.ndarray:
        H = torch.tensor(prior.pairs[HomographyCache.pair_key(src, dst)].H, dtype=torch.float64)
        return normalise_homography(scale_homography(H, tuple(prior.image_size), size).numpy())

    options = dict(
        scale=scale,
        refine=refine,
        gate_px=gate_px,
        match_threshold_px=match_threshold_px,
        min_matches=min_matches,
        max_deviation_px=max_deviation_px,
        iterations=iterations,
        times=times,
    )
    out = SampleHomographies(image_size=size)

    def store(src: str, dst: str, result: _PairResult) -> None:
        out.H[HomographyCache.pair_key(src, dst)] = result.H
        out.status[HomographyCache.pair_key(src, dst)] = result.status
        out.H[HomographyCache.pair_key(dst, src)] = normalise_homography(np.linalg.inv(result.H))
        out.status[HomographyCache.pair_key(dst, src)] = result.status

    for src, dst in direct:
        H_prior = prior_at_size(src, dst)
        result = _estimate_pair(prepared[src], prepared[dst], H_prior, size, match=match, **options)
        store(src, dst, result)
    for (src, dst), bridge in bridges.items():
        if bridge is None:
            store(src, dst, _PairResult(np.eye(3), "unreliable"))
            continue
        # Plane-induced homographies compose: H(s->d) = H(b->d) H(s->b), for the category's
        # (the prior of the checks) and for the sample's own (the starting point).
        H_prior = normalise_homography(prior_at_size(bridge, dst) @ prior_at_size(src, bridge))
        key_in, key_out = (HomographyCache.pair_key(*p) for p in ((src, bridge), (bridge, dst)))
        composed = _PairResult(normalise_homography(out.H[key_out] @ out.H[key_in]), "composed")
        result = _estimate_pair(
            prepared[src], prepared[dst], H_prior, size, match=False, start_from=composed, **options
        )
        store(src, dst, result)
    requested = [HomographyCache.pair_key(s, d) for s, d in pairs]
    out.H = {k: out.H[k] for k in requested}
    out.status = {k: out.status[k] for k in requested}
    if timings is not None:
        times["total"] = 1000 * (time.process_time() - total_start)
        for name, value in times.items():
            timings[name] = timings.get(name, 0.0) + value
    return out


# ------------------------------------------------------------------------- the JSON file


@dataclass
class SampleHomographyFile:
    """Per-sample homographies of one split: the project's one reader and writer of the format
    (docs/conventions.md, "Per-sample homographies")::

        {"image_size": [W, H],
         "prior": "<fingerprint of the category cache the estimates started from>",
         "sources": {"<sample id>": "<fingerprint of the sample's view files>"},
         "samples": {"<sample id>": {"C1->C2": {"H": [[...], [...], [...]],
                                                 "status": "refined"}, ...}, ...}}

    ``H`` maps pixel-centre coordinates of the source view to the target view at
    ``image_size``; sample ids are ``SampleRecord.sample_id`` (Real-IAD:
    ``<category>_<4 digits>_<OK|NG>``). ``status`` (one of ``SAMPLE_STATUSES``), ``prior`` and
    ``sources`` are optional: the synthetic generator's per-sample truth has no ``status``, and
    a file written by hand with ``image_size`` and ``samples`` only is trusted as it is by
    ``data.sample_homographies.ensure_sample_homographies``, which writes ``prior`` and
    ``sources`` to know when an entry is stale. Read with ``json`` only, written atomically.

    Attributes:
        image_size: ``(W, H)`` every matrix refers to.
        samples: sample id -> its homographies (at ``image_size``).
        prior: fingerprint of the category cache, or ``None``.
        sources: sample id -> fingerprint of its view files (samples without one are trusted).
    """

    image_size: tuple[int, int]
    samples: dict[str, SampleHomographies] = field(default_factory=dict)
    prior: str | None = None
    sources: dict[str, str] = field(default_factory=dict)

    def add(self, sample_id: str, homographies: SampleHomographies) -> None:
        """Store one sample's estimate (its ``image_size`` must be the file's)."""
        if tuple(homographies.image_size) != tuple(self.image_size):
            raise ValueError(
                f"sample {sample_id!r}: homographies at {homographies.image_size}, but the file "
                f"holds {self.image_size}"
            )
        self.samples[sample_id] = homographies

    def get(self, sample_id: str, source: str = "per-sample homography file") -> SampleHomographies:
        """One sample's homographies; a ``DataError`` naming ``source`` when it is absent."""
        found = self.samples.get(sample_id)
        if found is None:
            raise DataError(
                f"{source} has no homographies for sample {sample_id!r} ({len(self.samples)} "
                "samples in it); rebuild it with vsad-homography --per-sample"
            )
        return found

    def matrices(self, sample_id: str) -> dict[str, np.ndarray]:
        """Pair key -> ``H`` at ``image_size`` for one sample (empty when absent)."""
        found = self.samples.get(sample_id)
        return dict(found.H) if found is not None else {}

    def status_counts(self) -> dict[str, int]:
        """Pairs per status over every sample (pairs without a status are not counted)."""
        counts: dict[str, int] = {}
        for sample in self.samples.values():
            for status in sample.status.values():
                counts[status] = counts.get(status, 0) + 1
        return counts

    def to_json(self) -> dict:
        samples = {}
        for sample_id, sample in self.samples.items():
            entry = {}
            for key, H in sample.H.items():
                pair = {"H": [[float(x) for x in row] for row in np.asarray(H)]}
                if key in sample.status:
                    pair["status"] = sample.status[key]
                entry[key] = pair
            samples[sample_id] = entry
        out: dict = {"image_size": [int(self.image_size[0]), int(self.image_size[1])]}
        if self.prior is not None:
            out["prior"] = self.prior
        if self.sources:
            out["sources"] = dict(self.sources)
        out["samples"] = samples
        return out

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def from_json(cls, obj: object, source: str = "<memory>") -> SampleHomographyFile:
        """Validate and parse; every problem is one ``DataError`` line naming ``source`` (and
        the sample and pair where it is one of theirs)."""

        def fail(what: str) -> DataError:
            return DataError(f"per-sample homography file {source}: {what}")

        if not isinstance(obj, dict):
            raise fail("expected a JSON object at the top level")
        for key in ("image_size", "samples"):
            if key not in obj:
                raise fail(f"missing key {key!r}")
        size = obj["image_size"]
        if not (
            isinstance(size, list)
            and len(size) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
        ):
            raise fail(f"'image_size' must be [W, H] positive integers, got {size!r}")
        prior = obj.get("prior")
        if prior is not None and not isinstance(prior, str):
            raise fail(f"'prior' must be a string, got {prior!r}")
        sources = obj.get("sources", {})
        if not isinstance(sources, dict) or not all(isinstance(v, str) for v in sources.values()):
            raise fail("'sources' must be an object mapping sample ids to strings")
        if not isinstance(obj["samples"], dict):
            raise fail("'samples' must be an object mapping sample ids to their pairs")
        out = cls(image_size=(size[0], size[1]), prior=prior, sources=dict(sources))
        for sample_id, pairs in obj["samples"].items():
            if not isinstance(pairs, dict):
                raise fail(f"sample {sample_id!r}: expected an object of pairs, got {pairs!r}")
            sample = SampleHomographies(image_size=out.image_size)
            for key, raw in pairs.items():
                where = f"sample {sample_id!r} pair {key!r}"
                views = key.split("->") if isinstance(key, str) else []
                if len(views) != 2 or not all(views) or views[0] == views[1]:
                    raise fail(f"{where}: the key must be '<src>-><dst>' of two distinct views")
                if not isinstance(raw, dict) or "H" not in raw:
                    raise fail(f"{where}: expected an object with 'H', got {raw!r}")
                try:
                    H = np.array(raw["H"], dtype=np.float64)
                except (TypeError, ValueError) as e:
                    raise fail(f"{where}: 'H' is not a 3x3 matrix of numbers ({e})") from e
                if H.shape != (3, 3):
                    raise fail(f"{where}: 'H' must be 3x3, got shape {H.shape}")
                if not np.all(np.isfinite(H)):
                    raise fail(f"{where}: 'H' contains NaN or inf")
                det = float(np.linalg.det(H))
                if not math.isfinite(det) or abs(det) < 1e-12:
                    raise fail(f"{where}: 'H' is singular (det={det:.3g})")
                sample.H[key] = H
                if "status" in raw:
                    if raw["status"] not in SAMPLE_STATUSES:
                        raise fail(
                            f"{where}: status {raw['status']!r} not in {list(SAMPLE_STATUSES)}"
                        )
                    sample.status[key] = raw["status"]
            out.samples[str(sample_id)] = sample
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> SampleHomographyFile:
        return cls.from_json(read_json(path, "per-sample homography file"), source=str(path))
