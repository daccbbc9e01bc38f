"""What every exact bank search shares: input checks, per-bank cached statistics, and the direct
distance of the winning rows.

Every search in this package (``brute_force``, ``projected``, ``faiss_flat``, ``positional``)
picks each query's nearest bank row by some fast but rounded criterion, then returns
``|| a - bank[index] ||`` computed directly (``exact_distance``), so the value is exact to float32
rounding for the chosen row (see ``vsad_lightning.bank.knn``).

Per-bank constants (the mean, the centred squared norms, an index) are computed once per bank
tensor and cached by its identity, invalidated by its in-place version counter (``per_bank``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

_T = TypeVar("_T")

DEFAULT_MAX_CHUNK_BYTES = 256 * 2**20
"""Bound on the temporary (query chunk x bank chunk) distance block and the augmented bank chunk."""

ROW_CHUNK = 16384
"""Rows per step for the bank statistics, the faiss index copy and the exact recomputation.

Fixed (not derived from ``max_chunk_bytes``) so the cached statistics, hence the results, do not
depend on the chunking of the call that first computed them."""

UNIT_ROUNDOFF = 2.0**-24
"""float32 unit roundoff ``u``."""


def check_inputs(queries: Tensor, bank: Tensor, max_chunk_bytes: int) -> None:
    """One clear ``ValueError`` for shapes, dtypes, devices or budgets a search cannot take."""
    if queries.dim() != 2 or bank.dim() != 2:
        raise ValueError(
            f"nearest_distance expects queries (Q, D) and bank (N, D), got "
            f"{tuple(queries.shape)} and {tuple(bank.shape)}"
        )
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(
            f"feature width mismatch: queries have D={queries.shape[1]}, the bank has "
            f"D={bank.shape[1]}"
        )
    if bank.shape[0] == 0:
        raise ValueError("the memory bank has no rows: build it before searching")
    if not (queries.is_floating_point() and bank.is_floating_point()):
        raise ValueError(f"expected floating point tensors, got {queries.dtype} and {bank.dtype}")
    if queries.device != bank.device:
        raise ValueError(f"queries on {queries.device} but the bank on {bank.device}")
    if max_chunk_bytes <= 0:
        raise ValueError(f"max_chunk_bytes must be positive, got {max_chunk_bytes}")


@dataclass(frozen=True)
class BankStats:
    """Per-bank constants of the torch search, cached per bank tensor (see ``bank_stats``)."""

    mean: Tensor  # (D,) float32
    centred_sq_norms: Tensor  # (N,) float32, |b - mean|^2


STATS_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def tensor_version(tensor: Tensor) -> int | None:
    """The in-place version counter, or None for inference tensors (which have none)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def per_bank(cache: WeakIdKeyDictionary, bank: Tensor, build: Callable[[], _T]) -> _T:
    """``build()`` once per bank object: cached by the tensor's identity and invalidated by its
    in-place version counter, so a bank overwritten in place (``load_state_dict`` copies into
    the buffer) is rebuilt. Inference tensors have no counter and are never cached."""
    version = tensor_version(bank)
    if version is not None:
        entry = cache.get(bank)
        if entry is not None and entry[0] == version:
            return entry[1]
    value = build()
    if version is not None:
        cache[bank] = (version, value)
    return value


def bank_stats(bank: Tensor) -> BankStats:
    """Mean and centred squared norms of the bank, computed once per bank (``per_bank``)."""
    return per_bank(STATS_CACHE, bank, lambda: build_bank_stats(bank))


def build_bank_stats(bank: Tensor) -> BankStats:
    num_rows = bank.shape[0]
    # The mean only centres the data (any nearby point would do; distances do not depend on
    # it): float32 sums per chunk, accumulated in float64 across the (up to millions of) rows.
    total = torch.zeros(bank.shape[1], dtype=torch.float64, device=bank.device)
    for i in range(0, num_rows, ROW_CHUNK):
        total += bank[i : i + ROW_CHUNK].sum(0, dtype=torch.float32)
    mean = (total / num_rows).float()
    norms = torch.empty(num_rows, device=bank.device)
    for i, centred in centred_chunks(bank, mean):
        torch.linalg.vector_norm(centred, dim=1, out=norms[i : i + centred.shape[0]])
    return BankStats(mean, norms.square_())


def exact_distance(queries: Tensor, bank: Tensor, index: Tensor) -> Tensor:
    """``|| a - bank[index] ||`` computed directly (no expansion): exact to float32 rounding."""
    num_queries, dim = queries.shape
    out = torch.empty(num_queries, device=queries.device)
    step = min(ROW_CHUNK, num_queries)
    nearest = torch.empty(step, dim, dtype=bank.dtype, device=bank.device)
    diff = torch.empty(step, dim, device=bank.device)
    for q0 in range(0, num_queries, step):
        n = min(step, num_queries - q0)
        torch.index_select(bank, 0, index[q0 : q0 + n], out=nearest[:n])
        torch.sub(queries[q0 : q0 + n], nearest[:n], out=diff[:n])
        torch.linalg.vector_norm(diff[:n], dim=1, out=out[q0 : q0 + n])
    return out


def centred_chunks(bank: Tensor, mean: Tensor) -> Iterator[tuple[int, Tensor]]:
    """``(start, bank[start:start+c] - mean)`` in float32, ``c = ROW_CHUNK`` rows at a time.

    One buffer is reused for every chunk (yielded views are overwritten by the next step):
    allocating a fresh tens-of-MB temporary per chunk let the C allocator's peak grow by the sum
    of all of them (measured: +1.2 GB for a 1e6 x 320 bank).
    """
    rows = min(ROW_CHUNK, bank.shape[0])
    buffer = torch.empty(rows, bank.shape[1], device=bank.device)
    for i in range(0, bank.shape[0], rows):
        n = min(rows, bank.shape[0] - i)
        yield i, torch.sub(bank[i : i + n], mean, out=buffer[:n])


def search_counting_pairs(
    argmin, queries: Tensor, bank: Tensor, max_chunk_bytes: int
) -> tuple[Tensor, Tensor, float]:
    """Distances, indices and compared-pair fraction of an ``argmin -> (index, pairs)`` search."""
    check_inputs(queries, bank, max_chunk_bytes)
    queries = queries.float()
    index, pairs = argmin(queries, bank, max_chunk_bytes)
    total = max(1, queries.shape[0] * bank.shape[0])
    return exact_distance(queries, bank, index), index, pairs / total
