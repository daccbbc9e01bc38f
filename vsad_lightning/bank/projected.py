"""The exact projected search: a lower bound in the bank's few principal directions prunes rows.

``auto`` takes it for large CPU banks with a steep spectrum (``projection_pays``); see
``argmin_projected`` for the bound and its rounding, benchmarks/results/knn.md for the speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from vsad_lightning.bank import brute_force
from vsad_lightning.bank.common import (
    DEFAULT_MAX_CHUNK_BYTES,
    UNIT_ROUNDOFF,
    bank_stats,
    centred_chunks,
    per_bank,
    search_counting_pairs,
)

_PROJECTION_VARIANCE = 0.99
"""The projected search keeps the leading principal directions that hold this share of the
bank's variance (measured on the real tiny-model banks: 13 of 48, 27 of 64 and 14 of 32
channels). Only the speed depends on it: the bound below holds for any orthonormal basis."""

_MAX_PROJECTED_FRACTION = 0.25
"""If the kept directions (plus the residual and the ones column) exceed this share of ``D``,
the bound costs nearly as much as the search it replaces, so the brute-force search runs."""

_PROJECTED_MIN_ROWS = 65_536
"""``auto`` considers the projected search from this bank size on: below it a search is cheap
anyway and the index (covariance, eigendecomposition, projection) is not worth building."""

_PROJECTION_SAMPLE = 65_536
"""Bank rows (seeded sample) whose covariance gives the principal directions."""

_SEED_ROWS = 16_384
"""Bank rows (seeded sample) whose lowest-bound row gives each query its first upper bound."""

_PROJECTED_BANK_CHUNK = 4096
"""Bank rows per block of the projected search (see ``argmin_projected``)."""

_SURVIVOR_FALLBACK_FRACTION = 0.02
"""When more than this share of a block's (query, row) pairs survive the bound, that block is
searched by the brute-force expansion instead of pair by pair (a weak bound on this data)."""


@dataclass(frozen=True)
class _ProjectionIndex:
    """The projected search's per-bank index, cached like ``bank_stats``.

    ``basis`` is None when the spectrum is too flat for the bound to pay (brute force).
    ``bank_coords`` holds ``[-2 z_b, |z_b|^2]`` with ``z_b = [P^T (b - mu), |residual_b|]``,
    the augmented form of ``brute_force.argmin_torch``, so one GEMM gives ``|z_b|^2 - 2 z_a . z_b``.
    """

    basis: Tensor | None  # (D, r) float32, orthonormal columns
    bank_coords: Tensor | None  # (N, r + 2) float32
    max_coord_sq_norm: float  # max_b |z_b|^2
    max_centred_norm: float  # max_b |b - mu|


_PROJECTION_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _projection_index(bank: Tensor) -> _ProjectionIndex:
    """Principal directions of the bank and every row's coordinates along them.

    The covariance comes from a seeded sample of ``_PROJECTION_SAMPLE`` rows (cost
    ``2 S D^2``); projecting and measuring the residual of all rows costs ``4 N D r``.
    Memory: ``N (r + 2)`` floats.
    """
    return per_bank(_PROJECTION_CACHE, bank, lambda: _build_projection_index(bank))


def _build_projection_index(bank: Tensor) -> _ProjectionIndex:
    stats = bank_stats(bank)
    num_rows, dim = bank.shape
    max_centred_norm = float(stats.centred_sq_norms.max().sqrt())
    generator = torch.Generator().manual_seed(0)
    picked = torch.randperm(num_rows, generator=generator)[:_PROJECTION_SAMPLE].to(bank.device)
    sample = bank[picked].float() - stats.mean
    # float32 products (4x faster than float64 here): the basis only steers the speed, and it
    # is made orthonormal to float64 precision by eigh.
    eigenvalues, eigenvectors = torch.linalg.eigh((sample.T @ sample).double())  # ascending
    del sample
    share = eigenvalues.flip(0).clamp(min=0).cumsum(0)
    share = share / share[-1].clamp(min=torch.finfo(torch.float64).tiny)
    rank = int((share < _PROJECTION_VARIANCE).sum()) + 1
    basis = None
    coords = None
    max_coord_sq_norm = 0.0
    if rank + 2 <= _MAX_PROJECTED_FRACTION * dim:
        basis = eigenvectors.flip(1)[:, :rank].float().contiguous()
        coords = torch.empty(num_rows, rank + 2, device=bank.device)
        for i, centred in centred_chunks(bank, stats.mean):
            n = centred.shape[0]
            z = coords[i : i + n]
            torch.mm(centred, basis, out=z[:, :rank])
            residual = centred - z[:, :rank] @ basis.T
            torch.linalg.vector_norm(residual, dim=1, out=z[:, rank])
            torch.sum(z[:, : rank + 1].square(), dim=1, out=z[:, rank + 1])
        max_coord_sq_norm = float(coords[:, rank + 1].max())
        coords[:, : rank + 1].mul_(-2.0)
    return _ProjectionIndex(
        basis=basis,
        bank_coords=coords,
        max_coord_sq_norm=max_coord_sq_norm,
        max_centred_norm=max_centred_norm,
    )


def projection_pays(bank: Tensor) -> bool:
    """Whether ``auto`` searches this bank with the exact projected search.

    Yes for banks of at least ``_PROJECTED_MIN_ROWS`` rows whose leading principal directions
    (``_PROJECTION_VARIANCE`` of the variance) plus 2 fit in ``_MAX_PROJECTED_FRACTION`` of
    ``D``; the index is then built (and cached) by this call. Measured in
    benchmarks/results/knn.md; the tiny model's own banks (D <= 64) do not qualify.
    """
    return bank.shape[0] >= _PROJECTED_MIN_ROWS and _projection_index(bank).basis is not None


@torch.no_grad()
def projected_search(
    queries: Tensor, bank: Tensor, *, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
) -> tuple[Tensor, Tensor, float]:
    """``nearest_neighbour(backend="projected")`` plus the fraction of (query, row) pairs whose
    full ``D``-dimensional distance was computed (1.0 when it fell back to brute force)."""
    return search_counting_pairs(argmin_projected, queries, bank, max_chunk_bytes)


def argmin_projected(queries: Tensor, bank: Tensor, max_chunk_bytes: int) -> tuple[Tensor, float]:
    """Exact argmin through a lower bound computed in ``r + 1 << D`` dimensions.

    With ``P`` the orthonormal principal directions and ``R x = x - P P^T x`` the residual, the
    two parts of ``a - b`` are orthogonal, so

        |a - b|^2 = |P^T (a - b)|^2 + |R a - R b|^2 >= |z_a - z_b|^2,
        z_x = [P^T (x - mu), |R (x - mu)|]                      (reverse triangle inequality),

    a lower bound that one ``(r + 2)``-wide GEMM gives for a whole block. Per chunk of queries:

    1. Seed: against a seeded sample of ``_SEED_ROWS`` bank rows, each query's lowest-bound row
       is compared directly; its distance ``U`` bounds the query's true minimum from above.
    2. Every bank chunk: one GEMM of bounds and one row minimum; in the rows of the queries
       whose minimum is ``<= U``, the distance of every row whose bound is ``<= U`` is
       computed directly and lowers ``U``. A row with a larger
       bound is strictly farther than a row already compared, so the true nearest row is always
       compared directly.

    Rounding: the bound is lowered by the GEMM expansion's error ``gamma (|z_a|^2 + |z_b|^2)``
    and by ``8 D u (|a - mu| + |b - mu|)`` for the float32 basis and coordinates, and ``U`` is
    raised by the direct distance's ``(D + 2) u``, so every test errs towards comparing more
    rows. The winner is picked by direct distances, so ties aside it is the brute-force row.

    Cost: ``2 Q N (r + 2)`` flops and one pass over each block, instead of ``2 Q N (D + 1)``,
    plus ``4 D`` per compared pair. If a block lets more than ``_SURVIVOR_FALLBACK_FRACTION``
    of its pairs through (a weak bound on this data), its queries meet that bank chunk by the
    brute-force expansion instead. Extra memory: the index (``N (r + 2)`` floats) plus about
    twice ``max_chunk_bytes`` (the block of bounds and the rows of its open queries).

    Returns the argmin and the number of (query, row) pairs compared in ``D`` dimensions.
    """
    index = _projection_index(bank)
    num_queries, dim = queries.shape
    num_bank = bank.shape[0]
    if index.basis is None or index.bank_coords is None:
        return brute_force.argmin_torch(queries, bank, max_chunk_bytes), float(
            num_queries * num_bank
        )
    stats = bank_stats(bank)
    rank = index.basis.shape[1]
    width = rank + 2
    device = queries.device
    # Short bank chunks: a query's rows are gathered only in the chunks whose minimum bound is
    # under its U, and a query meets a row nearer than all rows before it in ~ln(N / seed) chunks
    # (records of a random order), so the gathered volume scales with the chunk length.
    n_chunk = min(num_bank, _PROJECTED_BANK_CHUNK)
    q_chunk = max(1, min(num_queries, max_chunk_bytes // 4 // (n_chunk + width)))
    generator = torch.Generator().manual_seed(0)
    seed_rows = torch.randperm(num_bank, generator=generator)[:_SEED_ROWS].to(device)
    seed_coords = index.bank_coords[seed_rows]
    best_value = torch.full((num_queries,), math.inf, device=device)
    best_index = torch.zeros(num_queries, dtype=torch.long, device=device)
    compared = 0.0
    gamma = 2.0 * (width + 4) * UNIT_ROUNDOFF
    upper_factor = 1.0 + (dim + 2) * UNIT_ROUNDOFF
    block = torch.empty(q_chunk * n_chunk, device=device)
    pair_step = max(1, max_chunk_bytes // (8 * dim))  # gathered query and bank rows
    for q0 in range(0, num_queries, q_chunk):
        centred = queries[q0 : q0 + q_chunk] - stats.mean
        q = centred.shape[0]
        every = torch.arange(q, device=device)
        coords = torch.ones(q, width, device=device)
        torch.mm(centred, index.basis, out=coords[:, :rank])
        residual = centred - coords[:, :rank] @ index.basis.T
        torch.linalg.vector_norm(residual, dim=1, out=coords[:, rank])
        del residual
        coord_sq = coords[:, : rank + 1].square().sum(1)
        slack_sq = gamma * (coord_sq + index.max_coord_sq_norm)
        slack = 8.0 * dim * UNIT_ROUNDOFF * (centred.norm(dim=1) + index.max_centred_norm)
        best_v = best_value[q0 : q0 + q]
        best_i = best_index[q0 : q0 + q]
        # 1. Seed U with the lowest-bound row of the sample (blocks within the budget).
        seed_step = max(1, max_chunk_bytes // (4 * seed_rows.numel()))
        candidate = torch.cat(
            [
                (coords[i : i + seed_step] @ seed_coords.T).argmin(dim=1)
                for i in range(0, q, seed_step)
            ]
        )
        _update_best(centred, every, seed_rows[candidate], bank, stats.mean, best_v, best_i)
        compared += q
        # 2. Every bank chunk: the rows whose bound does not exceed U.
        for n0 in range(0, num_bank, n_chunk):
            bank_coords = index.bank_coords[n0 : n0 + n_chunk]
            n = bank_coords.shape[0]
            scores = block[: q * n].view(q, n)  # bound^2 - |z_a|^2, computed
            torch.mm(coords, bank_coords.T, out=scores)
            threshold = (best_v * upper_factor + slack).square() + slack_sq - coord_sq
            # Most queries have no row under U in a chunk: one reduction finds those that do.
            open_queries = (scores.amin(dim=1) <= threshold).nonzero().squeeze(1)
            if open_queries.numel() == 0:
                continue
            survive = scores[open_queries] <= threshold[open_queries, None]
            pairs = survive.nonzero()
            del survive
            compared += pairs.shape[0]
            if pairs.shape[0] > _SURVIVOR_FALLBACK_FRACTION * q * n:
                # A weak bound here: the open queries meet this chunk by brute force.
                found = brute_force.argmin_torch(
                    queries[q0 + open_queries], bank[n0 : n0 + n], max_chunk_bytes
                )
                _update_best(centred, open_queries, found + n0, bank, stats.mean, best_v, best_i)
                compared += open_queries.numel() * n - pairs.shape[0]
                continue
            for p0 in range(0, pairs.shape[0], pair_step):
                part = pairs[p0 : p0 + pair_step]
                who = open_queries[part[:, 0]]
                _update_best(centred, who, part[:, 1] + n0, bank, stats.mean, best_v, best_i)
    return best_index, compared


def _update_best(
    centred_queries: Tensor,
    who: Tensor,
    rows: Tensor,
    bank: Tensor,
    mean: Tensor,
    best_value: Tensor,
    best_index: Tensor,
) -> None:
    """Direct distances of the pairs ``(who[i], rows[i])``; keep each query's smallest.

    ``centred_queries`` are the queries minus ``mean``; ``best_value``/``best_index`` are
    indexed like them and updated in place.
    """
    distance = torch.linalg.vector_norm(centred_queries[who] - (bank[rows].float() - mean), dim=1)
    # Per query, the smallest new distance and a row that reaches it.
    new_value = torch.full_like(best_value, math.inf).scatter_reduce_(
        0, who, distance, reduce="amin"
    )
    reached = distance == new_value[who]
    new_index = best_index.clone()
    new_index[who[reached]] = rows[reached]
    better = new_value < best_value
    best_value[better] = new_value[better]
    best_index[better] = new_index[better]
