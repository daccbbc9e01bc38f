"""Exact nearest-neighbour distances: every backend against a float64 brute force."""

from __future__ import annotations

import pytest
import torch

from vsad_lightning.bank import brute_force as brute_force_search
from vsad_lightning.bank import projected
from vsad_lightning.bank.knn import (
    chunk_sizes,
    faiss_available,
    nearest_distance,
    nearest_neighbour,
    projected_search,
    projection_pays,
    resolve_backend,
)

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")


def brute_force(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Reference: float64 distances by direct differences (no norm expansion)."""
    dist = torch.cdist(queries.double(), bank.double(), compute_mode="donot_use_mm_for_euclid_dist")
    return dist.min(dim=1).values


def make_data(seed: int = 0, offset: float = 0.0):
    """A bank with duplicate rows, and queries that are bank rows, near-duplicates and random."""
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(1500, 48, generator=g) + offset
    bank[1000:1100] = bank[:100]  # duplicate rows: the argmin has ties
    exact = bank[200:260].clone()
    near = bank[300:360] + 1e-3 * torch.randn(60, 48, generator=g)
    far = torch.randn(200, 48, generator=g) * 2 + offset
    queries = torch.cat([exact, bank[:40].clone(), near, far])  # first 100 rows are in the bank
    return queries, bank


@pytest.mark.parametrize("backend", ["torch", pytest.param("faiss", marks=needs_faiss)])
def test_matches_brute_force_with_duplicates_and_near_duplicates(backend):
    queries, bank = make_data()
    ours = nearest_distance(queries, bank, backend=backend)
    reference = brute_force(queries, bank)
    assert ours.dtype == torch.float32 and ours.shape == (queries.shape[0],)
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-6)
    # A query that is a bank row is at distance exactly 0, not a rounding residue.
    assert torch.equal(ours[:100], torch.zeros(100))
    assert (ours[100:160] > 0).all()


@pytest.mark.parametrize("backend", ["torch", pytest.param("faiss", marks=needs_faiss)])
def test_exact_when_norms_dwarf_the_distances(backend):
    # A common offset of 300 makes |a|^2 ~ 4e6 while nearest distances are ~1e-3..10: the plain
    # float32 expansion (what torch.cdist does for large inputs) cannot resolve them.
    queries, bank = make_data(seed=1, offset=300.0)
    reference = brute_force(queries, bank)
    naive = torch.cdist(queries, bank).min(dim=1).values.double()
    assert (naive - reference).abs().max() > 1e-2, "the test data no longer stresses precision"
    ours = nearest_distance(queries, bank, backend=backend)
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours[:100], torch.zeros(100))


def test_tiny_chunks_give_identical_results():
    queries, bank = make_data(seed=2)
    default = nearest_neighbour(queries, bank, backend="torch")
    for budget in (100_000, 400_000):  # small query and bank chunks / a few bank chunks
        q_chunk, n_chunk = chunk_sizes(queries.shape[0], bank.shape[0], bank.shape[1], budget)
        assert n_chunk < bank.shape[0]
        chunked = nearest_neighbour(queries, bank, backend="torch", max_chunk_bytes=budget)
        assert torch.equal(chunked[0], default[0]), budget
        # Same nearest row up to duplicated bank rows.
        assert torch.equal(bank[chunked[1]], bank[default[1]]), budget
    # The extreme: one query against one bank row per block.
    assert chunk_sizes(30, 300, bank.shape[1], 1) == (1, 1)
    one_by_one = nearest_distance(queries[:30], bank[:300], backend="torch", max_chunk_bytes=1)
    assert torch.equal(one_by_one, nearest_distance(queries[:30], bank[:300], backend="torch"))


def test_chunk_sizes_respect_the_budget():
    for num_q, num_n, dim, budget in [
        (20480, 1_000_000, 640, 256 * 2**20),
        (20480, 100_000, 960, 256 * 2**20),
        (7, 30, 16, 10**9),
        (5000, 3000, 32, 200_000),
    ]:
        q, n = chunk_sizes(num_q, num_n, dim, budget)
        assert 1 <= q <= num_q and 1 <= n <= num_n
        assert 4 * (q * n + n * dim) <= budget
    # A budget that holds everything uses one block.
    assert chunk_sizes(7, 30, 16, 10**9) == (7, 30)


@needs_faiss
def test_faiss_equals_torch():
    g = torch.Generator().manual_seed(3)
    bank = torch.randn(4000, 96, generator=g).relu()  # non-negative, like post-GELU features
    queries = torch.randn(700, 96, generator=g).relu()
    d_torch = nearest_distance(queries, bank, backend="torch")
    d_faiss = nearest_distance(queries, bank, backend="faiss")
    torch.testing.assert_close(d_faiss, d_torch, rtol=1e-4, atol=0.0)


def test_cache_follows_in_place_changes_of_the_bank():
    # load_state_dict copies into the existing buffer: cached norms must not go stale.
    queries, bank = make_data(seed=4)
    for backend in ["torch"] + (["faiss"] if faiss_available() else []):
        work = bank.clone()
        nearest_distance(queries, work, backend=backend)  # fills the caches
        work.mul_(2.0).add_(0.5)
        torch.testing.assert_close(
            nearest_distance(queries, work, backend=backend).double(),
            brute_force(queries, work),
            rtol=1e-5,
            atol=1e-5,
        )


def test_float16_bank_is_searched_in_float32():
    queries, bank = make_data(seed=5)
    half = bank.half()
    ours = nearest_distance(queries, half, backend="torch")
    assert ours.dtype == torch.float32
    reference = brute_force(queries, half.float())
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-5)
    # Half-precision queries too (features under autocast): the differences are float32.
    both = nearest_distance(queries.half(), half, backend="torch")
    reference = brute_force(queries.half().float(), half.float())
    torch.testing.assert_close(both.double(), reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(both[:100], torch.zeros(100))


def test_bad_inputs_are_rejected():
    bank = torch.randn(10, 4)
    with pytest.raises(ValueError, match="width mismatch"):
        nearest_distance(torch.randn(3, 5), bank)
    with pytest.raises(ValueError, match="no rows"):
        nearest_distance(torch.randn(3, 4), torch.empty(0, 4))
    with pytest.raises(ValueError, match=r"\(Q, D\)"):
        nearest_distance(torch.randn(3), bank)
    with pytest.raises(ValueError, match="backend"):
        nearest_distance(torch.randn(3, 4), bank, backend="annoy")  # type: ignore[arg-type]
    assert nearest_distance(torch.empty(0, 4), bank).shape == (0,)


def test_auto_backend_resolution():
    # faiss only when asked for: the torch search measured faster on the CPU (README).
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "torch"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    # The cluster-pruned search left the package for benchmarks/: the name is refused clearly.
    with pytest.raises(ValueError, match="'projected'"):
        resolve_backend("pruned", torch.device("cpu"))  # type: ignore[arg-type]


# ------------------------------------------------------------------------ projected search
def low_rank_data(seed: int, num_bank: int = 12_000, dim: int = 256, offset: float = 0.0):
    """Rows near a 16-dimensional subspace (a steep spectrum, like the measured features)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(16, dim, generator=g)

    def rows(n: int) -> torch.Tensor:
        return torch.randn(n, 16, generator=g) @ basis + 0.05 * torch.randn(n, dim, generator=g)

    bank = rows(num_bank) + offset
    bank[-200:] = bank[:200]  # duplicate rows: ties
    queries = torch.cat(
        [
            bank[1000:1100].clone(),  # exact bank rows
            bank[2000:2100] + 1e-3 * torch.randn(100, dim, generator=g),  # near-duplicates
            rows(300) + offset,
            3.0 * rows(100) + offset,  # far from everything
        ]
    )
    return queries, bank


@pytest.mark.parametrize("offset", [0.0, 300.0])
def test_projected_search_is_exact_and_compares_few_pairs(offset):
    queries, bank = low_rank_data(seed=10, offset=offset)
    distances, index, compared = projected_search(queries, bank)
    torch.testing.assert_close(distances.double(), brute_force(queries, bank), rtol=1e-5, atol=1e-5)
    assert torch.equal(distances[:100], torch.zeros(100))
    brute_distances, brute_index = nearest_neighbour(queries, bank, backend="torch")
    assert torch.equal(distances, brute_distances)
    assert torch.equal(bank[index], bank[brute_index])
    # 16 + 2 of 256 dimensions searched; the bound must spare almost every full comparison.
    assert projected._projection_index(bank).basis.shape[1] <= 20
    assert compared < 0.01, compared


def test_projected_search_small_budgets_tiny_banks_and_weak_blocks(monkeypatch):
    queries, bank = low_rank_data(seed=11)
    full = nearest_distance(queries, bank, backend="projected")
    assert torch.equal(
        nearest_distance(queries, bank, backend="projected", max_chunk_bytes=200_000), full
    )
    # Every block with a survivor searched by the brute-force expansion instead.
    monkeypatch.setattr(projected, "_SURVIVOR_FALLBACK_FRACTION", 0.0)
    monkeypatch.setattr(projected, "_PROJECTED_BANK_CHUNK", 1000)
    brute_calls = []
    brute = brute_force_search.argmin_torch
    monkeypatch.setattr(
        brute_force_search, "argmin_torch", lambda *a: brute_calls.append(1) or brute(*a)
    )
    torch.testing.assert_close(
        nearest_distance(queries, bank.clone(), backend="projected"), full, rtol=1e-6, atol=0.0
    )
    assert len(brute_calls) > 0
    for rows in (1, 5, 300):
        torch.testing.assert_close(
            nearest_distance(queries, bank[:rows].clone(), backend="projected").double(),
            brute_force(queries, bank[:rows]),
            rtol=1e-5,
            atol=1e-5,
        )


def test_projected_search_falls_back_on_a_flat_spectrum():
    g = torch.Generator().manual_seed(12)
    bank = torch.randn(6000, 64, generator=g)  # isotropic: 99 % of the variance needs ~63 dims
    queries = torch.randn(300, 64, generator=g)
    distances, _, compared = projected_search(queries, bank)
    assert compared == 1.0 and projected._projection_index(bank).basis is None
    assert torch.equal(distances, nearest_distance(queries, bank, backend="torch"))


def test_projected_cache_follows_in_place_changes_and_half_banks():
    queries, bank = low_rank_data(seed=13)
    nearest_distance(queries, bank, backend="projected")
    bank[:6000] = bank[6000:].flip(0) * 2.0 + 0.25
    torch.testing.assert_close(
        nearest_distance(queries, bank, backend="projected").double(),
        brute_force(queries, bank),
        rtol=1e-5,
        atol=1e-5,
    )
    half = bank.half()
    torch.testing.assert_close(
        nearest_distance(queries, half, backend="projected").double(),
        brute_force(queries, half.float()),
        rtol=1e-5,
        atol=1e-5,
    )


def test_auto_takes_the_projected_search_only_where_it_pays(monkeypatch):
    monkeypatch.setattr(projected, "_PROJECTED_MIN_ROWS", 5000)
    queries, steep = low_rank_data(seed=14)
    flat = torch.randn(6000, 64, generator=torch.Generator().manual_seed(15))
    assert projection_pays(steep) and not projection_pays(flat)
    assert not projection_pays(steep[:4000].clone())  # too small to be worth an index
    used = []
    search = projected.argmin_projected
    monkeypatch.setattr(projected, "argmin_projected", lambda *a: used.append(1) or search(*a))
    torch.testing.assert_close(
        nearest_distance(queries, steep).double(), brute_force(queries, steep), rtol=1e-5, atol=1e-5
    )
    assert used == [1]
    nearest_distance(queries[:, :64].contiguous(), flat)
    assert used == [1]  # the flat bank went to the torch search
