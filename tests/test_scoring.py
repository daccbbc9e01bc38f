"""Anomaly maps (upsampling, smoothing, level weights) and the end-to-end batch scoring."""

from __future__ import annotations

import pytest
import torch

from vsad_lightning.bank.knn import nearest_distance
from vsad_lightning.bank.storage import MemoryBank, flatten_features
from vsad_lightning.models.scoring import (
    ScoreOutput,
    anomaly_maps,
    gaussian_kernel_size,
    sample_scores,
    score_features,
    view_scores,
)


def spike(b: int, v: int, h: int, w: int, at: tuple[int, int, int, int]) -> torch.Tensor:
    maps = torch.zeros(b, v, h, w)
    maps[at] = 1.0
    return maps


def test_kernel_size_covers_three_sigma():
    assert gaussian_kernel_size(4.0) == 25
    assert gaussian_kernel_size(1.5) == 11


def test_hot_spot_lands_at_the_right_image_location():
    # Feature cell (y=2, x=5) of an 8x8 map covers image pixels [40, 48) x [16, 24) of a 64x64
    # image; its centre (44.0, 20.0) lies between pixels 43|44 and 19|20 (pixel-centre
    # convention, align_corners=False). align_corners=True would put it at x=45, y=18.
    distances = {3: spike(1, 2, 8, 8, (0, 1, 2, 5))}
    maps = anomaly_maps(distances, image_size=(64, 64), sigma=4.0)
    assert maps.shape == (1, 2, 1, 64, 64)
    assert maps[0, 0].abs().max() == 0  # the other view is untouched
    hot = maps[0, 1, 0]
    y, x = divmod(int(hot.argmax()), 64)
    assert x in (43, 44) and y in (19, 20)
    # Symmetric about the cell centre: the smoothing did not shift it.
    torch.testing.assert_close(hot[:, 44], hot[:, 43])
    torch.testing.assert_close(hot[20], hot[19])
    # Smoothing spreads the peak but keeps its mass (bilinear mass of one cell = 8 * 8 pixels).
    assert hot.max() < 1.0
    torch.testing.assert_close(hot.sum(), torch.tensor(64.0), rtol=1e-3, atol=0.0)


def test_non_square_images_use_w_h_order():
    distances = {0: spike(1, 1, 4, 8, (0, 0, 1, 6))}  # h=4, w=8; cell centre (6.5, 1.5) * 4
    maps = anomaly_maps(distances, image_size=(32, 16), sigma=1.0)  # (W, H) = (32, 16)
    assert maps.shape == (1, 1, 1, 16, 32)
    y, x = divmod(int(maps[0, 0, 0].argmax()), 32)
    assert x in (25, 26) and y in (5, 6)


def test_levels_are_upsampled_summed_and_weighted():
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(2, 3, 4, 4, generator=g)
    fine = torch.rand(2, 3, 8, 8, generator=g)
    size = (32, 32)
    only_coarse = anomaly_maps({2: coarse}, size)
    only_fine = anomaly_maps({3: fine}, size)
    both = anomaly_maps({2: coarse, 3: fine}, size)  # default weights: 1 each
    torch.testing.assert_close(both, only_coarse + only_fine)
    weighted = anomaly_maps({2: coarse, 3: fine}, size, weights={2: 0.25, 3: 2.0})
    torch.testing.assert_close(weighted, 0.25 * only_coarse + 2.0 * only_fine)
    zeroed = anomaly_maps({2: coarse, 3: fine}, size, weights={2: 0.0, 3: 1.0})
    torch.testing.assert_close(zeroed, only_fine)
    with pytest.raises(ValueError, match=r"no weight for levels \[3\]"):
        anomaly_maps({2: coarse, 3: fine}, size, weights={2: 1.0})


def test_sigma_zero_is_plain_bilinear_and_constant_maps_stay_constant():
    flat = torch.full((1, 1, 4, 4), 3.0)
    constant = anomaly_maps({0: flat}, (40, 40))
    torch.testing.assert_close(constant, torch.full((1, 1, 1, 40, 40), 3.0))
    level = torch.rand(1, 1, 4, 4)
    raw = anomaly_maps({0: level}, (16, 16), sigma=0.0)
    expected = torch.nn.functional.interpolate(level, size=(16, 16), mode="bilinear")
    torch.testing.assert_close(raw[:, :, 0], expected)
    with pytest.raises(ValueError, match="too small"):
        anomaly_maps({0: level}, (12, 12), sigma=4.0)


def test_view_and_sample_scores_are_maxima():
    maps = torch.zeros(2, 3, 1, 5, 5)
    maps[0, 1, 0, 2, 3] = 7.0
    maps[1, 2, 0, 0, 0] = 4.0
    maps[1, 0, 0, 4, 4] = 2.0
    views = view_scores(maps)
    assert torch.equal(views, torch.tensor([[0.0, 7.0, 0.0], [2.0, 0.0, 4.0]]))
    assert torch.equal(sample_scores(views), torch.tensor([7.0, 4.0]))


def test_score_features_end_to_end():
    g = torch.Generator().manual_seed(1)
    bank = MemoryBank()
    normal = {
        2: torch.randn(2, 3, 8, 4, 4, generator=g),
        3: torch.randn(2, 3, 4, 8, 8, generator=g),
    }
    for level, feats in normal.items():
        bank.set_level(level, flatten_features(feats))
    # Test features: the normal ones, except one position of view 1 of sample 1 at level 3.
    test = {level: feats.clone() for level, feats in normal.items()}
    test[3][1, 1, :, 6, 2] += 5.0
    out = score_features(bank, test, image_size=(64, 64), weights={2: 1.0, 3: 1.0}, sigma=4.0)
    assert isinstance(out, ScoreOutput)
    assert out.anomaly_maps.shape == (2, 3, 1, 64, 64)
    assert out.view_scores.shape == (2, 3) and out.sample_scores.shape == (2,)
    # Every untouched position is in the bank: distance exactly 0 everywhere else.
    assert out.anomaly_maps[0].abs().max() == 0
    assert out.anomaly_maps[1, [0, 2]].abs().max() == 0
    # The anomaly lands at feature cell (y=6, x=2) of an 8x8 map on a 64x64 image: (20.0, 52.0).
    hot = out.anomaly_maps[1, 1, 0]
    y, x = divmod(int(hot.argmax()), 64)
    assert x in (19, 20) and y in (51, 52)
    assert out.sample_scores[0] == 0 and out.sample_scores[1] == out.view_scores[1, 1] > 0
    # The peak equals the blurred, upsampled kNN distance of that one position.
    query = test[3][1, 1, :, 6, 2].unsqueeze(0)
    d = nearest_distance(query, bank.bank(3))
    level_map = torch.zeros(2, 3, 8, 8)
    level_map[1, 1, 6, 2] = d
    expected = anomaly_maps({3: level_map}, (64, 64))
    torch.testing.assert_close(out.anomaly_maps, expected)
    with pytest.raises(ValueError, match="no level 4"):
        score_features(bank, {4: normal[3]}, image_size=(64, 64))


def test_sample_score_is_invariant_to_the_order_of_the_views():
    """Reordering the views (features, homographies and neighbour graph together) reorders the
    maps and view scores the same way and leaves the sample score (the max over views) as it
    is, with the global bank and with cross-view fusion."""
    from test_mvam import random_homographies

    from vsad_lightning.geometry.projection import neighbour_mask
    from vsad_lightning.models.fusion import fuse_maps

    g = torch.Generator().manual_seed(5)
    B, V = 3, 5
    bank = MemoryBank()
    bank.set_level(3, flatten_features(torch.randn(4, V, 6, 8, 8, generator=g)))
    test = {3: torch.randn(B, V, 6, 8, 8, generator=g)}
    test[3][1, 3, :, 2:4, 5] += 4.0  # one sample with a clear defect in one view
    H = random_homographies(B, V, g) * 1.0
    H[..., :2, 2] *= 8.0  # a few image pixels of translation at 64 px
    mask = neighbour_mask("top_and_ring", V)
    perm = torch.tensor([3, 0, 4, 2, 1])

    def scores(features, homographies, neighbours):
        out = score_features(bank, features, image_size=(64, 64), sigma=2.0)
        fused = fuse_maps(out.anomaly_maps, homographies, neighbours, strength=0.5)
        per_view = view_scores(fused)
        return fused, per_view, sample_scores(per_view)

    maps, per_view, per_sample = scores(test, H, mask)
    moved = scores({3: test[3][:, perm]}, H[:, perm][:, :, perm], mask[perm][:, perm])
    torch.testing.assert_close(moved[0], maps[:, perm], rtol=0, atol=1e-5)
    torch.testing.assert_close(moved[1], per_view[:, perm], rtol=0, atol=1e-5)
    torch.testing.assert_close(moved[2], per_sample, rtol=0, atol=1e-5)
    # Fusion changed the maps (so its geometry took part), and the defect decides sample 1.
    assert not torch.allclose(maps, score_features(bank, test, (64, 64), sigma=2.0).anomaly_maps)
    assert per_sample[1] == per_view[1, 3] and per_sample[1] > per_sample[[0, 2]].max()
