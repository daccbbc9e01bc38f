"""The exact cluster-pruned search (benchmarks/_pruned_search.py) against a float64 brute force.

It lives in benchmarks/ (``auto`` never chose it); these tests keep ``benchmarks/knn.py
--methods pruned`` honest.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from vsad_lightning.bank.knn import nearest_distance, nearest_neighbour

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _pruned_search as pruned  # noqa: E402
from _pruned_search import pruned_search  # noqa: E402


def brute_force(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Reference: float64 distances by direct differences (no norm expansion)."""
    dist = torch.cdist(queries.double(), bank.double(), compute_mode="donot_use_mm_for_euclid_dist")
    return dist.min(dim=1).values


def pruned_distance(queries: torch.Tensor, bank: torch.Tensor, **kwargs) -> torch.Tensor:
    return pruned_search(queries, bank, **kwargs)[0]


def clustered_data(seed: int, num_bank: int = 12_000, dim: int = 32, offset: float = 0.0):
    """Rows around 60 well-separated centres, queries from the same mixture (pruning pays)."""
    g = torch.Generator().manual_seed(seed)
    centres = 6.0 * torch.randn(60, dim, generator=g)
    bank = centres[torch.randint(60, (num_bank,), generator=g)] + torch.randn(
        num_bank, dim, generator=g
    )
    bank += offset
    bank[-200:] = bank[:200]  # duplicate rows: ties
    queries = torch.cat(
        [
            bank[1000:1100].clone(),  # exact bank rows
            bank[2000:2100] + 1e-3 * torch.randn(100, dim, generator=g),  # near-duplicates
            centres[torch.randint(60, (300,), generator=g)]
            + torch.randn(300, dim, generator=g)
            + offset,
            8.0 * torch.randn(100, dim, generator=g) + offset,  # far from everything
        ]
    )
    return queries, bank


@pytest.mark.parametrize("offset", [0.0, 300.0])
def test_pruned_search_is_exact_and_prunes_clustered_banks(monkeypatch, offset):
    # Small clusters so a 12k-row bank gets ~47 of them, as a 1e6-row one gets ~490.
    monkeypatch.setattr(pruned, "_ROWS_PER_CLUSTER", 256)
    queries, bank = clustered_data(seed=6, offset=offset)
    distances, index, visited = pruned_search(queries, bank)
    reference = brute_force(queries, bank)
    torch.testing.assert_close(distances.double(), reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(distances[:100], torch.zeros(100))
    # The same nearest row as brute force, up to duplicated bank rows.
    brute_distances, brute_index = nearest_neighbour(queries, bank, backend="torch")
    assert torch.equal(distances, brute_distances)
    assert torch.equal(bank[index], bank[brute_index])
    # The bounds must remove most of the work on clustered rows, or the method is pointless.
    assert visited < 0.3, visited


def test_pruned_search_small_budget_and_tiny_banks(monkeypatch):
    monkeypatch.setattr(pruned, "_ROWS_PER_CLUSTER", 256)
    queries, bank = clustered_data(seed=7)
    full = pruned_distance(queries, bank)
    small = pruned_distance(queries, bank, max_chunk_bytes=200_000)
    assert torch.equal(full, small)
    for rows in (1, 5, 300):  # one cluster, one row
        torch.testing.assert_close(
            pruned_distance(queries, bank[:rows]).double(),
            brute_force(queries, bank[:rows]),
            rtol=1e-5,
            atol=1e-5,
        )


def test_pruned_search_falls_back_on_unclustered_rows():
    # Gaussian rows in 64 dimensions: the triangle bounds prune nothing, so the chunk is
    # searched by brute force (visited fraction 1) with the same result.
    g = torch.Generator().manual_seed(8)
    bank = torch.randn(6000, 64, generator=g)
    queries = torch.randn(300, 64, generator=g)
    distances, _, visited = pruned_search(queries, bank)
    assert visited == 1.0
    assert torch.equal(distances, nearest_distance(queries, bank, backend="torch"))


def test_pruned_cache_follows_in_place_changes(monkeypatch):
    monkeypatch.setattr(pruned, "_ROWS_PER_CLUSTER", 256)
    queries, bank = clustered_data(seed=9)
    pruned_distance(queries, bank)
    bank[:6000] = bank[6000:].flip(0) + 0.25  # moves rows between clusters
    torch.testing.assert_close(
        pruned_distance(queries, bank).double(),
        brute_force(queries, bank),
        rtol=1e-5,
        atol=1e-5,
    )
