"""Per-sample homographies (``geometry.per_sample``, ``vsad-homography --per-sample``).

The synthetic pair: one photograph seen by two cameras (``CAM_A``, ``CAM_B``: perspective maps
from the photograph to each 160 px view, OpenCV convention). The second view has another
exposure, a shading gradient and a specular highlight. The sample's true homography is
``CAM_B CAM_A^-1`` (converted to pixel-centre coordinates); the category prior is that truth
disturbed by about 2 px, as a hand-placed part disturbs it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from skimage import data as skdata

from vsad_lightning.cli.homography import main as homography_main
from vsad_lightning.data.synthetic import TRUTH_DIR
from vsad_lightning.errors import DataError
from vsad_lightning.geometry.cache import HomographyCache, PairEstimate
from vsad_lightning.geometry.estimation import (
    detect_features,
    estimate_pair_from_features,
    transfer_error,
)
from vsad_lightning.geometry.per_sample import (
    SAMPLE_STATUSES,
    SampleHomographies,
    SampleHomographyFile,
    estimate_sample_homographies,
    graph_pairs,
)
from vsad_lightning.geometry.projection import from_opencv_convention

GRAFFITI = Path(__file__).parent / "data" / "graffiti"
SIZE = 160
PHOTO = 320  # side of the photograph both cameras look at
CAM_A = cv2.getPerspectiveTransform(
    np.float32([[0, 0], [PHOTO, 0], [PHOTO, PHOTO], [0, PHOTO]]),
    np.float32([[-12, -8], [170, -4], [166, 172], [-6, 168]]),
).astype(np.float64)
CAM_B = cv2.getPerspectiveTransform(
    np.float32([[0, 0], [PHOTO, 0], [PHOTO, PHOTO], [0, PHOTO]]),
    np.float32([[-2, -20], [184, 6], [158, 178], [-16, 150]]),
).astype(np.float64)


CAM_C = cv2.getPerspectiveTransform(
    np.float32([[0, 0], [PHOTO, 0], [PHOTO, PHOTO], [0, PHOTO]]),
    np.float32([[-18, 4], [160, -14], [176, 160], [0, 174]]),
).astype(np.float64)


def pixel_centre(H_cv: np.ndarray) -> np.ndarray:
    H = from_opencv_convention(torch.from_numpy(H_cv)).numpy()
    return H / H[2, 2]


def photograph() -> np.ndarray:
    image = cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2GRAY)
    return cv2.resize(image, (PHOTO, PHOTO), interpolation=cv2.INTER_AREA).astype(np.float32)


def render(camera: np.ndarray, photo: np.ndarray) -> np.ndarray:
    """Supersampled perspective view (2x, then area-averaged: exact in pixel centres)."""
    S2 = np.diag([2.0, 2.0, 1.0])
    T, T_inv = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1.0]]), np.eye(3)
    T_inv[:2, 2] = -0.5
    big = cv2.warpPerspective(
        photo, T_inv @ S2 @ T @ camera, (2 * SIZE, 2 * SIZE), flags=cv2.INTER_LINEAR
    )
    return cv2.resize(big, (SIZE, SIZE), interpolation=cv2.INTER_AREA)


def to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(np.clip(np.round(gray), 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def disturbed(H: np.ndarray, degrees: float, shift: tuple[float, float]) -> np.ndarray:
    """``H`` followed by a rotation about the view centre and a shift (a hand placement)."""
    angle, c = np.deg2rad(degrees), SIZE / 2
    cos, sin = np.cos(angle), np.sin(angle)
    R = np.array(
        [
            [cos, -sin, c - c * cos + c * sin + shift[0]],
            [sin, cos, c - c * sin - c * cos + shift[1]],
            [0, 0, 1.0],
        ]
    )
    return R @ H


@pytest.fixture(scope="module")
def sample():
    """``(images, prior, H_true)`` of the two-view sample described in the module docstring."""
    photo = photograph()
    view_a = render(CAM_A, photo)
    # Another exposure, a shading gradient and a specular highlight in view B.
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    highlight = 90.0 * np.exp(-((xs - 0.62) ** 2 + (ys - 0.35) ** 2) / (2 * 0.08**2))
    view_b = render(CAM_B, photo) * (1.25 + 0.3 * (xs - 0.5)) + 12 + highlight
    rng = np.random.default_rng(0)
    images = {
        "C1": to_rgb(view_a + rng.normal(0, 1.2, view_a.shape)),
        "C2": to_rgb(view_b + rng.normal(0, 1.2, view_b.shape)),
    }
    H_true = pixel_centre(CAM_B @ np.linalg.inv(CAM_A))
    # The prior: the truth after a 1.5 deg rotation about the view centre and a shift.
    H_prior = disturbed(H_true, 1.5, (1.5, -1.0))
    prior = HomographyCache(
        category="pair",
        image_size=(SIZE, SIZE),
        views=["C1", "C2"],
        pairs={
            "C1->C2": PairEstimate(H_prior.tolist(), 100, 1.0, 0.5),
            "C2->C1": PairEstimate(np.linalg.inv(H_prior).tolist(), 100, 1.0, 0.5),
        },
    )
    return images, prior, H_true


def test_graph_pairs_drop_unreliable_pairs_both_ways_unless_bridged():
    views = ["C1", "C2", "C3", "C4", "C5"]
    ok = PairEstimate(np.eye(3).tolist(), 100, 1.0, 0.5)
    bad = PairEstimate(np.eye(3).tolist(), 3, 0.1, 2.0, status="unreliable")
    pairs = {f"{s}->{d}": ok for s in views for d in views if s != d}
    pairs["C2->C3"] = bad  # one bad direction: the pair is unreliable both ways
    prior = HomographyCache(category="x", image_size=(64, 64), views=views, pairs=pairs)
    ring = {("C2", "C3"), ("C3", "C4"), ("C4", "C5"), ("C5", "C2")}
    top = {("C1", v) for v in views[1:]}
    everything = {p for s, d in ring | top for p in ((s, d), (d, s))}
    assert len(everything) == 16

    reduced = graph_pairs(prior, views, "top_and_ring", bridged=False)
    assert set(reduced) == everything - {("C2", "C3"), ("C3", "C2")}
    assert reduced == sorted(reduced, key=lambda p: (views.index(p[0]), views.index(p[1])))
    assert set(graph_pairs(prior, views, "top_and_ring", bridged=True)) == everything  # via C1

    for view in views:  # every pair of C3 unreliable: no view bridges to it
        if view != "C3":
            pairs[f"C3->{view}"] = pairs[f"{view}->C3"] = bad
    bridged = graph_pairs(prior, views, "top_and_ring", bridged=True)
    assert set(bridged) == {p for p in everything if "C3" not in p}


def test_pair_unreliable_in_the_cache_is_bridged_through_a_third_view(sample):
    images, _, H_true = sample
    photo = photograph()
    images = {**images, "C3": to_rgb(render(CAM_C, photo))}
    H_13 = pixel_centre(CAM_C @ np.linalg.inv(CAM_A))
    H_32 = H_true @ np.linalg.inv(H_13)
    prior_13, prior_32 = disturbed(H_13, 1.0, (1.0, -1.5)), disturbed(H_32, -1.2, (-1.0, 1.0))
    entry = lambda H: PairEstimate(H.tolist(), 100, 1.0, 0.5)  # noqa: E731
    unreliable = PairEstimate(np.eye(3).tolist(), 3, 0.1, 2.0, status="unreliable")
    prior = HomographyCache(
        category="triple",
        image_size=(SIZE, SIZE),
        views=["C1", "C2", "C3"],
        pairs={
            "C1->C2": unreliable,
            "C2->C1": unreliable,
            "C1->C3": entry(prior_13),
            "C3->C1": entry(np.linalg.inv(prior_13)),
            "C3->C2": entry(prior_32),
            "C2->C3": entry(np.linalg.inv(prior_32)),
        },
    )

    estimate = estimate_sample_homographies(images, prior, [("C1", "C2"), ("C2", "C1")])
    assert list(estimate.H) == ["C1->C2", "C2->C1"]  # the bridge's legs are not returned
    assert estimate.status["C1->C2"] == "refined"
    assert median_error(estimate.H["C1->C2"], H_true) < 0.15
    # Without the refinement: the sample's two legs composed.
    composed = estimate_sample_homographies(images, prior, [("C1", "C2")], refine=False)
    assert composed.status["C1->C2"] == "composed"
    assert median_error(composed.H["C1->C2"], H_true) < 1.0
    # No bridge (the third view absent): the cache's identity, marked unreliable.
    lone = estimate_sample_homographies(
        {"C1": images["C1"], "C2": images["C2"]}, prior, [("C1", "C2")]
    )
    assert lone.status == {"C1->C2": "unreliable"}
    np.testing.assert_array_equal(lone.H["C1->C2"], np.eye(3))


def overlap_points(H_true: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Source pixel centres (every 2 px) whose true image lies inside the target view."""
    ys, xs = np.mgrid[0:size:2, 0:size:2]
    points = np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], axis=1).astype(np.float64)
    mapped = points @ H_true[:, :2].T + H_true[:, 2]
    projected = mapped[:, :2] / mapped[:, 2:]
    inside = np.all((projected >= 0) & (projected <= size), axis=1) & (mapped[:, 2] > 0)
    return points[inside]


def median_error(H, H_true) -> float:
    return float(np.median(transfer_error(H, H_true, overlap_points(H_true))))


def test_refined_estimate_beats_prior_and_plain_fit(sample):
    images, prior, H_true = sample
    timings: dict[str, float] = {}
    estimate = estimate_sample_homographies(images, prior, [("C1", "C2")], timings=timings)

    assert estimate.image_size == (SIZE, SIZE)
    assert list(estimate.H) == ["C1->C2"]
    assert estimate.status["C1->C2"] == "refined"
    plain = estimate_pair_from_features(
        [detect_features(images["C1"])], [detect_features(images["C2"])], min_inliers=12
    )
    assert plain.status == "ok"
    prior_error = median_error(prior.pairs["C1->C2"].H, H_true)
    plain_error = median_error(plain.H, H_true)
    refined_error = median_error(estimate.H["C1->C2"], H_true)
    assert prior_error > 1.5, prior_error  # the disturbance the estimator has to undo
    assert refined_error < 0.15, refined_error
    assert refined_error < 0.5 * plain_error, (refined_error, plain_error)
    # Without the dense stage the guided matches still beat the prior.
    matched = estimate_sample_homographies(images, prior, [("C1", "C2")], refine=False)
    assert matched.status["C1->C2"] == "matched"
    assert median_error(matched.H["C1->C2"], H_true) < 0.5
    assert set(timings) == {"features", "match", "dense_images", "refine", "total"}


def test_graffiti_photographs_refined_beyond_the_plain_fit():
    # Real photographs (tests/data/graffiti, Oxford ground truth): a 40 degree viewpoint
    # change, a kerb off the wall's plane, 800x640 px. The prior: the truth disturbed by
    # 1 degree and a few pixels (about 6 px median), as a hand placement would.
    graf1 = cv2.imread(str(GRAFFITI / "graf1.png"), cv2.IMREAD_COLOR)[..., ::-1].copy()
    graf3 = cv2.imread(str(GRAFFITI / "graf3.png"), cv2.IMREAD_COLOR)[..., ::-1].copy()
    storage = cv2.FileStorage(str(GRAFFITI / "H1to3p.xml"), cv2.FILE_STORAGE_READ)
    H_true = pixel_centre(storage.getNode("H13").mat())
    storage.release()
    angle, centre = np.deg2rad(1.0), np.array([400.0, 320.0])
    R = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    D = np.eye(3)
    D[:2, :2], D[:2, 2] = R, centre + np.array([4.0, -3.0]) - R @ centre
    H_prior = D @ H_true
    prior = HomographyCache(
        category="graffiti",
        image_size=(800, 640),
        views=["C1", "C2"],
        pairs={
            "C1->C2": PairEstimate(H_prior.tolist(), 100, 1.0, 0.5),
            "C2->C1": PairEstimate(np.linalg.inv(H_prior).tolist(), 100, 1.0, 0.5),
        },
    )
    ys, xs = np.mgrid[0:640:4, 0:800:4]
    grid = np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], axis=1).astype(np.float64)
    mapped = grid @ H_true[:, :2].T + H_true[:, 2]
    projected = mapped[:, :2] / mapped[:, 2:]
    points = grid[np.all((projected >= 0) & (projected <= [800, 640]), axis=1)]

    def error(H) -> float:
        return float(np.median(transfer_error(H, H_true, points)))

    estimate = estimate_sample_homographies({"C1": graf1, "C2": graf3}, prior, [("C1", "C2")])
    plain = estimate_pair_from_features([detect_features(graf1)], [detect_features(graf3)])

    assert plain.status == "ok"
    assert error(H_prior) > 4.0
    assert estimate.status["C1->C2"] == "refined"
    assert error(estimate.H["C1->C2"]) < 0.35, error(estimate.H["C1->C2"])
    assert error(estimate.H["C1->C2"]) < 0.75 * error(plain.H), error(plain.H)


def test_reverse_direction_is_the_exact_inverse(sample):
    images, prior, H_true = sample
    estimate = estimate_sample_homographies(images, prior)  # default: both reliable pairs

    assert sorted(estimate.H) == ["C1->C2", "C2->C1"]
    assert estimate.status["C1->C2"] == estimate.status["C2->C1"] == "refined"
    product = estimate.H["C2->C1"] @ estimate.H["C1->C2"]
    np.testing.assert_allclose(product / product[2, 2], np.eye(3), atol=1e-9)
    assert median_error(estimate.H["C2->C1"], np.linalg.inv(H_true)) < 0.2


def test_uninformative_view_falls_back_to_the_prior(sample):
    images, prior, _ = sample
    flat = {"C1": images["C1"], "C2": np.full_like(images["C2"], 128)}

    estimate = estimate_sample_homographies(flat, prior)

    assert estimate.status == {"C1->C2": "prior", "C2->C1": "prior"}
    np.testing.assert_allclose(estimate.H["C1->C2"], np.asarray(prior.pairs["C1->C2"].H))
    inverse = np.linalg.inv(prior.pairs["C1->C2"].H)
    np.testing.assert_allclose(estimate.H["C2->C1"], inverse / inverse[2, 2])


def test_prior_is_rescaled_to_the_images(sample):
    images, prior, H_true = sample
    small = {v: cv2.resize(im, (SIZE // 2, SIZE // 2), interpolation=cv2.INTER_AREA)
             for v, im in images.items()}  # fmt: skip
    estimate = estimate_sample_homographies(small, prior, [("C1", "C2")], match=False)
    S = np.diag([0.5, 0.5, 1.0])
    H_small = S @ H_true @ np.linalg.inv(S)
    assert estimate.image_size == (SIZE // 2, SIZE // 2)
    points = overlap_points(H_true)[::4] / 2
    assert np.median(transfer_error(estimate.H["C1->C2"], H_small, points)) < 0.3


def test_cli_per_sample_writes_the_documented_json(
    synthetic_root_cached, synthetic_spec, tmp_path, capsys
):
    out = tmp_path / "per_sample.json"
    size = str(synthetic_spec.image_size)
    args = ["--root", str(synthetic_root_cached), "--category", synthetic_spec.category]
    args += ["--resolution", size, "--per-sample", "--split", "test", "--out", str(out)]
    assert homography_main(args) == 0
    printed = capsys.readouterr().out
    assert "ms per sample" in printed and str(out) in printed

    document = json.loads(out.read_text())
    assert document["image_size"] == [synthetic_spec.image_size] * 2
    ids = sorted(document["samples"])
    assert len(ids) == synthetic_spec.samples_test
    assert all(re.fullmatch(rf"{synthetic_spec.category}_\d{{4}}_(OK|NG)", i) for i in ids)
    # top_and_ring over C1..C5: C1<->C2..C5 and the side ring, both directions (16 pairs).
    expected = {f"C1->C{k}" for k in range(2, 6)} | {f"C{k}->C1" for k in range(2, 6)}
    expected |= {f"C{k}->C{(k - 1) % 4 + 2}" for k in range(2, 6)}
    expected |= {f"C{(k - 1) % 4 + 2}->C{k}" for k in range(2, 6)}
    truth = HomographyCache.load(
        synthetic_root_cached / TRUTH_DIR / f"{synthetic_spec.category}.json"
    )
    for pairs in document["samples"].values():
        assert set(pairs) == expected
        for key, pair in pairs.items():
            assert pair["status"] in SAMPLE_STATUSES
            assert np.asarray(pair["H"]).shape == (3, 3)
            # The simple rig's samples share the category's (true, here prior) homographies:
            # the per-sample estimate must stay on them.
            H_true = np.asarray(truth.pairs[key].H)
            points = overlap_points(H_true, synthetic_spec.image_size)
            assert np.median(transfer_error(pair["H"], H_true, points)) < 0.5, key

    reloaded = SampleHomographyFile.load(out)
    assert reloaded.image_size == (synthetic_spec.image_size,) * 2
    first = reloaded.get(ids[0], str(out))
    assert isinstance(first, SampleHomographies)
    np.testing.assert_array_equal(first.H["C1->C2"], document["samples"][ids[0]]["C1->C2"]["H"])
    assert reloaded.to_json() == document
    with pytest.raises(DataError, match="no homographies for sample 'nope'"):
        reloaded.get("nope", str(out))


GOOD_PAIR = {"H": np.eye(3).tolist(), "status": "refined"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        (json.dumps([1, 2]), "expected a JSON object"),
        (json.dumps({"samples": {}}), "missing key 'image_size'"),
        (json.dumps({"image_size": [64], "samples": {}}), "'image_size' must be"),
        (json.dumps({"image_size": [64, 64], "samples": []}), "'samples' must be an object"),
        (
            json.dumps({"image_size": [64, 64], "samples": {"s": {"C1C2": GOOD_PAIR}}}),
            "sample 's' pair 'C1C2': the key must be",
        ),
        (
            json.dumps({"image_size": [64, 64], "samples": {"s": {"C1->C2": {"H": [[1, 0]]}}}}),
            "'H' must be 3x3",
        ),
        (
            json.dumps(
                {"image_size": [64, 64], "samples": {"s": {"C1->C2": {"H": [[0] * 3] * 3}}}}
            ),
            "'H' is singular",
        ),
        (
            json.dumps(
                {"image_size": [64, 64], "samples": {"s": {"C1->C2": {**GOOD_PAIR, "status": "x"}}}}
            ),
            "status 'x' not in",
        ),
    ],
)
def test_malformed_per_sample_file_is_one_clear_data_error(tmp_path, content, message):
    path = tmp_path / "per_sample.json"
    path.write_text(content)
    with pytest.raises(DataError) as caught:
        SampleHomographyFile.load(path)
    text = str(caught.value)
    assert message in text, text
    assert str(path) in text and "\n" not in text


def test_file_without_status_reads_like_the_synthetic_truth(tmp_path):
    path = tmp_path / "truth.json"
    H = [[1.0, 0.0, 2.0], [0.0, 1.0, -1.0], [0.0, 0.0, 1.0]]
    path.write_text(
        json.dumps({"image_size": [64, 48], "samples": {"a_0001_OK": {"C1->C2": {"H": H}}}})
    )
    loaded = SampleHomographyFile.load(path)
    assert loaded.image_size == (64, 48)
    assert loaded.samples["a_0001_OK"].status == {}
    np.testing.assert_array_equal(loaded.samples["a_0001_OK"].H["C1->C2"], H)
