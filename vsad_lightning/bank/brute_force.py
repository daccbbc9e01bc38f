"""The brute-force exact search: one chunked GEMM per block of queries x bank rows.

How (see also ``vsad_lightning.bank.knn`` for the precision argument):

1. The bank and the queries are centred on the bank mean ``mu`` (distances do not change under
   a common translation). Features after a GELU/GroupNorm stack often share a large common
   offset; centring shrinks the norms that the expansion below has to cancel.
2. For blocks of ``q_chunk`` queries x ``n_chunk`` bank rows, ``|b|^2 - 2 a.b`` comes out of
   ONE matrix product into a preallocated buffer: the queries get an extra column of ones and
   the bank chunk becomes ``[-2 b, |b|^2]``, so the norms are added inside the GEMM rather than
   by extra passes over the block (``|a|^2`` is constant per query, so it does not change the
   argmin and is never added). A running (value, index) minimum is kept across bank chunks.
   The block plus the augmented bank chunk stay within ``max_chunk_bytes`` whatever ``Q`` and
   ``N`` are. The bank's norms are cached per bank (``common.bank_stats``).

Cost: ``2 Q N (D + 1)`` flops; extra memory ``max_chunk_bytes + O(Q D)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vsad_lightning.bank.common import bank_stats

_PREFERRED_QUERY_CHUNK = 4096
"""Queries per block when the budget allows: large enough for an efficient GEMM."""

_MIN_BANK_CHUNK = 1024
"""Bank rows per block below which the query chunk is shrunk instead (tiny budgets)."""


def chunk_sizes(num_queries: int, num_bank: int, dim: int, max_chunk_bytes: int) -> tuple[int, int]:
    """``(q_chunk, n_chunk)`` with ``4 * n_chunk * (q_chunk + dim + 1) <= max_chunk_bytes``.

    The block of ``q_chunk x n_chunk`` float32 values and the augmented float32 bank chunk of
    ``n_chunk x (dim + 1)`` are the two temporaries that scale with the chunk sizes. At least
    one row of each is always used, so a budget below one row is exceeded by that one row.
    """
    budget = max(1, max_chunk_bytes // 4)  # float32 elements
    dim = dim + 1  # the augmented bank chunk [-2 b, |b|^2]
    q_chunk = min(num_queries, _PREFERRED_QUERY_CHUNK)
    n_chunk = budget // (q_chunk + dim)
    wanted_bank = min(num_bank, _MIN_BANK_CHUNK)
    if n_chunk < wanted_bank:
        # Small budget: keep bank chunks reasonably long and take fewer queries per block.
        q_chunk = max(1, min(q_chunk, budget // (wanted_bank + dim)))
        n_chunk = budget // (q_chunk + dim)
    n_chunk = max(1, min(n_chunk, num_bank))
    if n_chunk == num_bank:
        # The whole bank fits in one chunk: spend the rest of the budget on more queries.
        q_chunk = max(q_chunk, min(num_queries, (budget - num_bank * dim) // num_bank))
    return max(1, q_chunk), n_chunk


def argmin_torch(queries: Tensor, bank: Tensor, max_chunk_bytes: int) -> Tensor:
    """``(Q,)`` index of each query's nearest bank row by the expanded form (module docstring)."""
    num_queries, dim = queries.shape
    num_bank = bank.shape[0]
    q_chunk, n_chunk = chunk_sizes(num_queries, num_bank, dim, max_chunk_bytes)
    stats = bank_stats(bank)
    device = queries.device
    # Augmented operands: [a - mu, 1] . [-2 (b - mu), |b - mu|^2] = |b|^2 - 2 a.b (centred).
    augmented_queries = torch.ones(num_queries, dim + 1, device=device)
    torch.sub(queries.float(), stats.mean, out=augmented_queries[:, :dim])
    augmented_bank = torch.empty(n_chunk, dim + 1, device=device)
    best_value = torch.full((num_queries,), math.inf, device=device)
    best_index = torch.zeros(num_queries, dtype=torch.long, device=device)
    block = torch.empty(q_chunk * n_chunk, device=device)
    # Bank chunks outside: each is converted/centred once and then meets every query chunk.
    for n0 in range(0, num_bank, n_chunk):
        rows = bank[n0 : n0 + n_chunk]
        n = rows.shape[0]
        bank_chunk = augmented_bank[:n]
        torch.sub(rows, stats.mean, out=bank_chunk[:, :dim]).mul_(-2.0)
        bank_chunk[:, dim] = stats.centred_sq_norms[n0 : n0 + n]
        for q0 in range(0, num_queries, q_chunk):
            query_chunk = augmented_queries[q0 : q0 + q_chunk]
            q = query_chunk.shape[0]
            scores = block[: q * n].view(q, n)
            torch.mm(query_chunk, bank_chunk.T, out=scores)
            value, index = scores.min(dim=1)
            better = value < best_value[q0 : q0 + q]
            best_value[q0 : q0 + q] = torch.where(better, value, best_value[q0 : q0 + q])
            best_index[q0 : q0 + q] = torch.where(better, index + n0, best_index[q0 : q0 + q])
    return best_index
