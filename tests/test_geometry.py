"""Homography algebra: scaling between resolutions, projection, neighbour graphs, the cache."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vsad_lightning.errors import DataError
from vsad_lightning.geometry import (
    neighbour_mask,
    pixel_centre_grid,
    project_points,
    scale_homography,
)
from vsad_lightning.geometry.cache import HomographyCache, PairEstimate


def _perspective(dtype=torch.float64) -> torch.Tensor:
    angle = math.radians(12.0)
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor(
        [[1.05 * c, -s, 14.0], [s, 0.95 * c, -9.0], [2e-4, -1.5e-4, 1.0]], dtype=dtype
    )


@pytest.mark.parametrize("factor", [8, 4, 2])
def test_scaled_homography_equals_projecting_then_scaling(factor):
    W, H = 256, 192
    w, h = W // factor, H // factor
    full = _perspective()
    small = scale_homography(full, (W, H), (w, h))
    # Feature-map pixel centres, expressed at full resolution by the exact scaling S^-1.
    points_small = pixel_centre_grid(w, h, dtype=torch.float64)
    points_full = points_small * torch.tensor([W / w, H / h], dtype=torch.float64)
    projected_full, _ = project_points(full, points_full)
    projected_small, _ = project_points(small, points_small)
    expected = projected_full * torch.tensor([w / W, h / H], dtype=torch.float64)
    assert torch.allclose(projected_small, expected, atol=1e-5, rtol=0)
    # float32 homographies keep the same agreement at 1/8 (the code computes in float64).
    small32 = scale_homography(full.float(), (W, H), (w, h))
    got32, _ = project_points(small32.double(), points_small)
    assert (got32 - expected).abs().max() < 1e-3


def test_projection_reports_points_behind_the_camera():
    H = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [-0.01, 0, 1.0]], dtype=torch.float64)
    _, w = project_points(H, torch.tensor([[50.0, 0.0], [150.0, 0.0]], dtype=torch.float64))
    assert w[0] > 0 and w[1] < 0


def test_neighbour_graphs():
    assert neighbour_mask("all", 5).sum() == 20
    ring = neighbour_mask("ring", 5)
    assert ring[0, 1] and ring[0, 4] and not ring[0, 2] and ring.sum() == 10
    top = neighbour_mask("top_and_ring", 5)
    assert top[0, 1:].all() and top[1:, 0].all()  # C1 sees every side view and back
    assert top[1, 2] and top[1, 4] and not top[1, 3]  # C2: C3 and C5 adjacent, not C4
    assert torch.equal(top, top.T) and not top.diagonal().any()
    with pytest.raises(ValueError, match="unknown neighbour graph"):
        neighbour_mask("star", 5)


def _cache(H_c1_c2) -> HomographyCache:
    eye = torch.eye(3).tolist()
    pairs = {
        "C1->C2": PairEstimate(H_c1_c2, 100, 0.8, 0.4),
        "C2->C1": PairEstimate(eye, 5, 0.1, 0.0, "unreliable"),
    }
    return HomographyCache("brick", (128, 96), ["C1", "C2"], pairs)


def test_cache_round_trip_and_unreliable_pairs_use_identity(tmp_path):
    H = _perspective().tolist()
    path = tmp_path / "cache.json"
    _cache(H).save(path)
    loaded = HomographyCache.load(path)
    assert loaded.image_size == (128, 96) and loaded.unreliable_pairs() == ["C2->C1"]
    matrices = loaded.matrices()
    assert torch.allclose(matrices[0, 1].double(), torch.tensor(H, dtype=torch.float64), atol=1e-5)
    assert torch.equal(matrices[1, 0], torch.eye(3))
    assert torch.equal(loaded.matrices(["C2", "C1"])[1, 0], matrices[0, 1])
    with pytest.raises(DataError, match="C9"):
        loaded.matrices(["C1", "C9"])


@pytest.mark.parametrize(
    ("H", "message"),
    [
        ([[float("nan"), 0, 0], [0, 1, 0], [0, 0, 1]], "NaN"),
        ([[1, 2, 0], [2, 4, 0], [0, 0, 0]], "singular"),
    ],
)
def test_cache_rejects_nan_and_singular_homographies(tmp_path, H, message):
    path = tmp_path / "bad.json"
    obj = _cache(torch.eye(3).tolist()).to_json()
    obj["pairs"]["C1->C2"]["H"] = H
    path.write_text(json.dumps(obj))
    with pytest.raises(DataError, match=message) as info:
        HomographyCache.load(path)
    assert str(path) in str(info.value) and "C1->C2" in str(info.value)


def test_cache_with_a_negated_homography_loads_as_the_same_homography(tmp_path):
    # -H maps every point where H does, but its w is negative: left as is, the projection would
    # call every point behind the camera and MVAM and L_r would see no neighbour.
    H = _perspective()
    obj = _cache(H.tolist()).to_json()
    obj["pairs"]["C1->C2"]["H"] = (-H).tolist()
    path = tmp_path / "negated.json"
    path.write_text(json.dumps(obj))
    loaded = HomographyCache.load(path).matrices()[0, 1].double()
    torch.testing.assert_close(loaded, H, rtol=0, atol=1e-6)
    points = pixel_centre_grid(128, 96, dtype=torch.float64)
    _, w = project_points(loaded, points)
    assert (w > 0).all()

    # A pair that sends the source view's centre to infinity is refused by name.
    obj["pairs"]["C1->C2"]["H"] = [[1, 0, 0], [0, 1, 0], [0.01, 0, -0.64]]  # w = 0 at x = 64
    path.write_text(json.dumps(obj))
    with pytest.raises(DataError, match="C1->C2.*centre of the source view to infinity"):
        HomographyCache.load(path)


def test_cache_names_a_missing_pair(tmp_path):
    obj = _cache(torch.eye(3).tolist()).to_json()
    del obj["pairs"]["C2->C1"]
    path = tmp_path / "partial.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(DataError, match="C2->C1"):
        HomographyCache.load(path)
