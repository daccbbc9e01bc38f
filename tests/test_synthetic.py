"""The synthetic generator: exact homographies, consistent defects, determinism, Real-IAD
layout, and homography estimation against the known truth."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from vsad_lightning.data.homographies import ensure_homography_cache
from vsad_lightning.data.realiad import RealIADDataset
from vsad_lightning.data.synthetic import (
    TRUTH_DIR,
    VIEWS,
    Rig,
    SyntheticMultiView,
    generate_category,
    resolve_categories,
    write_synthetic_dataset,
)
from vsad_lightning.errors import DataError
from vsad_lightning.geometry.cache import HomographyCache
from vsad_lightning.geometry.estimation import transfer_error
from vsad_lightning.geometry.projection import neighbour_mask

NEIGHBOURS = neighbour_mask("top_and_ring", 5).numpy()


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def map_points(H: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q = np.c_[points, np.ones(len(points))] @ H.T
    return q[:, :2] / q[:, 2:], q[:, 2]


def pixel_centres(n: int, step: int = 1) -> np.ndarray:
    c = np.arange(0, n, step) + 0.5
    xs, ys = np.meshgrid(c, c)
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def overlap_points(H_vu: np.ndarray, n: int, count: int = 24) -> np.ndarray:
    """A regular grid of view-v pixel centres that land inside view u."""
    grid = pixel_centres(n, max(1, n // count))
    q, w = map_points(H_vu, grid)
    inside = (w > 0) & (q >= 0).all(1) & (q < n).all(1)
    return grid[inside]


def test_true_homographies_are_consistent_and_overlap():
    n = 128
    H = Rig().homographies(n)
    assert H.shape == (5, 5, 3, 3)
    for v in range(5):
        assert np.allclose(H[v, v], np.eye(3))
        for u in range(5):
            round_trip = H[v, u] @ H[u, v]
            assert np.allclose(round_trip / round_trip[2, 2], np.eye(3), atol=1e-9)
            for k in range(5):  # v -> k -> u equals v -> u
                composed = H[k, u] @ H[v, k]
                assert np.allclose(composed / composed[2, 2], H[v, u], atol=1e-9)
    # Every neighbouring pair of top_and_ring overlaps substantially (> 40 %).
    grid = pixel_centres(n)
    for v, u in zip(*np.nonzero(NEIGHBOURS), strict=True):
        fraction = len(overlap_points(H[v, u], n, count=n)) / len(grid)
        assert fraction > 0.4, (VIEWS[v], VIEWS[u], fraction)


def test_defects_are_consistent_across_views_and_some_views_miss_them():
    data = generate_category("gravel", seed=5, image_size=96, samples_train=1, samples_test=16)
    anomalous = [s for s in data.test if s.is_anomalous]
    assert len(anomalous) == 8
    assert {s.anomaly_class for s in anomalous} <= {"HS", "ZW", "QS"}
    assert all(not s.masks for s in data.test if not s.is_anomalous)
    # Real-IAD-like NG samples: the defect is outside some side views' fields of view.
    assert any(len(s.masks) < 5 for s in anomalous)
    for s in anomalous:
        assert "C1" in s.masks  # the top camera sees the whole object
        assert all(m.any() for m in s.masks.values())
        top = s.masks["C1"]
        ys, xs = np.nonzero(top)
        top_centres = np.stack([xs + 0.5, ys + 0.5], axis=1)
        top_grown = cv2.dilate(top.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        for u, view in enumerate(VIEWS[1:], start=1):
            if view not in s.masks:
                # No mask: the defect pixels of C1 land (almost) all outside this view.
                q, _ = map_points(data.homographies[0, u], top_centres)
                assert ((q >= 0).all(1) & (q < 96).all(1)).mean() < 0.1, (s.number, view)
                continue
            # Every defect pixel of the view maps onto C1's defect (C1 sees the whole object).
            ys, xs = np.nonzero(s.masks[view])
            q, _ = map_points(data.homographies[u, 0], np.stack([xs + 0.5, ys + 0.5], axis=1))
            qi = np.clip(np.floor(q).astype(int), 0, 95)
            hit = top_grown[qi[:, 1], qi[:, 0]]
            assert hit.mean() > 0.9, (s.number, view, hit.mean())


def test_warping_is_exact_in_pixel_centre_coordinates():
    """Isolated blobs on the plane land where K_v puts them, to a small fraction of a pixel."""
    n = 96
    gen = SyntheticMultiView("brick", n)
    P = gen.plane_size
    K = gen.plane_to_view()
    # Blob centres off the pixel grid, spread over the object.
    centres = np.array([(a, b) for a in np.linspace(0.3, 0.7, 4) for b in np.linspace(0.3, 0.7, 4)])
    centres = centres * P + np.array([0.37, -0.21])
    ys, xs = np.mgrid[0:P, 0:P] + 0.5
    plane = np.zeros((P, P), np.float32)
    for cx, cy in centres:
        plane += np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * 2.0**2)).astype(np.float32)
    for v in range(5):
        image = gen.warp_plane(plane, v)
        predicted, _ = map_points(K[v], centres)
        errors = []
        for px, py in predicted:
            x0, y0 = int(px), int(py)
            if not (6 <= x0 < n - 6 and 6 <= y0 < n - 6):
                continue
            window = image[y0 - 5 : y0 + 6, x0 - 5 : x0 + 6]
            wy, wx = np.mgrid[y0 - 5 : y0 + 6, x0 - 5 : x0 + 6] + 0.5
            centroid = np.array([(window * wx).sum(), (window * wy).sum()]) / window.sum()
            errors.append(np.linalg.norm(centroid - (px, py)))
        assert len(errors) >= 8, VIEWS[v]
        # A half-pixel convention slip would show as ~0.35-0.7 px.
        assert max(errors) < 0.05, (VIEWS[v], max(errors))


def test_rendering_follows_the_true_homographies():
    """Warp C1 into each view with the true H: the pictures agree up to lighting and noise."""
    n = 96
    data = generate_category("coffee", seed=1, image_size=n, samples_train=1, samples_test=0)
    images = data.train[0].images
    shift = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    for u in range(1, 5):
        H_cv = np.linalg.inv(shift) @ data.homographies[0, u] @ shift
        warped = cv2.warpPerspective(images["C1"], H_cv, (n, n), flags=cv2.INTER_LINEAR)
        valid = cv2.warpPerspective(np.ones((n, n), np.uint8), H_cv, (n, n)) > 0
        valid = cv2.erode(valid.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        a = cv2.cvtColor(warped, cv2.COLOR_RGB2GRAY)[valid].astype(float)
        b = cv2.cvtColor(images[VIEWS[u]], cv2.COLOR_RGB2GRAY)[valid].astype(float)
        correct = np.corrcoef(a, b)[0, 1]
        # One pixel off already decorrelates fine texture noticeably.
        off = cv2.warpAffine(warped, np.float32([[1, 0, 2], [0, 1, 0]]), (n, n))
        shifted = np.corrcoef(cv2.cvtColor(off, cv2.COLOR_RGB2GRAY)[valid].astype(float), b)[0, 1]
        assert correct > 0.8 and correct > shifted + 0.05, (VIEWS[u], correct, shifted)


def test_same_seed_writes_identical_files_and_another_seed_does_not(tmp_path):
    kwargs = dict(image_size=48, samples_train=3, samples_test=4)
    write_synthetic_dataset(tmp_path / "a", "brick,grass", 11, **kwargs)
    write_synthetic_dataset(tmp_path / "b", ["grass", "brick"], 11, **kwargs)
    write_synthetic_dataset(tmp_path / "c", "brick,grass", 12, **kwargs)
    a, b, c = (tree_hashes(tmp_path / x) for x in "abc")
    assert len(a) > 2 * 5 * 7
    assert a == b  # byte-identical, whatever the order the categories are generated in
    assert a != c and set(a) != set(c)  # other pixels and other timestamps


def test_written_layout_is_real_iad(synthetic_root, synthetic_spec):
    root = synthetic_root
    category, n = synthetic_spec.category, synthetic_spec.image_size
    doc = json.loads((root / "realiad_jsons" / f"{category}.json").read_text())
    assert set(doc) == {"meta", "train", "test"}
    assert len(doc["train"]) == 5 * synthetic_spec.samples_train
    assert len(doc["test"]) == 5 * synthetic_spec.samples_test
    entry = doc["test"][0]
    assert set(entry) == {"category", "anomaly_class", "image_path", "mask_path"}
    for e in doc["train"] + doc["test"]:
        path = root / f"realiad_{n}" / category / e["image_path"]
        assert path.suffix == ".jpg" and path.is_file()
        if e["mask_path"]:
            assert e["mask_path"].endswith(".png") and e["anomaly_class"] != "OK"
    # Not grouped by list position: consecutive entries are not the views of one sample.
    first_keys = [Path(e["image_path"]).stem.rsplit("_", 2)[0] for e in doc["train"][:5]]
    assert len(set(first_keys)) > 1
    truth = HomographyCache.load(root / TRUTH_DIR / f"{category}.json")
    assert truth.image_size == (n, n) and truth.views == list(VIEWS)
    assert all(p.status == "ok" for p in truth.pairs.values())
    test = RealIADDataset(root, category, "test", n, homographies=truth)
    assert sum(test.labels) == synthetic_spec.anomalous_test
    sample = test[test.labels.index(1)]
    assert sample.images.shape == (5, 3, n, n)
    assert torch.allclose(sample.homographies, torch.from_numpy(Rig().homographies(n)).float())


def test_generation_defaults():
    # Speed is a benchmark's business, not a test's (about 4 s for these 104 samples on one
    # core, measured; a shared machine makes any wall-clock bound flaky).
    data = generate_category("brick", seed=0)
    assert len(data.train) == 80 and len(data.test) == 24 and data.image_size == 128
    assert sum(s.is_anomalous for s in data.test) == 12


def test_category_names():
    assert resolve_categories(3) == ["brick", "gravel", "coffee"]
    assert resolve_categories("coffee, moon") == ["coffee", "moon"]
    with pytest.raises(DataError, match="unknown synthetic categories"):
        resolve_categories("brick,unicorn")
    with pytest.raises(DataError, match="choose between 1 and"):
        resolve_categories("0")


@pytest.fixture(scope="module")
def root_256(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic_256")
    write_synthetic_dataset(root, ["brick"], 2, image_size=256, samples_train=8, samples_test=2)
    return root


def test_estimated_homographies_match_the_truth(root_256):
    """docs/datasets.md: SIFT + ratio test + pooled MAGSAC on K=8 normal samples."""
    cache = ensure_homography_cache(root_256, "brick", 256, num_samples=8)
    truth = HomographyCache.load(root_256 / TRUTH_DIR / "brick.json")
    assert cache.image_size == (256, 256)
    estimated, true = cache.matrices().numpy(), truth.matrices().numpy()
    medians = {}
    for v, u in zip(*np.nonzero(NEIGHBOURS), strict=True):
        key = f"{VIEWS[v]}->{VIEWS[u]}"
        assert cache.pairs[key].status == "ok", key
        points = overlap_points(true[v, u], 256)
        medians[key] = float(np.median(transfer_error(estimated[v, u], true[v, u], points)))
    print("median transfer error px:", {k: round(m, 3) for k, m in medians.items()})
    assert max(medians.values()) < 1.0, medians
    # The second call loads the file instead of estimating again.
    again = ensure_homography_cache(root_256, "brick", 256, num_samples=8)
    assert (
        again.to_json()
        == HomographyCache.load(root_256 / "vsad_cache" / "homographies_brick_256.json").to_json()
    )
