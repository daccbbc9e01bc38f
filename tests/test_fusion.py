"""Cross-view fusion of anomaly maps (``vsad_lightning.models.fusion``)."""

from __future__ import annotations

import pytest
import torch

from vsad_lightning.geometry.projection import neighbour_mask
from vsad_lightning.models.fusion import cross_view_support, fuse_maps

SIZE = 32


def _translations(shifts: list[tuple[float, float]]) -> torch.Tensor:
    """``(1, V, V, 3, 3)``: view ``v`` sees the plane shifted by ``shifts[v]``: a plane point
    at ``x`` appears at ``x + shifts[v]``; ``H[v, u]`` translates by ``shifts[u] - shifts[v]``."""
    V = len(shifts)
    H = torch.eye(3).repeat(1, V, V, 1, 1)
    for v in range(V):
        for u in range(V):
            H[0, v, u, 0, 2] = shifts[u][0] - shifts[v][0]
            H[0, v, u, 1, 2] = shifts[u][1] - shifts[v][1]
    return H


def _blob(maps: torch.Tensor, view: int, x: int, y: int, value: float = 5.0) -> None:
    maps[0, view, 0, y - 1 : y + 2, x - 1 : x + 2] = value


def test_a_defect_seen_by_two_views_keeps_its_score_in_both():
    H = _translations([(0, 0), (4, 0), (0, 4)])
    maps = torch.zeros(1, 3, 1, SIZE, SIZE)
    _blob(maps, 0, 10, 10)
    _blob(maps, 1, 14, 10)  # the same plane point, seen by view 1
    fused = fuse_maps(maps, H, neighbour_mask("all", 3), strength=1.0)
    assert fused[0, 0].amax() == pytest.approx(5.0)
    assert fused[0, 1].amax() == pytest.approx(5.0)


def test_a_highlight_in_one_view_is_discounted_where_a_neighbour_sees_the_place():
    H = _translations([(0, 0), (4, 0), (0, 4)])
    maps = torch.zeros(1, 3, 1, SIZE, SIZE)
    _blob(maps, 0, 10, 10)  # views 1 and 2 see this place and show nothing
    for strength, expected in ((1.0, 0.0), (0.5, 2.5), (0.0, 5.0)):
        fused = fuse_maps(maps, H, neighbour_mask("all", 3), strength=strength)
        assert fused[0, 0].amax() == pytest.approx(expected)


def test_a_place_no_neighbour_sees_keeps_its_score():
    # View 1 sees the plane shifted by 20 px: view 0's pixel x = 25 lands at 45, outside it.
    H = _translations([(0, 0), (20, 0)])
    maps = torch.zeros(1, 2, 1, SIZE, SIZE)
    _blob(maps, 0, 25, 10)  # only view 0 sees it
    _blob(maps, 0, 5, 10)  # view 1 sees this place (at x = 25) and shows nothing
    fused = fuse_maps(maps, H, neighbour_mask("all", 2), strength=1.0)
    assert fused[0, 0, 0, 10, 25] == pytest.approx(5.0)
    assert fused[0, 0, 0, 10, 5] == pytest.approx(0.0)
    _, covered = cross_view_support(maps, H, neighbour_mask("all", 2))
    assert not covered[0, 0, 0, 10, 25] and covered[0, 0, 0, 10, 5]


def test_pairs_outside_the_neighbour_mask_neither_confirm_nor_discount():
    H = _translations([(0, 0), (4, 0), (0, 4)])
    maps = torch.zeros(1, 3, 1, SIZE, SIZE)
    _blob(maps, 0, 10, 10)
    _blob(maps, 2, 10, 14)  # confirms view 0 -- but 0 and 2 are not neighbours below
    mask = torch.tensor([[False, True, False], [True, False, True], [False, True, False]])
    fused = fuse_maps(maps, H, mask, strength=1.0)
    assert fused[0, 0].amax() == pytest.approx(0.0)  # view 1 sees the place, shows nothing
    fused_all = fuse_maps(maps, H, neighbour_mask("all", 3), strength=1.0)
    assert fused_all[0, 0].amax() == pytest.approx(5.0)
    no_neighbours = fuse_maps(maps, H, torch.zeros(3, 3, dtype=torch.bool), strength=1.0)
    assert torch.equal(no_neighbours, maps)


def test_fusion_never_raises_a_score_and_is_equivariant_to_view_order():
    gen = torch.Generator().manual_seed(0)
    H = _translations([(0, 0), (3, 1), (-2, 4), (1, -3)])
    maps = torch.rand(1, 4, 1, SIZE, SIZE, generator=gen)
    mask = neighbour_mask("ring", 4)
    fused = fuse_maps(maps, H, mask, strength=0.7)
    assert (fused <= maps + 1e-6).all() and (fused < maps - 1e-3).any()
    perm = torch.tensor([2, 0, 3, 1])
    fused_perm = fuse_maps(maps[:, perm], H[:, perm][:, :, perm], mask[perm][:, perm], 0.7)
    torch.testing.assert_close(fused_perm, fused[:, perm])


def test_bad_arguments_are_refused():
    maps = torch.zeros(1, 2, 1, 8, 8)
    with pytest.raises(ValueError, match="strength"):
        fuse_maps(maps, _translations([(0, 0), (1, 0)]), neighbour_mask("all", 2), 1.5)
    with pytest.raises(ValueError, match="anomaly maps"):
        fuse_maps(maps[:, :, 0], _translations([(0, 0), (1, 0)]), neighbour_mask("all", 2))
