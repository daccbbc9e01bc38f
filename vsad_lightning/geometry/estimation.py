"""Homography estimation between camera views (DESIGN.md, Homographies).

For an ordered pair of views ``(v, u)`` and ``K`` normal training samples (the same physical
object seen by both cameras):

1. SIFT keypoints and descriptors on every image (OpenCV), detected once per image and reused
   by every pair the view takes part in (:func:`detect_features`). SIFT runs with
   ``enable_precise_upscale``: OpenCV's default upscaling of the first octave shifts keypoints
   by a quarter pixel (OpenCV's documented "localization bias"), which the half-pixel
   convention change below would not account for.
2. Lowe's ratio test on the two nearest neighbours of each descriptor of view ``v`` in view
   ``u`` (per sample: the object may move between samples, the rig does not).
3. The matches of the ``K`` samples are pooled, and one robust fit on the pooled matches
   estimates the rig's homography: ``cv2.findHomography(src, dst, cv2.USAC_MAGSAC, ...)``,
   proposed at a short ladder of thresholds and polished by least squares on a tight
   consensus (``refine_threshold_px``); the candidate with the largest tight consensus wins.
   This lands on the dominant surface where one loose fit compromises between two (see
   ``_robust_fit`` for the measurements behind this choice).
4. Evidence: inliers (pooled matches whose reprojection error under the fit is below
   ``ransac_threshold_px``), inlier ratio, median reprojection error over the inliers. Below
   ``min_inliers``, or when the fit fails or is degenerate, the pair is ``unreliable`` and
   stores the identity; a run removes it from the neighbour graph
   (``MultiViewDataModule.neighbour_graph_mask``), so the stored matrix is never used.

OpenCV's keypoints put pixel centres on integers; the stored ``H`` is converted to the
project's pixel-centre convention (centre of pixel ``i`` at ``i + 0.5``) with
:func:`from_opencv_convention`. Reprojection errors are distances, identical in both
conventions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import cv2
import numpy as np
import torch

from vsad_lightning.errors import DataError
from vsad_lightning.geometry.cache import HomographyCache, PairEstimate
from vsad_lightning.geometry.projection import from_opencv_convention

DEFAULT_RATIO = 0.75
"""Lowe's ratio test threshold (nearest / second nearest descriptor distance)."""

DEFAULT_RANSAC_THRESHOLD_PX = 3.0
"""MAGSAC++ maximum threshold, and the reprojection error below which a match is an inlier."""

DEFAULT_REFINE_THRESHOLD_PX = 1.0
"""Tight consensus used to polish the robust fits and to choose among them (``_robust_fit``)."""

_THRESHOLD_LADDER = (1.0, 1 / 2, 1 / 3, 1 / 4)
"""Fractions of ``ransac_threshold_px`` at which MAGSAC++ proposes candidates (``_robust_fit``)."""

_MATCH_BLOCK = 2048
"""Source descriptors per distance-matrix block in ``match_features`` (32 MB at 4000 targets)."""

_POLISH_ITERATIONS = 20
"""Upper bound on least-squares polishing rounds; the support is usually stable after 5-15."""

DEFAULT_MIN_INLIERS = 30
"""Pooled inliers below which a pair is ``unreliable``. Unrelated images pooled over three
samples give fewer than ten MAGSAC inliers (chance matches); overlapping views give hundreds."""

DEFAULT_MAX_KEYPOINTS = 4000
"""SIFT keeps the strongest responses: bounds the cost of matching large (1024 px) images."""

DEFAULT_CONSISTENCY_TOLERANCE_PX = 3.0
"""Largest mean disagreement between ``H(v->u)`` and ``inv(H(u->v))`` over the overlap."""

MAX_AREA_CHANGE = 100.0
"""A fit that changes local area by more than this factor at an inlier is degenerate (two
cameras of one rig imaging one object at one resolution never do); such fits collapse many
points onto a few and can gather chance inliers."""

_CONSISTENCY_GRID = 32
"""Grid points per image side at which inverse consistency is measured."""


@dataclass(frozen=True)
class ImageFeatures:
    """SIFT keypoints of one image, computed once and shared by every pair of its view.

    Attributes:
        points: ``(N, 2)`` float32 keypoint positions ``(x, y)`` in OpenCV's convention (pixel
            centres on integers), as ``cv2.findHomography`` expects them.
        descriptors: ``(N, 128)`` float32 SIFT descriptors.
        image_size: ``(W, H)`` of the image.
    """

    points: np.ndarray
    descriptors: np.ndarray
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.points.shape[0])


def to_gray(image: np.ndarray, *, name: str = "image") -> np.ndarray:
    """The ``uint8`` grayscale version of an ``(H, W)`` or ``(H, W, 1|3|4)`` image.

    Colour images are converted with the standard luma weights in RGB order. The channel order
    changes the grey levels only slightly and identically for every view, which SIFT tolerates.
    """
    if not isinstance(image, np.ndarray):
        raise DataError(f"{name}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise DataError(f"{name}: expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] == 1:
        return image[..., 0]
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_RGBA2GRAY)
    raise DataError(
        f"{name}: expected an image of shape (H, W) or (H, W, 1|3|4), got {tuple(image.shape)}"
    )


def detect_features(
    image: np.ndarray,
    *,
    max_keypoints: int | None = DEFAULT_MAX_KEYPOINTS,
    name: str = "image",
) -> ImageFeatures:
    """SIFT keypoints and descriptors of one ``uint8`` image (grayscale or colour).

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` uint8.
        max_keypoints: keep at most this many keypoints (the strongest); ``None`` keeps all.
        name: how error messages refer to the image (e.g. ``"sample 3, view C2"``).
    """
    gray = to_gray(image, name=name)
    if max_keypoints is not None and max_keypoints < 1:
        raise ValueError(f"max_keypoints must be positive or None, got {max_keypoints}")
    sift = cv2.SIFT_create(
        nfeatures=0 if max_keypoints is None else int(max_keypoints), enable_precise_upscale=True
    )
    keypoints, descriptors = sift.detectAndCompute(gray, None)
    if descriptors is None or len(keypoints) == 0:
        points = np.zeros((0, 2), dtype=np.float32)
        descriptors = np.zeros((0, 128), dtype=np.float32)
    else:
        points = cv2.KeyPoint_convert(keypoints).astype(np.float32).reshape(-1, 2)
        descriptors = descriptors.astype(np.float32)
    return ImageFeatures(
        points=points, descriptors=descriptors, image_size=(gray.shape[1], gray.shape[0])
    )


def match_features(
    src: ImageFeatures, dst: ImageFeatures, *, ratio: float = DEFAULT_RATIO
) -> tuple[np.ndarray, np.ndarray]:
    """Lowe ratio-test matches from ``src`` to ``dst``: ``(src_points, dst_points)``, ``(M, 2)``.

    Exact brute-force L2 matching: the two nearest descriptors of ``dst`` for every descriptor
    of ``src``, from one matrix product per block of ``_MATCH_BLOCK`` source descriptors (the
    same result as ``cv2.BFMatcher.knnMatch(k=2)``, about ten times faster here, with memory
    bounded by the block). A match is kept when its nearest neighbour is closer than ``ratio``
    times the second nearest.
    """
    empty = np.zeros((0, 2), dtype=np.float32)
    if len(src) == 0 or len(dst) < 2:
        return empty, empty.copy()
    dst_desc = dst.descriptors
    dst_sq = np.einsum("ij,ij->i", dst_desc, dst_desc)
    nearest, ratios = [], []
    for start in range(0, len(src), _MATCH_BLOCK):
        block = src.descriptors[start : start + _MATCH_BLOCK]
        # ||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b; clipped at 0 against rounding.
        sq = np.einsum("ij,ij->i", block, block)[:, None] + dst_sq[None, :] - 2 * block @ dst_desc.T
        rows = np.arange(len(block))
        first = sq.argmin(axis=1)
        first_sq = sq[rows, first]
        sq[rows, first] = np.inf
        second_sq = sq.min(axis=1)
        # Compare distances, not squared distances: Lowe's test is on distances.
        nearest.append(first)
        ratios.append(
            np.sqrt(np.maximum(first_sq, 0.0)) < ratio * np.sqrt(np.maximum(second_sq, 0.0))
        )
    train = np.concatenate(nearest)
    keep = np.concatenate(ratios)
    return src.points[keep], dst.points[train[keep]]


def _apply(H: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(projected (N, 2), w (N,))`` of ``points`` under ``H`` (float64, any convention)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    mapped = points @ H[:, :2].T + H[:, 2]
    w = mapped[:, 2]
    safe_w = np.where(np.abs(w) < 1e-12, 1e-12, w)
    return mapped[:, :2] / safe_w[:, None], w


def _normalise(H: np.ndarray) -> np.ndarray:
    """Scale ``H`` so that ``H[2, 2] == 1`` (or unit Frobenius norm when ``H[2, 2]`` ~ 0)."""
    scale = H[2, 2] if abs(H[2, 2]) > 1e-12 else np.linalg.norm(H)
    return H / scale


def transfer_error(H_est, H_true, points) -> np.ndarray:
    """Per-point distance in pixels between ``points`` mapped by ``H_est`` and by ``H_true``.

    Args:
        H_est, H_true: ``(3, 3)`` array-likes (numpy, torch or nested lists) in the same
            coordinate convention as ``points``.
        points: ``(N, 2)`` points ``(x, y)`` of the source image.

    Returns:
        ``(N,)`` float64 distances.
    """
    H_est = np.asarray(H_est, dtype=np.float64)
    H_true = np.asarray(H_true, dtype=np.float64)
    if H_est.shape != (3, 3) or H_true.shape != (3, 3):
        raise ValueError(f"expected 3x3 homographies, got {H_est.shape} and {H_true.shape}")
    est, _ = _apply(H_est, points)
    true, _ = _apply(H_true, points)
    return np.linalg.norm(est - true, axis=1)


@dataclass
class _Fit:
    """One direction's pooled matches, its robust fit and the judgement of it."""

    src_points: np.ndarray  # (M, 2) OpenCV convention
    dst_points: np.ndarray  # (M, 2) OpenCV convention
    H_cv: np.ndarray | None  # fitted homography in OpenCV's convention, or None when it failed
    estimate: PairEstimate  # H in pixel-centre convention, identity when unreliable


def _unreliable(inliers: int = 0, ratio: float = 0.0, error: float = 0.0) -> PairEstimate:
    return PairEstimate(
        H=np.eye(3).tolist(),
        inliers=int(inliers),
        inlier_ratio=float(ratio),
        reproj_error_px=float(error),
        status="unreliable",
    )


def _judge(
    H_cv: np.ndarray | None,
    src_points: np.ndarray,
    dst_points: np.ndarray,
    settings: _Settings,
) -> PairEstimate:
    """Evidence for ``H_cv`` on these matches, and its status (see the module docstring).

    Inliers are matches in front of the target camera (``w > 0``) with a reprojection error
    below ``ransac_threshold_px``; the same rule judges a fitted homography and the inverse
    stored for the reverse direction, so both entries report comparable numbers.
    """
    if H_cv is None or not np.all(np.isfinite(H_cv)) or len(src_points) == 0:
        return _unreliable()
    H_cv = _normalise(H_cv)
    projected, w = _apply(H_cv, src_points)
    residual = np.linalg.norm(projected - dst_points.astype(np.float64), axis=1)
    inlier = (w > 0) & (residual < settings.ransac_threshold_px)
    count = int(inlier.sum())
    ratio = count / len(src_points)
    error = float(np.median(residual[inlier])) if count else 0.0
    det = float(np.linalg.det(H_cv))
    if count < settings.min_inliers or not math.isfinite(det) or abs(det) < 1e-12:
        return _unreliable(count, ratio, error)
    # The local area change of a homography at x is det(H) / w(x)^3. It must be positive
    # (cameras of one rig do not mirror the object) and bounded at every inlier.
    area_change = det / w[inlier] ** 3
    if np.any(area_change <= 0) or np.any(
        (area_change > MAX_AREA_CHANGE) | (area_change < 1 / MAX_AREA_CHANGE)
    ):
        return _unreliable(count, ratio, error)
    H_pc = from_opencv_convention(torch.from_numpy(H_cv)).numpy()
    return PairEstimate(
        H=_normalise(H_pc).tolist(),
        inliers=count,
        inlier_ratio=float(ratio),
        reproj_error_px=error,
        status="ok",
    )


@dataclass(frozen=True)
class _Settings:
    """The estimation knobs shared by every pair (see :func:`estimate_pair`)."""

    ratio: float
    ransac_threshold_px: float
    refine_threshold_px: float
    min_inliers: int

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"ratio must be in (0, 1), got {self.ratio}")
        if not self.ransac_threshold_px > 0:
            raise ValueError(
                f"ransac_threshold_px must be positive, got {self.ransac_threshold_px}"
            )
        if not 0 < self.refine_threshold_px <= self.ransac_threshold_px:
            raise ValueError(
                f"refine_threshold_px must be in (0, ransac_threshold_px="
                f"{self.ransac_threshold_px}], got {self.refine_threshold_px}"
            )
        if self.min_inliers < 4:
            raise ValueError(
                f"min_inliers must be at least 4 (a homography needs 4), got {self.min_inliers}"
            )


def _polish(
    H_cv: np.ndarray, src_points: np.ndarray, dst_points: np.ndarray, threshold_px: float
) -> tuple[np.ndarray, int]:
    """Least squares on the matches within ``threshold_px``, repeated until the set is stable.

    Returns the polished homography and the size of its final support.
    """
    support = None
    for _ in range(_POLISH_ITERATIONS):
        projected, w = _apply(H_cv, src_points)
        residual = np.linalg.norm(projected - dst_points, axis=1)
        new_support = (w > 0) & (residual < threshold_px)
        if int(new_support.sum()) < 4 or (support is not None and (new_support == support).all()):
            break
        support = new_support
        # method 0: DLT on all given points followed by Levenberg-Marquardt on reprojection error.
        refit, _ = cv2.findHomography(src_points[support], dst_points[support], 0)
        if refit is None or not np.all(np.isfinite(refit)):
            break
        H_cv = refit
    projected, w = _apply(H_cv, src_points)
    residual = np.linalg.norm(projected - dst_points, axis=1)
    return H_cv, int(((w > 0) & (residual < threshold_px)).sum())


def _robust_fit(
    src_points: np.ndarray, dst_points: np.ndarray, settings: _Settings
) -> np.ndarray | None:
    """The homography of the dominant surface among the pooled matches (OpenCV convention).

    ``cv2.findHomography(..., cv2.USAC_MAGSAC)`` is run at ``ransac_threshold_px`` and at the
    fractions ``_THRESHOLD_LADDER`` of it; each candidate is polished by least squares on the
    matches within ``refine_threshold_px``, and the candidate with the most such matches wins.
    Why a ladder rather than a single MAGSAC call: when the scene holds a second surface close
    to the main one (the kerb under the graffiti wall; the faces of a 3D object), one fit at a
    loose threshold compromises between them, and the compromise is off by several pixels on
    both (graffiti 1->3: median 1.3-2.0 px, 95th percentile 4.6-5.8 px against the ground
    truth over 18 SIFT settings), while the tight-consensus winner lands on the dominant
    surface (worst median 0.8 px, 95th percentile 2.6 px on the same settings).
    """
    if len(src_points) < 4:
        return None
    src = src_points.astype(np.float64)
    dst = dst_points.astype(np.float64)
    best, best_support = None, -1
    for fraction in _THRESHOLD_LADDER:
        H_cv, _ = cv2.findHomography(
            src_points,
            dst_points,
            cv2.USAC_MAGSAC,
            ransacReprojThreshold=settings.ransac_threshold_px * fraction,
            maxIters=10000,
            confidence=0.9999,
        )
        if H_cv is None or H_cv.shape != (3, 3) or not np.all(np.isfinite(H_cv)):
            continue
        H_cv, support = _polish(H_cv.astype(np.float64), src, dst, settings.refine_threshold_px)
        if support > best_support:
            best, best_support = H_cv, support
    return best


def _fit_pooled(
    src_features: Sequence[ImageFeatures],
    dst_features: Sequence[ImageFeatures],
    settings: _Settings,
) -> _Fit:
    """Match each of the ``K`` pairs, pool the matches, fit once, judge the fit."""
    if len(src_features) != len(dst_features):
        raise ValueError(
            f"expected as many source as target images (one pair per sample), got "
            f"{len(src_features)} and {len(dst_features)}"
        )
    if len(src_features) == 0:
        raise ValueError("expected at least one image pair, got none")
    matches = [
        match_features(s, d, ratio=settings.ratio)
        for s, d in zip(src_features, dst_features, strict=True)
    ]
    src_points = np.concatenate([m[0] for m in matches]).astype(np.float32)
    dst_points = np.concatenate([m[1] for m in matches]).astype(np.float32)
    H_cv = _robust_fit(src_points, dst_points, settings)
    estimate = _judge(H_cv, src_points, dst_points, settings)
    return _Fit(src_points, dst_points, H_cv if estimate.status == "ok" else None, estimate)


def estimate_pair_from_features(
    src_features: Sequence[ImageFeatures],
    dst_features: Sequence[ImageFeatures],
    *,
    ratio: float = DEFAULT_RATIO,
    ransac_threshold_px: float = DEFAULT_RANSAC_THRESHOLD_PX,
    refine_threshold_px: float = DEFAULT_REFINE_THRESHOLD_PX,
    min_inliers: int = DEFAULT_MIN_INLIERS,
) -> PairEstimate:
    """:func:`estimate_pair` on features computed once by :func:`detect_features`."""
    settings = _Settings(ratio, ransac_threshold_px, refine_threshold_px, min_inliers)
    return _fit_pooled(src_features, dst_features, settings).estimate


def estimate_pair(
    src_images: Sequence[np.ndarray],
    dst_images: Sequence[np.ndarray],
    *,
    ratio: float = DEFAULT_RATIO,
    ransac_threshold_px: float = DEFAULT_RANSAC_THRESHOLD_PX,
    refine_threshold_px: float = DEFAULT_REFINE_THRESHOLD_PX,
    min_inliers: int = DEFAULT_MIN_INLIERS,
    max_keypoints: int | None = DEFAULT_MAX_KEYPOINTS,
) -> PairEstimate:
    """The homography from the source view to the target view, pooled over ``K`` samples.

    Args:
        src_images, dst_images: ``K`` uint8 images each; ``src_images[k]`` and
            ``dst_images[k]`` show the same sample. Grayscale or colour.
        ratio: Lowe's ratio test threshold.
        ransac_threshold_px: MAGSAC++ threshold, and the reprojection error below which a
            match counts as an inlier in the reported evidence.
        refine_threshold_px: the tight consensus used to polish and choose among the robust
            fits (see ``_robust_fit``).
        min_inliers: pooled inliers below which the pair is ``unreliable`` (identity ``H``).
        max_keypoints: SIFT keypoints kept per image (the strongest); ``None`` keeps all.

    Returns:
        A :class:`PairEstimate` whose ``H`` maps pixel-centre coordinates of the source view to
        the target view.
    """
    settings = _Settings(ratio, ransac_threshold_px, refine_threshold_px, min_inliers)
    if len(src_images) != len(dst_images):
        raise ValueError(
            f"expected as many source as target images (one pair per sample), got "
            f"{len(src_images)} and {len(dst_images)}"
        )
    src = [
        detect_features(im, max_keypoints=max_keypoints, name=f"source image {k}")
        for k, im in enumerate(src_images)
    ]
    dst = [
        detect_features(im, max_keypoints=max_keypoints, name=f"target image {k}")
        for k, im in enumerate(dst_images)
    ]
    return _fit_pooled(src, dst, settings).estimate


def inverse_discrepancy_px(
    H_uv: np.ndarray, H_vu: np.ndarray, image_size: tuple[int, int]
) -> float:
    """Mean disagreement in pixels between ``H(u->v)`` and ``inv(H(v->u))`` over the overlap.

    Measured symmetrically on a regular grid of pixel-centre points of each image: points of
    ``u`` that ``H(u->v)`` lands inside ``v`` (in front of the camera) are mapped by ``H(u->v)``
    and by ``inv(H(v->u))`` and compared in ``v``; likewise from ``v`` to ``u``. Points outside
    the overlap are left out because there the two fits are extrapolations and may disagree
    without consequence. Returns ``inf`` when the overlap is empty.
    """
    W, H = image_size
    xs = (np.arange(_CONSISTENCY_GRID) + 0.5) * W / _CONSISTENCY_GRID
    ys = (np.arange(_CONSISTENCY_GRID) + 0.5) * H / _CONSISTENCY_GRID
    grid = np.stack(np.meshgrid(xs, ys, indexing="xy"), axis=-1).reshape(-1, 2)
    distances = []
    for forward, backward in ((H_uv, H_vu), (H_vu, H_uv)):
        mapped, w = _apply(forward, grid)
        inside = (
            (w > 0)
            & (mapped[:, 0] >= 0)
            & (mapped[:, 0] <= W)
            & (mapped[:, 1] >= 0)
            & (mapped[:, 1] <= H)
        )
        if inside.any():
            distances.append(transfer_error(forward, np.linalg.inv(backward), grid[inside]))
    if not distances:
        return math.inf
    return float(np.concatenate(distances).mean())


def estimate_homographies(
    groups: Sequence[Mapping[str, np.ndarray]],
    views: Sequence[str],
    *,
    category: str,
    image_size: tuple[int, int],
    ratio: float = DEFAULT_RATIO,
    ransac_threshold_px: float = DEFAULT_RANSAC_THRESHOLD_PX,
    refine_threshold_px: float = DEFAULT_REFINE_THRESHOLD_PX,
    min_inliers: int = DEFAULT_MIN_INLIERS,
    max_keypoints: int | None = DEFAULT_MAX_KEYPOINTS,
    consistency_tolerance_px: float = DEFAULT_CONSISTENCY_TOLERANCE_PX,
    progress: Callable[[str], None] | None = None,
) -> HomographyCache:
    """Homographies between every ordered pair of views of one category.

    SIFT runs once per image (``K x V`` detections); every pair reuses those features.

    Inverse consistency (DESIGN.md: ``H(u->v)`` must be consistent with ``inv(H(v->u))``).
    Each unordered pair is estimated in both directions independently (separate ratio tests
    and robust fits). Then:

    - if either direction is ``unreliable``, both are (the agreement cannot be checked, and a
      one-way homography would make the cache asymmetric);
    - otherwise their disagreement :func:`inverse_discrepancy_px` is measured; above
      ``consistency_tolerance_px`` both directions are ``unreliable`` (identity);
    - otherwise the better-supported direction (more inliers; ties: lower reprojection error)
      is stored as fitted and the reverse direction stores its exact inverse, so the cache is
      consistent by construction. The reverse entry's inliers, inlier ratio and reprojection
      error are those of the inverse on the reverse direction's own matches.

    Args:
        groups: ``K`` normal training samples, each a mapping view token -> uint8 image of size
            ``image_size``.
        views: the view tokens, e.g. ``["C1", ..., "C5"]``.
        category: stored in the cache and used in messages.
        image_size: ``(W, H)`` of every image; the homographies are at this resolution.
        ratio, ransac_threshold_px, refine_threshold_px, min_inliers, max_keypoints: as in
            :func:`estimate_pair`.
        consistency_tolerance_px: the largest mean disagreement accepted between a direction
            and the inverse of the other.
        progress: called with one human-readable line per step (detection per view, result
            per unordered pair), e.g. ``print``.

    Returns:
        A :class:`HomographyCache` holding every ordered pair of distinct views.

    Raises:
        DataError: a sample lacks a view or an image has the wrong size or type.
    """
    settings = _Settings(ratio, ransac_threshold_px, refine_threshold_px, min_inliers)
    if not consistency_tolerance_px > 0:
        raise ValueError(
            f"consistency_tolerance_px must be positive, got {consistency_tolerance_px}"
        )
    views = list(views)
    if len(views) < 2 or len(set(views)) != len(views):
        raise ValueError(f"expected at least two distinct view tokens, got {views}")
    if not groups:
        raise DataError(f"category {category!r}: no training samples to estimate homographies")
    W, H = image_size
    report = progress if progress is not None else (lambda line: None)

    features: dict[str, list[ImageFeatures]] = {view: [] for view in views}
    for view in views:
        for k, group in enumerate(groups):
            name = f"category {category!r}, sample {k}, view {view}"
            if view not in group:
                raise DataError(f"{name}: missing (the sample has views {sorted(group)})")
            image = group[view]
            if not isinstance(image, np.ndarray) or image.shape[:2] != (H, W):
                shape = getattr(image, "shape", type(image).__name__)
                raise DataError(f"{name}: expected an image of size W={W}, H={H}, got {shape}")
            features[view].append(detect_features(image, max_keypoints=max_keypoints, name=name))
        counts = [len(f) for f in features[view]]
        report(f"view {view}: SIFT on {len(groups)} images, median {int(np.median(counts))} kp")

    pairs: dict[str, PairEstimate] = {}
    for u, v in combinations(views, 2):
        fit_uv = _fit_pooled(features[u], features[v], settings)
        fit_vu = _fit_pooled(features[v], features[u], settings)
        key_uv, key_vu = HomographyCache.pair_key(u, v), HomographyCache.pair_key(v, u)
        if fit_uv.H_cv is None or fit_vu.H_cv is None:
            pairs[key_uv] = _as_unreliable(fit_uv.estimate)
            pairs[key_vu] = _as_unreliable(fit_vu.estimate)
            report(
                f"{u}<->{v}: unreliable ({fit_uv.estimate.inliers} / "
                f"{fit_vu.estimate.inliers} inliers, minimum {min_inliers})"
            )
            continue
        discrepancy = inverse_discrepancy_px(
            np.asarray(fit_uv.estimate.H), np.asarray(fit_vu.estimate.H), image_size
        )
        if not discrepancy <= consistency_tolerance_px:
            pairs[key_uv] = _as_unreliable(fit_uv.estimate)
            pairs[key_vu] = _as_unreliable(fit_vu.estimate)
            report(
                f"{u}<->{v}: unreliable (the two directions disagree by {discrepancy:.2f} px, "
                f"tolerance {consistency_tolerance_px} px)"
            )
            continue
        # Keep the better-supported direction; the other becomes its exact inverse.
        rank_uv = (fit_uv.estimate.inliers, -fit_uv.estimate.reproj_error_px)
        rank_vu = (fit_vu.estimate.inliers, -fit_vu.estimate.reproj_error_px)
        best, other, key_best, key_other = (
            (fit_uv, fit_vu, key_uv, key_vu)
            if rank_uv >= rank_vu
            else (fit_vu, fit_uv, key_vu, key_uv)
        )
        inverse = _judge(np.linalg.inv(best.H_cv), other.src_points, other.dst_points, settings)
        if inverse.status != "ok":
            pairs[key_best] = _as_unreliable(best.estimate)
            pairs[key_other] = _as_unreliable(inverse)
            report(f"{u}<->{v}: unreliable (the inverse is not supported by the reverse matches)")
            continue
        # The stored reverse H is the exact inverse of the stored forward H.
        inverse.H = _normalise(np.linalg.inv(np.asarray(best.estimate.H))).tolist()
        pairs[key_best] = best.estimate
        pairs[key_other] = inverse
        report(
            f"{u}<->{v}: ok ({best.estimate.inliers} inliers, "
            f"{best.estimate.reproj_error_px:.2f} px, directions agree to {discrepancy:.2f} px)"
        )

    ordered = {
        HomographyCache.pair_key(s, d): pairs[HomographyCache.pair_key(s, d)]
        for s in views
        for d in views
        if s != d
    }
    return HomographyCache(
        category=category, image_size=(int(W), int(H)), views=views, pairs=ordered
    )


def _as_unreliable(estimate: PairEstimate) -> PairEstimate:
    """The same evidence, marked ``unreliable`` with the identity ``H``."""
    return _unreliable(estimate.inliers, estimate.inlier_ratio, estimate.reproj_error_px)


def format_report(cache: HomographyCache) -> str:
    """A per-pair table (inliers, inlier ratio, reprojection error, status) and a summary line.

    Printed by ``vsad-homography``. Unreliable pairs leave the neighbour graph of every run
    (``MultiViewDataModule.neighbour_graph_mask``).
    """
    header = f"{'pair':<14} {'inliers':>8} {'ratio':>7} {'error px':>9}  status"
    lines = [
        f"homographies for category {cache.category!r} at {cache.image_size[0]}x"
        f"{cache.image_size[1]} px, views {', '.join(cache.views)}",
        header,
        "-" * len(header),
    ]
    for key, pair in cache.pairs.items():
        error = f"{pair.reproj_error_px:.2f}" if pair.inliers > 0 else "-"
        lines.append(
            f"{key:<14} {pair.inliers:>8d} {pair.inlier_ratio:>7.3f} {error:>9}  {pair.status}"
        )
    unreliable = cache.unreliable_pairs()
    summary = f"unreliable pairs: {len(unreliable)} of {len(cache.pairs)}"
    if unreliable:
        summary += " (removed from the neighbour graph): " + ", ".join(unreliable)
    lines.append(summary)
    return "\n".join(lines)
