"""Homography estimation (docs/datasets.md): real photographs and known synthetic truth.

Conventions. The project stores homographies on pixel-centre coordinates (pixel ``i`` has its
centre at ``i + 0.5``). OpenCV's ``warpPerspective`` and the Oxford ground truth ``H1to3p.xml``
put pixel centres on integers: ``cv2.warpPerspective(src, M, size)`` sets
``dst(x, y) = src(M^-1 (x, y))`` at integer pixel indices ``(x, y)``. So ``M`` is in OpenCV's
convention and the truth in ours is ``T M T^-1`` with ``T`` the translation by ``+0.5``, which
is exactly ``from_opencv_convention(M)``.
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from skimage import data as skdata

from vsad_lightning.errors import DataError
from vsad_lightning.geometry import estimation
from vsad_lightning.geometry.cache import HomographyCache
from vsad_lightning.geometry.estimation import (
    DEFAULT_MIN_INLIERS,
    estimate_homographies,
    estimate_pair,
    format_report,
    inverse_discrepancy_px,
    transfer_error,
)
from vsad_lightning.geometry.projection import from_opencv_convention

GRAFFITI = Path(__file__).parent / "data" / "graffiti"

# Synthetic work images: big enough for hundreds of SIFT matches, small enough to be quick.
W, H = 480, 384
# A perspective warp (about 15 % scale change and a visible vanishing point), in OpenCV's
# convention: image corners (integer pixel indices) -> where the second camera sees them.
CORNERS = np.float32([[0, 0], [W - 1, 0], [W - 1, H - 1], [0, H - 1]])
WARPED_CORNERS = np.float32([[40, 30], [W - 30, 10], [W - 60, H - 20], [20, H - 50]])
M_CV = cv2.getPerspectiveTransform(CORNERS, WARPED_CORNERS).astype(np.float64)


def to_pixel_centre(H_cv: np.ndarray) -> np.ndarray:
    return from_opencv_convention(torch.from_numpy(np.asarray(H_cv, dtype=np.float64))).numpy()


def normalised(H) -> np.ndarray:
    H = np.asarray(H, dtype=np.float64)
    return H / H[2, 2]


def overlap_points(H_true: np.ndarray, size: tuple[int, int], step: int) -> np.ndarray:
    """Pixel centres of the source image (every ``step`` px) whose true projection is inside."""
    width, height = size
    ys, xs = np.mgrid[0:height:step, 0:width:step]
    points = np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], axis=1).astype(np.float64)
    mapped = points @ H_true[:, :2].T + H_true[:, 2]
    projected = mapped[:, :2] / mapped[:, 2:]
    inside = (
        (mapped[:, 2] > 0)
        & (projected[:, 0] >= 0)
        & (projected[:, 0] <= width)
        & (projected[:, 1] >= 0)
        & (projected[:, 1] <= height)
    )
    return points[inside]


def texture(name: str) -> np.ndarray:
    """A real photograph from scikit-image as a ``(H, W)`` uint8 work image."""
    image = getattr(skdata, name)()
    if image.ndim == 3:
        image = cv2.cvtColor(image[..., :3], cv2.COLOR_RGB2GRAY)
    return cv2.resize(image, (W, H), interpolation=cv2.INTER_AREA)


def second_view(image: np.ndarray) -> np.ndarray:
    return cv2.warpPerspective(image, M_CV, (W, H), flags=cv2.INTER_LINEAR)


@pytest.fixture(scope="module")
def three_view_cache() -> tuple[HomographyCache, list[str], float]:
    """Views A and B see the same textures through ``M_CV``; view C sees unrelated ones."""
    seen = ["brick", "gravel", "coffee"]
    unrelated = ["camera", "moon", "astronaut"]
    groups = [
        {"A": texture(a), "B": second_view(texture(a)), "C": texture(c)}
        for a, c in zip(seen, unrelated, strict=True)
    ]
    lines: list[str] = []
    start = time.perf_counter()
    cache = estimate_homographies(
        groups, ["A", "B", "C"], category="synthetic", image_size=(W, H), progress=lines.append
    )
    return cache, lines, time.perf_counter() - start


def test_graffiti_pair_matches_oxford_ground_truth():
    # Colour (BGR) photographs, a ~40 degree viewpoint change and a second surface (the kerb).
    graf1 = cv2.imread(str(GRAFFITI / "graf1.png"), cv2.IMREAD_COLOR)
    graf3 = cv2.imread(str(GRAFFITI / "graf3.png"), cv2.IMREAD_COLOR)
    assert graf1 is not None and graf3 is not None, f"missing test images in {GRAFFITI}"
    storage = cv2.FileStorage(str(GRAFFITI / "H1to3p.xml"), cv2.FILE_STORAGE_READ)
    H_true = to_pixel_centre(storage.getNode("H13").mat())
    storage.release()

    estimate = estimate_pair([graf1], [graf3])

    assert estimate.status == "ok"
    assert estimate.inliers >= DEFAULT_MIN_INLIERS
    assert 0.0 < estimate.reproj_error_px < 3.0
    points = overlap_points(H_true, (800, 640), step=4)
    assert len(points) > 25_000  # most of graf1 is seen in graf3
    error = transfer_error(estimate.H, H_true, points)
    assert np.median(error) < 1.5, np.median(error)
    assert np.percentile(error, 95) < 4.0, np.percentile(error, 95)
    # The four image corners "within a few pixels" (docs/datasets.md#homography-estimation).
    corners = np.array([[0.5, 0.5], [799.5, 0.5], [799.5, 639.5], [0.5, 639.5]])
    assert transfer_error(estimate.H, H_true, corners).max() < 8.0


def test_synthetic_pooled_estimate_is_accurate_and_reverse_is_exact_inverse(three_view_cache):
    cache, _, _ = three_view_cache
    forward = cache.pairs["A->B"]
    backward = cache.pairs["B->A"]
    assert forward.status == backward.status == "ok"

    H_true = to_pixel_centre(M_CV)
    points = overlap_points(H_true, (W, H), step=4)
    error = transfer_error(forward.H, H_true, points)
    assert np.median(error) < 1.0, np.median(error)
    assert np.percentile(error, 95) < 1.0
    # The convention matters at this accuracy: forgetting the half-pixel shift (comparing with
    # the OpenCV matrix itself) is measurably worse than the pixel-centre truth.
    wrong_convention = transfer_error(forward.H, M_CV, points)
    assert np.median(error) < 0.5 * np.median(wrong_convention)

    back_points = overlap_points(np.linalg.inv(H_true), (W, H), step=4)
    back_error = transfer_error(backward.H, np.linalg.inv(H_true), back_points)
    assert np.median(back_error) < 1.0

    # Stored reverse = exact inverse of the stored forward direction.
    np.testing.assert_allclose(
        normalised(backward.H), normalised(np.linalg.inv(forward.H)), rtol=1e-6, atol=1e-6
    )
    # Both directions carry their own evidence, measured on their own matches.
    assert backward.inliers >= DEFAULT_MIN_INLIERS
    assert 0.0 < backward.inlier_ratio <= 1.0

    # The cache survives its JSON round trip and serves the same matrices.
    reloaded = HomographyCache.from_json(cache.to_json())
    matrices = reloaded.matrices(["A", "B"]).double()
    np.testing.assert_allclose(matrices[0, 1].numpy(), np.asarray(forward.H), rtol=1e-6)
    np.testing.assert_allclose(matrices[1, 0].numpy(), np.asarray(backward.H), rtol=1e-6)


def test_views_without_overlap_are_unreliable_with_identity(three_view_cache):
    cache, _, _ = three_view_cache
    for key in ("A->C", "C->A", "B->C", "C->B"):
        pair = cache.pairs[key]
        assert pair.status == "unreliable", (key, pair)
        assert pair.inliers < DEFAULT_MIN_INLIERS
        np.testing.assert_array_equal(np.asarray(pair.H), np.eye(3))
    assert sorted(cache.unreliable_pairs()) == ["A->C", "B->C", "C->A", "C->B"]
    matrices = cache.matrices()
    assert torch.equal(matrices[0, 2], torch.eye(3))
    assert torch.equal(matrices[2, 1], torch.eye(3))

    # The same through estimate_pair directly, pooled over three unrelated pairs.
    lone = estimate_pair(
        [texture("brick"), texture("gravel"), texture("grass")],
        [texture("camera"), texture("moon"), texture("coffee")],
    )
    assert lone.status == "unreliable"
    assert np.eye(3).tolist() == lone.H


def test_pooling_over_samples_rescues_sparse_views():
    # Samples with few keypoints each (at most 40): no single pair reaches the inlier minimum,
    # the pooled matches of the four do, and they give an accurate homography.
    names = ["camera", "astronaut", "gravel", "chelsea"]
    sources = [texture(n) for n in names]
    targets = [second_view(s) for s in sources]
    settings = dict(max_keypoints=40, min_inliers=36)

    singles = [estimate_pair([s], [t], **settings) for s, t in zip(sources, targets, strict=True)]
    assert all(single.status == "unreliable" for single in singles), singles
    assert all(np.eye(3).tolist() == single.H for single in singles)

    pooled = estimate_pair(sources, targets, **settings)
    assert pooled.status == "ok"
    assert pooled.inliers > max(single.inliers for single in singles)
    H_true = to_pixel_centre(M_CV)
    error = transfer_error(pooled.H, H_true, overlap_points(H_true, (W, H), step=8))
    assert np.median(error) < 1.0, np.median(error)


def test_format_report_lists_every_pair_and_counts_unreliable(three_view_cache):
    cache, lines, _ = three_view_cache
    report = format_report(cache)
    for key, pair in cache.pairs.items():
        row = next(line for line in report.splitlines() if line.startswith(key + " "))
        assert row.split()[-1] == pair.status
        assert int(row.split()[1]) == pair.inliers
    assert "unreliable pairs: 4 of 6" in report
    # The progress callback heard about every view and every unordered pair.
    assert any(line.startswith("view C:") for line in lines)
    assert any(line.startswith("A<->B: ok") for line in lines)
    assert any(line.startswith("A<->C: unreliable") for line in lines)


def test_inverse_consistency_tolerance_marks_both_directions_unreliable():
    # Two independent fits never agree exactly, so a zero-ish tolerance must reject the pair.
    groups = [{"A": texture(n), "B": second_view(texture(n))} for n in ["brick", "coffee"]]
    cache = estimate_homographies(
        groups, ["A", "B"], category="strict", image_size=(W, H), consistency_tolerance_px=1e-9
    )
    assert cache.pairs["A->B"].status == cache.pairs["B->A"].status == "unreliable"
    assert cache.pairs["A->B"].inliers >= DEFAULT_MIN_INLIERS  # the evidence is still reported


def test_inverse_discrepancy_measures_disagreement_in_pixels():
    H_true = to_pixel_centre(M_CV)
    assert inverse_discrepancy_px(H_true, np.linalg.inv(H_true), (W, H)) < 1e-9
    # Translations: u->v by (10, 0); v->u by (-13, 4), whose inverse is (13, -4). Every point
    # disagrees by |(3, -4)| = 5 px, measured from either side.
    forward = np.array([[1.0, 0.0, 10.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    backward = np.array([[1.0, 0.0, -13.0], [0.0, 1.0, 4.0], [0.0, 0.0, 1.0]])
    assert inverse_discrepancy_px(forward, backward, (W, H)) == pytest.approx(5.0, rel=1e-9)
    # No overlap at all (the target is shifted far outside the image): infinite.
    far = np.array([[1.0, 0.0, 5000.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert inverse_discrepancy_px(far, np.linalg.inv(far), (W, H)) == float("inf")


def test_transfer_error_is_per_point_distance():
    points = np.array([[0.5, 0.5], [10.0, 20.0], [100.0, 50.0]])
    shift = np.array([[1.0, 0.0, 3.0], [0.0, 1.0, 4.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(transfer_error(shift, np.eye(3), points), [5.0, 5.0, 5.0])
    scaled = np.diag([2.0, 2.0, 2.0])  # the same homography up to scale
    np.testing.assert_allclose(transfer_error(scaled, np.eye(3), points), 0.0, atol=1e-12)


def test_sift_runs_once_per_image(monkeypatch):
    calls: list[str] = []
    real_detect = estimation.detect_features

    def counting_detect(image, **kwargs):
        calls.append(kwargs.get("name", ""))
        return real_detect(image, **kwargs)

    monkeypatch.setattr(estimation, "detect_features", counting_detect)
    groups = [
        {"A": texture(n), "B": second_view(texture(n)), "C": texture("moon")}
        for n in ["brick", "coffee"]
    ]
    estimate_homographies(groups, ["A", "B", "C"], category="count", image_size=(W, H))
    assert len(calls) == 2 * 3  # K samples x V views, although 6 ordered pairs are fitted


def test_bad_input_names_sample_and_view():
    good = texture("brick")
    with pytest.raises(DataError, match=r"sample 1, view B: missing"):
        estimate_homographies(
            [{"A": good, "B": good}, {"A": good}], ["A", "B"], category="x", image_size=(W, H)
        )
    with pytest.raises(DataError, match=r"sample 0, view A: expected an image of size W=480"):
        estimate_homographies(
            [{"A": good[:100], "B": good}], ["A", "B"], category="x", image_size=(W, H)
        )
    with pytest.raises(DataError, match=r"view B: expected a uint8 image"):
        estimate_homographies(
            [{"A": good, "B": good.astype(np.float32)}], ["A", "B"], category="x", image_size=(W, H)
        )
    with pytest.raises(ValueError, match="as many source as target"):
        estimate_pair([good, good], [good])
    with pytest.raises(ValueError, match="ratio"):
        estimate_pair([good], [good], ratio=1.5)


def test_degenerate_fits_are_rejected_even_with_many_inliers():
    # Exact correspondences, so every match is an inlier of the homography that made them;
    # what must reject the fit is its geometry: a mirror, or a collapse of the image area.
    rng = np.random.default_rng(0)
    src = rng.uniform([0, 0], [W, H], size=(200, 2)).astype(np.float32)
    settings = estimation._Settings(0.75, 3.0, 1.0, 30)
    cases = {
        "ok": np.array([[0.9, 0.05, 10.0], [-0.03, 0.95, 5.0], [1e-5, 2e-5, 1.0]]),
        "mirror": np.array([[-1.0, 0.0, W], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
        "collapse": np.diag([0.05, 0.05, 1.0]),
    }
    verdicts = {}
    for name, H_cv in cases.items():
        mapped = src.astype(np.float64) @ H_cv[:, :2].T + H_cv[:, 2]
        dst = (mapped[:, :2] / mapped[:, 2:]).astype(np.float32)
        judged, _ = estimation._verdict(H_cv, src, dst, settings)
        assert judged.inliers == 200, name
        verdicts[name] = judged.status
    assert verdicts == {"ok": "ok", "mirror": "unreliable", "collapse": "unreliable"}


# ------------------------------------------------------------------- repetitive textures
#
# A building facade: a window-like patch cut from a scikit-image photograph, tiled into a grid
# with small per-tile variation (gain, noise), on a flat plane. Views A and B see the same part
# of it through known homographies at 256 px; view C sees another part (no overlap with A).
# Samples: the same facade with a few pixels of placement jitter and camera noise.

FACADE_SIZE = 256
FACADE_PERIOD = 40  # plane px between windows (about 20 px in the views)


def facade_plane() -> np.ndarray:
    rng = np.random.default_rng(7)
    patch = cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2GRAY)[180:240, 330:390]
    patch = cv2.resize(patch, (26, 30), interpolation=cv2.INTER_AREA).astype(np.float32)
    plane = 170 + rng.normal(0, 3, (640, 1280)).astype(np.float32)
    ph, pw = patch.shape
    for y in range(0, 640, FACADE_PERIOD):
        for x in range(0, 1280, FACADE_PERIOD):
            y0, x0 = y + (FACADE_PERIOD - ph - 4) // 2, x + (FACADE_PERIOD - pw - 4) // 2
            plane[y0 : y0 + ph + 4, x0 : x0 + pw + 4] = 40  # the frame
            tile = patch * rng.uniform(0.9, 1.1) + rng.normal(0, 4, patch.shape)
            plane[y0 + 2 : y0 + 2 + ph, x0 + 2 : x0 + 2 + pw] = tile
    return np.clip(plane, 0, 255).astype(np.uint8)


def facade_camera(x0: float, corners) -> np.ndarray:
    """Plane region ``[x0, x0 + 400] x [120, 520]`` -> the view's corners (OpenCV convention)."""
    region = np.float32([[x0, 120], [x0 + 400, 120], [x0 + 400, 520], [x0, 520]])
    return cv2.getPerspectiveTransform(region, np.float32(corners)).astype(np.float64)


FACADE_CAMERAS = {
    "A": facade_camera(120, [[0, 10], [250, 0], [256, 256], [10, 246]]),
    "B": facade_camera(120, [[30, -20], [240, 25], [230, 230], [-10, 276]]),
    "C": facade_camera(700, [[10, 0], [246, 15], [256, 240], [0, 256]]),
}
FACADE_A_TO_B = FACADE_CAMERAS["B"] @ np.linalg.inv(FACADE_CAMERAS["A"])  # OpenCV convention


@pytest.fixture(scope="module")
def facade_samples() -> list[dict[str, np.ndarray]]:
    plane = facade_plane()
    samples = []
    for seed in range(4):
        rng = np.random.default_rng(seed)
        jitter = np.eye(3)
        jitter[:2, 2] = rng.uniform(-6, 6, 2)
        views = {}
        for view, camera in FACADE_CAMERAS.items():
            size = (FACADE_SIZE, FACADE_SIZE)
            image = cv2.warpPerspective(plane, camera @ jitter, size, flags=cv2.INTER_AREA)
            image = image * rng.uniform(0.9, 1.1) + rng.normal(0, 2, image.shape)
            views[view] = np.clip(image, 0, 255).astype(np.uint8)
        samples.append(views)
    return samples


def test_repetitive_facade_is_ok_and_accurate_without_overlap_unreliable(facade_samples):
    lines: list[str] = []
    cache = estimate_homographies(
        facade_samples,
        ["A", "B", "C"],
        category="facade",
        image_size=(FACADE_SIZE, FACADE_SIZE),
        progress=lines.append,
    )
    forward, backward = cache.pairs["A->B"], cache.pairs["B->A"]
    assert forward.status == backward.status == "ok", lines
    # Why a count of 30 rejected it: the ratio test leaves few correct matches on a grid of
    # similar windows (the second-nearest descriptor is the neighbouring window).
    assert min(forward.inliers, backward.inliers) < 30
    H_true = to_pixel_centre(FACADE_A_TO_B)
    points = overlap_points(H_true, (FACADE_SIZE, FACADE_SIZE), step=4)
    error = transfer_error(forward.H, H_true, points)
    assert np.percentile(error, 95) < 1.5, np.percentile(error, 95)
    # C sees other windows of the same facade: every chance fit there is rejected.
    for key in ("A->C", "C->A", "B->C", "C->B"):
        assert cache.pairs[key].status == "unreliable", (key, lines)


@pytest.mark.parametrize("ratio", [estimation.DEFAULT_RATIO, 0.95])
def test_a_fit_shifted_by_one_facade_period_is_unreliable(facade_samples, ratio):
    # The pooled matches of A -> B, as the estimator makes them. A loose ratio test (0.95)
    # keeps many ambiguous matches, so the shifted fit has support of its own (more than the
    # inlier minimum used then), and what rejects it is the truth as its rival.
    pairs = [
        estimation._match(
            estimation.detect_features(s["A"]), estimation.detect_features(s["B"]), ratio
        )
        for s in facade_samples
    ]
    src, dst, mutual = (np.concatenate([p[i] for p in pairs]) for i in range(3))
    samples = np.concatenate([np.full(len(p[0]), k) for k, p in enumerate(pairs)])
    loose = ratio > estimation.DEFAULT_RATIO
    minimum = 8 if loose else estimation.DEFAULT_MIN_INLIERS
    settings = estimation._Settings(ratio, 3.0, 1.0, minimum)
    one_period = np.eye(3)
    one_period[0, 2] = FACADE_PERIOD
    shifted = FACADE_CAMERAS["B"] @ one_period @ np.linalg.inv(FACADE_CAMERAS["A"])
    truth, _ = estimation._verdict(FACADE_A_TO_B, src, dst, settings, samples, mutual)
    alias, reason = estimation._verdict(shifted, src, dst, settings, samples, mutual)
    assert truth.status == "ok"
    assert alias.status == "unreliable", reason
    if loose:
        assert alias.inliers >= minimum and reason.startswith("ambiguous"), reason


def test_support_from_one_sample_only_is_a_chance_fit():
    # Exact correspondences of one homography: spread over four samples, a fit; drawn from a
    # single sample (the other three contribute only unrelated matches), a chance alignment.
    rng = np.random.default_rng(1)
    H_cv = np.array([[0.9, 0.05, 10.0], [-0.03, 0.95, 5.0], [1e-5, 2e-5, 1.0]])
    src = rng.uniform([0, 0], [W, H], size=(240, 2))
    mapped = src @ H_cv[:, :2].T + H_cv[:, 2]
    exact = mapped[:, :2] / mapped[:, 2:]
    noise = rng.uniform([0, 0], [W, H], size=(240, 2))
    settings = estimation._Settings(0.75, 3.0, 1.0, 15)
    spread = np.repeat(np.arange(4), 60)
    first = spread < 1
    dst = np.where(first[:, None], exact, noise)  # sample 0 exact, samples 1-3 unrelated
    alone, reason = estimation._verdict(H_cv, src, dst, settings, spread)
    assert alone.status == "unreliable" and reason.startswith("one sample carries it"), reason
    # Without the sample of each match (one image pair), the same matches are a fit.
    assert estimation._verdict(H_cv, src, dst, settings)[0].status == "ok"
    mixed = np.where((np.arange(240) % 4 == 0)[:, None], exact, noise)  # 15 exact per sample
    assert estimation._verdict(H_cv, src, mixed, settings, spread)[0].status == "ok"
