"""Homography estimation between camera views (docs/datasets.md#homography-estimation).

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
   proposed at a short ladder of thresholds (and once on the mutual nearest-neighbour matches
   alone), polished by least squares on a tight consensus (``refine_threshold_px``); the
   sound candidate with the largest tight consensus wins. This lands on the dominant surface
   where one loose fit compromises between two (see ``_robust_fit`` for the measurements
   behind this choice).
4. Evidence: inliers (pooled matches whose reprojection error under the fit is below
   ``ransac_threshold_px``), inlier ratio, median reprojection error over the inliers. The pair
   is ``unreliable`` (it stores the identity; a run removes it from the neighbour graph,
   ``MultiViewDataModule.neighbour_graph_mask``, so the matrix is never used) when the fit
   fails or is degenerate, or when the evidence does not single it out (``_verdict``):

   - fewer than ``min_inliers`` inliers;
   - one sample carries it: without its best-supporting sample, fewer than
     ``min_inliers / 2`` inliers remain. The rig is fixed, so the true homography is
     supported by every sample on its own; a chance fit (views that do not overlap, on a
     repetitive texture where every window looks like every other) draws nearly all its
     inliers from one sample;
   - a rival homography, fitted on the remaining matches, has at least ``1 / rival_margin``
     times its inliers in the same part of the image: the evidence is ambiguous, as for a
     fit shifted by one period of a repetitive texture (the true fit is its rival).

Repetitive textures (a facade: a grid of similar windows) are where the previous rule (a
count of 30) failed, for three measured reasons (tests/test_homography_estimation.py builds
such a facade at 256 px):

- the ratio test discards most correct matches (the second-nearest descriptor is the
  neighbouring window): with K = 3-4 samples the true fit had 16-39 inliers per direction,
  only ~10 % of the pooled matches;
- at that inlier ratio, MAGSAC++'s 10,000 iterations sometimes missed the truth
  (``_MAGSAC_MAX_ITERATIONS``);
- many source keypoints matched one target keypoint, and MAGSAC++ locked onto degenerate
  fits that collapse several windows onto one point (``_match``).

Chance fits between non-overlapping views of the same facade reached 15-21 inliers in one
direction, so no count alone separates them from the truth; the spread over samples, the
rival and both directions' agreement do.

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

_MAGSAC_MAX_ITERATIONS = 100_000
"""Iteration cap of every MAGSAC++ call. At an inlier ratio ``e`` a clean minimal sample needs
about ``log(1e-4) / log(1 - e^4)`` draws for 99.99 % confidence: 32,000 at ``e = 0.13`` (the
pooled matches of a repetitive texture). Measured on such a pair (565 matches, 75 correct):
10,000 iterations returned a 28-inlier wrong fit in 3 of 6 match orderings, 20,000 or more
found the truth every time. MAGSAC stops as soon as its confidence is reached, so a clean pair
costs the same as before (~10 ms)."""

_POLISH_ITERATIONS = 20
"""Upper bound on least-squares polishing rounds; the support is usually stable after 5-15."""

DEFAULT_MIN_INLIERS = 15
"""Pooled inliers below which a pair is ``unreliable``. Unrelated images pooled over three to
eight samples give at most ten MAGSAC inliers (chance matches); a repetitive texture's true fit
has 16-40 per direction at 256 px from three or four samples (see the module docstring).
Chance fits with more inliers are caught by the spread over samples, the rival and the
agreement of both directions."""

DEFAULT_RIVAL_MARGIN = 1.0
"""A fit needs more than this many times the inliers of its best rival homography in the same
part of the image (``_rival_support``). Measured on facade pairs at 256 px (K = 4 and 8, loose
matching: ratio 0.95, so that a fit shifted by one period has support of its own): true fits
4.7-31x their rival, shifted fits 0.08-0.22x. A second surface of a 3D part can be a strong
rival of a true fit (1.9x on one pair of the realistic synthetic rig), hence no larger margin."""

RIVAL_RADIUS_FRACTION = 0.1
"""A rival's inlier competes with the fit when an inlier of the fit lies within this fraction
of the matches' extent (diagonal) in the source image: a second surface elsewhere in the
image (a kerb, another face of a part) is not a rival, an alias interleaved with the fit is."""

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
    src: ImageFeatures,
    dst: ImageFeatures,
    *,
    ratio: float = DEFAULT_RATIO,
    mutual: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Lowe ratio-test matches from ``src`` to ``dst``: ``(src_points, dst_points)``, ``(M, 2)``.

    Exact brute-force L2 matching: the two nearest descriptors of ``dst`` for every descriptor
    of ``src``, from one matrix product per block of ``_MATCH_BLOCK`` source descriptors (the
    same result as ``cv2.BFMatcher.knnMatch(k=2)``, about ten times faster here, with memory
    bounded by the block). A match is kept when its nearest neighbour is closer than ``ratio``
    times the second nearest, and, with ``mutual`` (a cross-check), only when the source
    keypoint is also the nearest of all source descriptors to its match.
    """
    src_points, dst_points, is_mutual = _match(src, dst, ratio)
    if mutual:
        return src_points[is_mutual], dst_points[is_mutual]
    return src_points, dst_points


def _match(
    src: ImageFeatures, dst: ImageFeatures, ratio: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``match_features``'s ratio-test matches and, per match, whether it is mutual.

    Why the robust fit wants the mutual ones (``_robust_fit``): the ratio test alone lets many
    source keypoints match one target keypoint. On a repetitive texture (a facade at 256 px)
    that was about half of the matches, and those many-to-one matches support degenerate fits
    that collapse several windows onto one point: MAGSAC++ on all matches returned such a fit
    (7-18 inliers, determinant ~0) where the truth had 22-31; on the mutual matches it found
    the truth in every ordering of the matches. Over 16 facade pairs (K = 3-8) the previous
    estimator's fit was 105-145 px from the truth in 9.
    """
    empty = np.zeros((0, 2), dtype=np.float32)
    if len(src) == 0 or len(dst) < 2:
        return empty, empty.copy(), np.zeros(0, dtype=bool)
    dst_desc = dst.descriptors
    dst_sq = np.einsum("ij,ij->i", dst_desc, dst_desc)
    nearest, ratios = [], []
    columns = np.arange(len(dst))
    best_src = np.zeros(len(dst), dtype=np.int64)  # nearest source descriptor of each target
    best_src_sq = np.full(len(dst), np.inf)
    for start in range(0, len(src), _MATCH_BLOCK):
        block = src.descriptors[start : start + _MATCH_BLOCK]
        # ||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b; clipped at 0 against rounding.
        sq = np.einsum("ij,ij->i", block, block)[:, None] + dst_sq[None, :] - 2 * block @ dst_desc.T
        column_best = sq.argmin(axis=0)
        column_sq = sq[column_best, columns]
        better = column_sq < best_src_sq
        best_src[better] = column_best[better] + start
        best_src_sq[better] = column_sq[better]
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
    is_mutual = best_src[train] == np.arange(len(src))
    return src.points[keep], dst.points[train[keep]], is_mutual[keep]


def project_points(H: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(projected (N, 2), w (N,))`` of ``points`` under ``H`` (float64, any convention)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    mapped = points @ H[:, :2].T + H[:, 2]
    w = mapped[:, 2]
    safe_w = np.where(np.abs(w) < 1e-12, 1e-12, w)
    return mapped[:, :2] / safe_w[:, None], w


def normalise_homography(H: np.ndarray) -> np.ndarray:
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
    est, _ = project_points(H_est, points)
    true, _ = project_points(H_true, points)
    return np.linalg.norm(est - true, axis=1)


@dataclass
class _Fit:
    """One direction's pooled matches, its robust fit and the judgement of it."""

    src_points: np.ndarray  # (M, 2) OpenCV convention
    dst_points: np.ndarray  # (M, 2) OpenCV convention
    H_cv: np.ndarray | None  # fitted homography in OpenCV's convention, or None when it failed
    estimate: PairEstimate  # H in pixel-centre convention, identity when unreliable
    samples: np.ndarray | None = None  # (M,) the sample each match comes from
    reason: str = ""  # why the fit is unreliable ("" when ok)
    mutual: np.ndarray | None = None  # (M,) bool, mutual nearest neighbours (``_match``)


def _unreliable(inliers: int = 0, ratio: float = 0.0, error: float = 0.0) -> PairEstimate:
    return PairEstimate(
        H=np.eye(3).tolist(),
        inliers=int(inliers),
        inlier_ratio=float(ratio),
        reproj_error_px=float(error),
        status="unreliable",
    )


def _verdict(
    H_cv: np.ndarray | None,
    src_points: np.ndarray,
    dst_points: np.ndarray,
    settings: _Settings,
    samples: np.ndarray | None = None,
    mutual: np.ndarray | None = None,
) -> tuple[PairEstimate, str]:
    """Evidence for ``H_cv`` on these matches, its status, and the reason when unreliable.

    Inliers are matches in front of the target camera (``w > 0``) with a reprojection error
    below ``ransac_threshold_px``; the same rule judges a fitted homography and the inverse
    stored for the reverse direction, so both entries report comparable numbers. The fit is
    ``ok`` when, in this order (the module docstring says why):

    1. it has at least ``min_inliers`` inliers and is not degenerate (no mirror, bounded area
       change at every inlier);
    2. with ``samples`` (the sample of each match, ``K >= 2``): at least ``min_inliers / 2``
       inliers remain without its best-supporting sample;
    3. it has more than ``rival_margin`` times the inliers of its best rival where the two
       compete (``_rival_support``; ``mutual`` helps that rival's robust fit).
    """
    if H_cv is None or not np.all(np.isfinite(H_cv)) or len(src_points) == 0:
        return _unreliable(), "no fit"
    H_cv = normalise_homography(H_cv)
    projected, w = project_points(H_cv, src_points)
    residual = np.linalg.norm(projected - dst_points.astype(np.float64), axis=1)
    inlier = (w > 0) & (residual < settings.ransac_threshold_px)
    count = int(inlier.sum())
    ratio = count / len(src_points)
    error = float(np.median(residual[inlier])) if count else 0.0
    det = float(np.linalg.det(H_cv))
    if count < settings.min_inliers:
        return _unreliable(count, ratio, error), f"{count} inliers, minimum {settings.min_inliers}"
    if not math.isfinite(det) or abs(det) < 1e-12:
        return _unreliable(count, ratio, error), "singular fit"
    # The local area change of a homography at x is det(H) / w(x)^3. It must be positive
    # (cameras of one rig do not mirror the object) and bounded at every inlier.
    area_change = det / w[inlier] ** 3
    if np.any(area_change <= 0) or np.any(
        (area_change > MAX_AREA_CHANGE) | (area_change < 1 / MAX_AREA_CHANGE)
    ):
        return _unreliable(count, ratio, error), "degenerate fit (mirror or area collapse)"
    if samples is not None and len(samples) and int(samples.max()) >= 1:
        per_sample = np.bincount(samples[inlier], minlength=int(samples.max()) + 1)
        if count - int(per_sample.max()) < settings.min_inliers / 2:
            return _unreliable(count, ratio, error), (
                f"one sample carries it: {count - int(per_sample.max())} inliers without it, "
                f"minimum {settings.min_inliers / 2:g} (per sample: {per_sample.tolist()})"
            )
    rival = _rival_support(H_cv, src_points, dst_points, inlier, settings, mutual)
    if rival > 0 and count <= settings.rival_margin * rival:
        return _unreliable(count, ratio, error), (
            f"ambiguous: a rival homography has {rival} inliers where this one has {count}"
        )
    H_pc = from_opencv_convention(torch.from_numpy(H_cv)).numpy()
    estimate = PairEstimate(
        H=normalise_homography(H_pc).tolist(),
        inliers=count,
        inlier_ratio=float(ratio),
        reproj_error_px=error,
        status="ok",
    )
    return estimate, ""


def _magsac(src: np.ndarray, dst: np.ndarray, threshold_px: float) -> np.ndarray | None:
    """One MAGSAC++ fit (OpenCV convention), or ``None`` when OpenCV finds none."""
    H_cv, _ = cv2.findHomography(
        src.astype(np.float32),
        dst.astype(np.float32),
        cv2.USAC_MAGSAC,
        ransacReprojThreshold=threshold_px,
        maxIters=_MAGSAC_MAX_ITERATIONS,
        confidence=0.9999,
    )
    if H_cv is None or H_cv.shape != (3, 3) or not np.all(np.isfinite(H_cv)):
        return None
    return H_cv.astype(np.float64)


def _rival_support(
    H_cv: np.ndarray,
    src_points: np.ndarray,
    dst_points: np.ndarray,
    inlier: np.ndarray,
    settings: _Settings,
    mutual: np.ndarray | None = None,
) -> int:
    """Inliers of the best rival of ``H_cv`` where the two compete.

    The rival is the robust fit (``_robust_fit``) of the matches that are not inliers of
    ``H_cv``. Its inlier
    competes when the two homographies put that point more than ``2 x ransac_threshold_px``
    apart (a different correspondence, not the same surface fitted a little differently)
    and an inlier of ``H_cv`` lies within ``RIVAL_RADIUS_FRACTION`` of the matches' extent in
    the source image (the same part of the image, not a second surface beside it).
    """
    threshold = settings.ransac_threshold_px
    rest = ~inlier
    if rest.sum() < 4:
        return 0
    src = src_points[rest].astype(np.float64)
    dst = dst_points[rest].astype(np.float64)
    rival = _robust_fit(src, dst, settings, None if mutual is None else mutual[rest])
    if rival is None:
        return 0
    projected, w = project_points(rival, src)
    rival_inlier = (w > 0) & (np.linalg.norm(projected - dst, axis=1) < threshold)
    ours, _ = project_points(H_cv, src)
    apart = np.linalg.norm(ours - projected, axis=1) > 2 * threshold
    candidates = src[rival_inlier & apart]
    support = src_points[inlier].astype(np.float64)
    if len(candidates) == 0 or len(support) == 0:
        return 0
    extent = src_points.max(axis=0) - src_points.min(axis=0)
    radius_sq = (RIVAL_RADIUS_FRACTION * float(np.hypot(*extent))) ** 2
    competing = 0
    for start in range(0, len(candidates), 256):  # bounded memory: 256 x inliers distances
        block = candidates[start : start + 256]
        nearest_sq = ((block[:, None, :] - support[None]) ** 2).sum(-1).min(axis=1)
        competing += int((nearest_sq <= radius_sq).sum())
    return competing


@dataclass(frozen=True)
class _Settings:
    """The estimation knobs shared by every pair (see :func:`estimate_pair`)."""

    ratio: float
    ransac_threshold_px: float
    refine_threshold_px: float
    min_inliers: int
    rival_margin: float = DEFAULT_RIVAL_MARGIN

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
        if not self.rival_margin >= 1.0:
            raise ValueError(f"rival_margin must be at least 1, got {self.rival_margin}")


def polish_on_inliers(
    H_cv: np.ndarray, src_points: np.ndarray, dst_points: np.ndarray, threshold_px: float
) -> tuple[np.ndarray, int]:
    """Least squares on the matches within ``threshold_px``, repeated until the set is stable.

    Returns the polished homography and the size of its final support.
    """
    support = None
    for _ in range(_POLISH_ITERATIONS):
        projected, w = project_points(H_cv, src_points)
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
    projected, w = project_points(H_cv, src_points)
    residual = np.linalg.norm(projected - dst_points, axis=1)
    return H_cv, int(((w > 0) & (residual < threshold_px)).sum())


def _robust_fit(
    src_points: np.ndarray,
    dst_points: np.ndarray,
    settings: _Settings,
    mutual: np.ndarray | None = None,
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

    With ``mutual`` (which matches are mutual nearest neighbours, ``_match``), one more
    candidate comes from MAGSAC++ on the mutual matches alone, polished on all of them like
    the others: on repetitive textures the many-to-one matches lead MAGSAC++ to degenerate
    fits (see ``_match``). Degenerate candidates (mirrors, collapsed area) never win over a
    sound one.
    """
    if len(src_points) < 4:
        return None
    src = src_points.astype(np.float64)
    dst = dst_points.astype(np.float64)
    proposals = [
        (src_points, dst_points, settings.ransac_threshold_px * f) for f in _THRESHOLD_LADDER
    ]
    if mutual is not None and int(mutual.sum()) >= 4:
        proposals.append((src_points[mutual], dst_points[mutual], settings.ransac_threshold_px))
    best, best_rank = None, (False, -1)
    for proposal_src, proposal_dst, threshold in proposals:
        H_cv = _magsac(proposal_src, proposal_dst, threshold)
        if H_cv is None:
            continue
        H_cv, support = polish_on_inliers(H_cv, src, dst, settings.refine_threshold_px)
        rank = (_is_sound(H_cv, src, dst, settings.ransac_threshold_px), support)
        if rank > best_rank:
            best, best_rank = H_cv, rank
    return best


def _is_sound(H_cv: np.ndarray, src: np.ndarray, dst: np.ndarray, threshold_px: float) -> bool:
    """Not degenerate at its inliers (see ``_verdict``: no mirror, bounded area change)."""
    H_cv = normalise_homography(H_cv)
    projected, w = project_points(H_cv, src)
    inlier = (w > 0) & (np.linalg.norm(projected - dst, axis=1) < threshold_px)
    det = float(np.linalg.det(H_cv))
    if not inlier.any() or not math.isfinite(det) or abs(det) < 1e-12:
        return False
    area_change = det / w[inlier] ** 3
    return bool(
        np.all(area_change > 0)
        and np.all((area_change <= MAX_AREA_CHANGE) & (area_change >= 1 / MAX_AREA_CHANGE))
    )


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
        _match(s, d, settings.ratio) for s, d in zip(src_features, dst_features, strict=True)
    ]
    src_points = np.concatenate([m[0] for m in matches]).astype(np.float32)
    dst_points = np.concatenate([m[1] for m in matches]).astype(np.float32)
    mutual = np.concatenate([m[2] for m in matches])
    samples = np.concatenate([np.full(len(m[0]), k) for k, m in enumerate(matches)]).astype(int)
    H_cv = _robust_fit(src_points, dst_points, settings, mutual)
    estimate, reason = _verdict(H_cv, src_points, dst_points, settings, samples, mutual)
    H_ok = H_cv if estimate.status == "ok" else None
    return _Fit(src_points, dst_points, H_ok, estimate, samples, reason, mutual)


def estimate_pair_from_features(
    src_features: Sequence[ImageFeatures],
    dst_features: Sequence[ImageFeatures],
    *,
    ratio: float = DEFAULT_RATIO,
    ransac_threshold_px: float = DEFAULT_RANSAC_THRESHOLD_PX,
    refine_threshold_px: float = DEFAULT_REFINE_THRESHOLD_PX,
    min_inliers: int = DEFAULT_MIN_INLIERS,
    rival_margin: float = DEFAULT_RIVAL_MARGIN,
) -> PairEstimate:
    """:func:`estimate_pair` on features computed once by :func:`detect_features`."""
    settings = _Settings(ratio, ransac_threshold_px, refine_threshold_px, min_inliers, rival_margin)
    return _fit_pooled(src_features, dst_features, settings).estimate


def estimate_pair(
    src_images: Sequence[np.ndarray],
    dst_images: Sequence[np.ndarray],
    *,
    ratio: float = DEFAULT_RATIO,
    ransac_threshold_px: float = DEFAULT_RANSAC_THRESHOLD_PX,
    refine_threshold_px: float = DEFAULT_REFINE_THRESHOLD_PX,
    min_inliers: int = DEFAULT_MIN_INLIERS,
    rival_margin: float = DEFAULT_RIVAL_MARGIN,
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
        rival_margin: how many times the inliers of its best competing rival a fit needs
            (``_verdict``).
        max_keypoints: SIFT keypoints kept per image (the strongest); ``None`` keeps all.

    Returns:
        A :class:`PairEstimate` whose ``H`` maps pixel-centre coordinates of the source view to
        the target view.
    """
    settings = _Settings(ratio, ransac_threshold_px, refine_threshold_px, min_inliers, rival_margin)
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
        mapped, w = project_points(forward, grid)
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
    rival_margin: float = DEFAULT_RIVAL_MARGIN,
    max_keypoints: int | None = DEFAULT_MAX_KEYPOINTS,
    consistency_tolerance_px: float = DEFAULT_CONSISTENCY_TOLERANCE_PX,
    progress: Callable[[str], None] | None = None,
) -> HomographyCache:
    """Homographies between every ordered pair of views of one category.

    SIFT runs once per image (``K x V`` detections); every pair reuses those features.

    Inverse consistency (``H(u->v)`` must agree with ``inv(H(v->u))``; docs/datasets.md).
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
        ratio, ransac_threshold_px, refine_threshold_px, min_inliers, rival_margin,
            max_keypoints: as in :func:`estimate_pair`.
        consistency_tolerance_px: the largest mean disagreement accepted between a direction
            and the inverse of the other.
        progress: called with one human-readable line per step (detection per view, result
            per unordered pair), e.g. ``print``.

    Returns:
        A :class:`HomographyCache` holding every ordered pair of distinct views.

    Raises:
        DataError: a sample lacks a view or an image has the wrong size or type.
    """
    settings = _Settings(ratio, ransac_threshold_px, refine_threshold_px, min_inliers, rival_margin)
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
            why = "; ".join(
                f"{a}->{b}: {fit.reason}"
                for a, b, fit in ((u, v, fit_uv), (v, u, fit_vu))
                if fit.H_cv is None
            )
            report(
                f"{u}<->{v}: unreliable ({fit_uv.estimate.inliers} / "
                f"{fit_vu.estimate.inliers} inliers; {why})"
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
        # Both directions' matches are evidence for one homography: polish the kept fit on
        # their union (the reverse matches swapped), which matters where inliers are few.
        joint, _ = polish_on_inliers(
            best.H_cv,
            np.concatenate([best.src_points, other.dst_points]).astype(np.float64),
            np.concatenate([best.dst_points, other.src_points]).astype(np.float64),
            settings.refine_threshold_px,
        )
        polished, _ = _verdict(
            joint, best.src_points, best.dst_points, settings, best.samples, best.mutual
        )
        if polished.status == "ok":
            best = _Fit(
                best.src_points, best.dst_points, joint, polished, best.samples, "", best.mutual
            )
        inverse, reason = _verdict(
            np.linalg.inv(best.H_cv),
            other.src_points,
            other.dst_points,
            settings,
            other.samples,
            other.mutual,
        )
        if inverse.status != "ok":
            pairs[key_best] = _as_unreliable(best.estimate)
            pairs[key_other] = _as_unreliable(inverse)
            report(
                f"{u}<->{v}: unreliable (the inverse is not supported by the reverse matches: "
                f"{reason})"
            )
            continue
        # The stored reverse H is the exact inverse of the stored forward H.
        inverse.H = normalise_homography(np.linalg.inv(np.asarray(best.estimate.H))).tolist()
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
