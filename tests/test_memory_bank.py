"""MemoryBank buffers and checkpoints, the feature layout, and greedy k-center coresets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vsad_lightning.bank import coreset, positional
from vsad_lightning.bank.coreset import greedy_coreset
from vsad_lightning.bank.knn import nearest_distance
from vsad_lightning.bank.storage import MemoryBank, flatten_features, unflatten_features


# ----------------------------------------------------------------------------- layout
def test_flatten_orders_rows_b_v_y_x_and_unflatten_inverts_it():
    feats = torch.randn(2, 3, 5, 4, 6)  # (B, V, C, h, w)
    rows = flatten_features(feats)
    assert rows.shape == (2 * 3 * 4 * 6, 5)
    b, v, y, x = 1, 2, 3, 4
    assert torch.equal(rows[((b * 3 + v) * 4 + y) * 6 + x], feats[b, v, :, y, x])
    assert torch.equal(unflatten_features(rows, (2, 3, 4, 6)), feats)
    values = torch.arange(2 * 3 * 4 * 6.0)
    grid = unflatten_features(values, (2, 3, 4, 6))
    assert grid.shape == (2, 3, 4, 6) and grid[b, v, y, x] == ((b * 3 + v) * 4 + y) * 6 + x
    with pytest.raises(ValueError, match="expected 144 rows"):
        unflatten_features(values[:-1], (2, 3, 4, 6))
    with pytest.raises(ValueError, match=r"\(B, V, C, h, w\)"):
        flatten_features(torch.randn(3, 5, 4, 6))


# ----------------------------------------------------------------------------- the bank
def test_empty_bank_then_set_level_registers_buffers():
    bank = MemoryBank()
    assert not bank.is_built() and bank.levels == []
    assert list(bank.state_dict()) == []  # the device anchor is not persistent
    bank.set_level(3, torch.randn(40, 8))
    bank.set_level(2, torch.randn(30, 16))
    assert bank.is_built() and bank.levels == [2, 3]
    assert set(bank.state_dict()) == {"bank_2", "bank_3"}
    assert dict(bank.named_buffers())["bank_3"].shape == (40, 8)
    bank.set_level(3, torch.randn(10, 8))  # replacing a level is allowed
    assert bank.bank(3).shape == (10, 8)
    with pytest.raises(ValueError, match="no level 4"):
        bank.distances(4, torch.randn(2, 8))
    with pytest.raises(ValueError, match="width 8"):
        bank.distances(3, torch.randn(2, 9))
    with pytest.raises(ValueError, match="NaN"):
        bank.set_level(5, torch.tensor([[0.0, float("nan")]]))


def test_distances_are_exact_nearest_distances():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(500, 12, generator=g)
    bank = MemoryBank()
    bank.set_level(1, rows)
    queries = torch.cat([rows[:5], torch.randn(50, 12, generator=g)])
    expected = torch.cdist(queries.double(), rows.double()).min(1).values.float()
    for backend in ("torch", "auto"):
        got = bank.distances(1, queries, backend=backend)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(got[:5], torch.zeros(5))


class Holder(nn.Module):
    """A parent module, as in the LightningModule: state-dict keys get a ``memory_bank.`` prefix."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 3)
        self.memory_bank = MemoryBank()


def test_checkpoint_round_trip_into_fresh_and_differently_sized_banks(tmp_path):
    torch.manual_seed(0)
    source = Holder()
    source.memory_bank.set_level(2, torch.randn(57, 16))
    source.memory_bank.set_level(-1, torch.randn(23, 8))  # negative level ids work too
    path = tmp_path / "bank.pt"
    torch.save(source.state_dict(), path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert {"memory_bank.bank_2", "memory_bank.bank_-1"} <= set(state)

    fresh = Holder()  # empty bank, as after `LitModule(...)` before loading a checkpoint
    fresh.load_state_dict(state, strict=True)
    resized = Holder()  # banks of other sizes already present
    resized.memory_bank.set_level(2, torch.zeros(5, 16))
    resized.memory_bank.set_level(-1, torch.zeros(100, 8))
    resized.load_state_dict(state, strict=True)
    for target in (fresh, resized):
        assert target.memory_bank.levels == [-1, 2]
        for level in (-1, 2):
            assert torch.equal(target.memory_bank.bank(level), source.memory_bank.bank(level))
        queries = torch.randn(9, 16)
        torch.testing.assert_close(
            target.memory_bank.distances(2, queries), source.memory_bank.distances(2, queries)
        )

    # Strict loading still reports what is really missing.
    partial = {k: v for k, v in state.items() if k != "memory_bank.bank_2"}
    built = Holder()
    built.memory_bank.set_level(2, torch.zeros(5, 16))
    with pytest.raises(RuntimeError, match="bank_2"):
        built.load_state_dict(partial, strict=True)


def test_float16_storage_computes_in_float32(tmp_path):
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(300, 24, generator=g)
    half = MemoryBank(dtype=torch.float16)
    half.set_level(0, rows)
    assert half.bank(0).dtype == torch.float16
    queries = torch.randn(40, 24, generator=g)
    got = half.distances(0, queries, backend="torch")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, nearest_distance(queries, rows.half().float()))
    # A float16 checkpoint loads into a default bank as float16 (the saved dtype is kept).
    torch.save(half.state_dict(), tmp_path / "half.pt")
    loaded = MemoryBank()
    loaded.load_state_dict(torch.load(tmp_path / "half.pt", weights_only=True))
    assert loaded.bank(0).dtype == torch.float16
    assert torch.equal(loaded.bank(0), half.bank(0))


# ----------------------------------------------------------------------------- coreset
def test_coreset_ratio_one_is_every_row_untouched():
    feats = torch.randn(77, 10)
    assert torch.equal(greedy_coreset(feats, 1.0), torch.arange(77))


def test_coreset_ratio_tenth_returns_unique_indices_deterministically():
    feats = torch.randn(2000, 200)
    keep = greedy_coreset(feats, 0.1, projection_dim=32, seed=3)
    assert keep.dtype == torch.long and keep.shape == (200,)
    assert keep.unique().numel() == 200 and keep.min() >= 0 and keep.max() < 2000
    assert torch.equal(keep, greedy_coreset(feats, 0.1, projection_dim=32, seed=3))
    assert not torch.equal(keep, greedy_coreset(feats, 0.1, projection_dim=32, seed=4))


@pytest.fixture(params=["plain", "pruned"])
def coreset_method(request, monkeypatch) -> str:
    """Both selections; the pruned one with blocks of ~8 rows, so small sets have many."""
    monkeypatch.setattr(coreset, "BLOCK_ROWS", 8)
    return request.param


def test_coreset_never_repeats_rows_even_when_all_are_duplicates(coreset_method):
    # Large norms: the expansion's rounding makes duplicates' distances slightly negative.
    feats = torch.full((50, 4), 300.0)
    feats[:3] += torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 5.0, 0]])
    keep = greedy_coreset(feats, 0.5, method=coreset_method)
    assert keep.unique().numel() == 25
    assert set(keep[:4].tolist()) >= {0, 1, 2}  # the distinct rows come first


def four_clusters(dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.zeros(4, dim)
    centres[:, :2] = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]])
    labels = torch.arange(4).repeat_interleave(50)
    points = centres[labels] + torch.randn(200, dim, generator=g)
    return points, labels


@pytest.mark.parametrize("dim, projection_dim", [(2, 128), (64, 16)])
def test_four_picks_hit_four_clusters(dim, projection_dim):
    points, labels = four_clusters(dim)
    keep = greedy_coreset(points, 4 / 200, projection_dim=projection_dim)
    assert keep.shape == (4,)
    assert sorted(labels[keep].tolist()) == [0, 1, 2, 3]


def test_each_pick_is_the_farthest_point_from_the_previous_picks(coreset_method):
    # Unprojected (projection_dim >= D): the greedy rule holds exactly.
    g = torch.Generator().manual_seed(5)
    points = torch.rand(300, 3, generator=g)
    keep = greedy_coreset(points, 0.05, projection_dim=128, method=coreset_method)
    dist = torch.cdist(points.double(), points.double())
    for step in range(1, keep.numel()):
        to_selected = dist[:, keep[:step]].min(dim=1).values
        assert to_selected[keep[step]] == pytest.approx(to_selected.max().item(), rel=1e-6)
    # And the covering radius shrinks as the coreset grows.
    radius = [dist[:, keep[:k]].min(1).values.max().item() for k in (2, 5, 15)]
    assert radius[0] > radius[1] > radius[2]


def _insertion_radii(points: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Distance of each pick to the picks before it (the greedy's covering radius so far)."""
    dist = torch.cdist(points.double(), points[keep].double())
    return torch.stack([dist[keep[k], :k].min() for k in range(1, keep.numel())])


def test_pruned_selection_is_the_plain_one(monkeypatch):
    # A decaying spectrum like real features (a few directions hold most of the variance),
    # in blocks of ~16 rows: most blocks are skipped late in the selection, and the picks must
    # still be the plain loop's (the same rows; the same covering radius at every step, which
    # also holds where two equally far rows are taken in the other order).
    g = torch.Generator().manual_seed(7)
    basis = torch.linalg.qr(torch.randn(24, 12, generator=g))[0] * torch.exp(-torch.arange(12) / 3)
    points = torch.randn(4000, 12, generator=g) @ basis.T + 0.01 * torch.randn(
        4000, 24, generator=g
    )
    monkeypatch.setattr(coreset, "BLOCK_ROWS", 16)
    plain = greedy_coreset(points, 0.05, method="plain", seed=2)
    pruned = greedy_coreset(points, 0.05, method="pruned", seed=2)
    assert pruned[0] == plain[0] and set(pruned.tolist()) == set(plain.tolist())
    torch.testing.assert_close(
        _insertion_radii(points, pruned), _insertion_radii(points, plain), rtol=1e-5, atol=0
    )
    # `auto` takes the pruned selection from PRUNED_MIN_ROWS rows (and 100 kept) on.
    monkeypatch.setattr(coreset, "PRUNED_MIN_ROWS", 4000)
    assert torch.equal(greedy_coreset(points, 0.05, seed=2), pruned)
    monkeypatch.setattr(coreset, "PRUNED_MIN_ROWS", 4001)
    assert torch.equal(greedy_coreset(points, 0.05, seed=2), plain)


def test_coreset_rejects_bad_ratio():
    with pytest.raises(ValueError, match="ratio"):
        greedy_coreset(torch.randn(5, 2), 0.0)
    with pytest.raises(ValueError, match="ratio"):
        greedy_coreset(torch.randn(5, 2), 1.5)
    with pytest.raises(ValueError, match="method"):
        greedy_coreset(torch.randn(5, 2), 0.5, method="fast")


def _brute_positional(bank_maps: torch.Tensor, queries: torch.Tensor, radius: int) -> torch.Tensor:
    """Loop-by-loop reference: same view, |dy|, |dx| <= radius, inside the map."""
    batch, views, _, height, width = queries.shape
    out = torch.empty(batch, views, height, width)
    for b in range(batch):
        for v in range(views):
            for y in range(height):
                for x in range(width):
                    ys = slice(max(0, y - radius), min(height, y + radius + 1))
                    xs = slice(max(0, x - radius), min(width, x + radius + 1))
                    cands = bank_maps[:, v, :, ys, xs].permute(0, 2, 3, 1).reshape(-1, 4)
                    out[b, v, y, x] = (cands - queries[b, v, :, y, x]).norm(dim=1).min()
    return out


@pytest.mark.parametrize("cached", [True, False], ids=["cached_layout", "per_call_layout"])
@pytest.mark.parametrize("radius", [0, 1, 2])
def test_positional_distances_equal_a_brute_force_window_search(radius, cached, monkeypatch):
    # A bank over positional.LAYOUT_CACHE_MAX_BYTES builds its position-major operand per call
    # instead of keeping a copy: both paths give the same answer.
    if not cached:
        monkeypatch.setattr(positional, "LAYOUT_CACHE_MAX_BYTES", 0)
    gen = torch.Generator().manual_seed(radius)
    bank_maps = torch.randn(3, 2, 4, 5, 6, generator=gen)  # (n, V, C, h, w)
    queries = torch.randn(2, 2, 4, 5, 6, generator=gen)
    bank = MemoryBank()
    bank.set_level(1, flatten_features(bank_maps), grid=(2, 5, 6))
    expected = _brute_positional(bank_maps, queries, radius)
    got = bank.positional_distances(1, queries, radius)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # A tiny chunk bound splits the bank rows; the answer must not change.
    small = bank.positional_distances(1, queries, radius, max_chunk_bytes=1)
    torch.testing.assert_close(small, expected, rtol=1e-5, atol=1e-5)
    assert (positional.position_major(bank.bank(1), 2 * 5 * 6) is not None) == cached


def test_positional_search_follows_in_place_changes_and_half_banks():
    # The bank's norms are cached per bank tensor: a bank overwritten in place (as
    # load_state_dict does) must not be searched with the old norms; float16 banks are searched
    # without a float32 copy of the whole bank and give the float32 answer of the same rows.
    gen = torch.Generator().manual_seed(5)
    bank_maps = torch.randn(3, 2, 4, 5, 6, generator=gen)
    queries = torch.randn(1, 2, 4, 5, 6, generator=gen)
    bank = MemoryBank()
    bank.set_level(0, flatten_features(bank_maps), grid=(2, 5, 6))
    bank.positional_distances(0, queries, 1)
    bank.bank(0).mul_(3.0).add_(0.5)
    expected = _brute_positional(bank_maps * 3.0 + 0.5, queries, 1)
    torch.testing.assert_close(bank.positional_distances(0, queries, 1), expected)
    half = MemoryBank(dtype=torch.float16)
    half.set_level(0, flatten_features(bank_maps), grid=(2, 5, 6))
    expected = _brute_positional(bank_maps.half().float(), queries, 1)
    torch.testing.assert_close(half.positional_distances(0, queries, 1), expected)


def test_positional_search_finds_a_training_feature_in_its_own_place_exactly():
    bank_maps = torch.randn(4, 2, 8, 6, 6, generator=torch.Generator().manual_seed(0)) * 100
    bank = MemoryBank()
    bank.set_level(0, flatten_features(bank_maps), grid=(2, 6, 6))
    # Large values make the expanded form lose precision; the exact recompute must give 0.
    assert bank.positional_distances(0, bank_maps[2:3], radius=1).abs().max() == 0


def test_positional_search_needs_a_bank_with_positions(tmp_path):
    bank = MemoryBank()
    bank.set_level(0, torch.randn(10, 4))
    with pytest.raises(ValueError, match="coreset_ratio: 1.0"):
        bank.positional_distances(0, torch.randn(1, 1, 4, 2, 5), radius=1)
    with pytest.raises(ValueError, match="not whole feature maps"):
        bank.set_level(0, torch.randn(10, 4), grid=(1, 3, 3))
    # The grid travels in the state dict into a fresh bank.
    bank.set_level(0, torch.randn(18, 4), grid=(1, 3, 3))
    path = tmp_path / "bank.pt"
    torch.save(bank.state_dict(), path)
    fresh = MemoryBank()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert fresh.grid(0) == (1, 3, 3)
    queries = torch.randn(1, 1, 4, 3, 3)
    torch.testing.assert_close(
        fresh.positional_distances(0, queries, 1), bank.positional_distances(0, queries, 1)
    )
