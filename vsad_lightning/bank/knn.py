"""Exact nearest-neighbour L2 distances from query rows to a memory bank: the backend dispatch.

docs/method.md#scoring: the pixel score uses ``min_{m in M} || F(p) - m ||_2`` for
every position ``p`` of every test view, against banks of up to millions of rows. This module
computes that minimum exactly, in bounded memory.

How (torch backend): ``vsad_lightning.bank.brute_force`` centres the bank and queries on the
bank mean and gets ``|b|^2 - 2 a.b`` for a block of queries x bank rows out of one GEMM, in
bounded memory; its docstring has the details. What follows is the precision argument for it.

Precision: the expansion in float32 loses accuracy when distances are small compared with
the norms (relative error of ``d^2`` about ``eps_32 * |a||b| / d^2``), so its *values* are
never returned. Only its argmin is used: the winning bank row is gathered and
``|| a - b ||`` is computed directly. The returned distance is then exact to float32
rounding for the chosen row (0 exactly when the query is a bank row); the only residual
error is picking a different row among neighbours whose squared distances differ by less
than the expansion's rounding error, and then the returned value exceeds the true minimum by
at most that rounding error.

The other backends pick the same argmin by other means and go through the same exact
recomputation, so every backend returns the same values: ``projected`` (a lower bound in the
bank's principal directions, ``projected.py``) and ``faiss`` (``IndexFlatL2``, ``faiss_flat.py``).
The positional search (``positional.py``) serves the positional bank.

Cost: ``2 Q N (D + 1)`` flops for the search plus ``O((Q + N) D)`` for centring, norms and the
recomputation; extra memory ``max_chunk_bytes + O(Q D)`` (the augmented queries) + ``O(N)``
(the cached bank norms).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from vsad_lightning.bank import projected
from vsad_lightning.bank.brute_force import argmin_torch, chunk_sizes
from vsad_lightning.bank.common import DEFAULT_MAX_CHUNK_BYTES, check_inputs, exact_distance
from vsad_lightning.bank.faiss_flat import argmin_faiss, faiss_available
from vsad_lightning.bank.projected import projected_search, projection_pays

__all__ = [
    "DEFAULT_MAX_CHUNK_BYTES",
    "KnnBackend",
    "chunk_sizes",
    "faiss_available",
    "nearest_distance",
    "nearest_neighbour",
    "projected_search",
    "projection_pays",
    "resolve_backend",
]

KnnBackend = Literal["auto", "torch", "faiss", "projected"]


def resolve_backend(
    backend: KnnBackend, device: torch.device
) -> Literal["torch", "faiss", "projected"]:
    """``auto`` means the exact torch search (refined below); the others are taken as asked.

    ``nearest_neighbour`` refines ``auto`` for CPU banks whose spectrum lets the exact projected
    search pay (``projection_pays``). faiss (``IndexFlatL2``) is never chosen by ``auto``: on
    the 2-core CPU where it was measured, the torch search was 4-9x faster than pip's faiss-cpu
    (README, Performance). The cluster-pruned search lives in ``benchmarks/_pruned_search.py``:
    it paid only on banks with cluster structure, which the measured features lack
    (benchmarks/results/knn_1e6_pruned_auto.md).
    """
    if backend == "auto":
        return "torch"
    if backend == "faiss" and not faiss_available():
        raise ValueError("knn backend 'faiss' requested but `import faiss` fails (faiss-cpu)")
    if backend not in ("torch", "faiss", "projected"):
        raise ValueError(
            f"knn backend must be 'auto', 'torch', 'faiss' or 'projected', got {backend!r}"
        )
    return backend


@torch.no_grad()
def nearest_distance(
    queries: Tensor,
    bank: Tensor,
    *,
    backend: KnnBackend = "auto",
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> Tensor:
    """Exact L2 distance from each query row to its nearest bank row.

    Args:
        queries: ``(Q, D)`` floating point rows.
        bank: ``(N, D)`` floating point rows, ``N >= 1`` (float16 banks are read in float32
            chunks).
        backend: ``torch`` (chunked matmul), ``projected``, ``faiss`` (``IndexFlatL2``) or
            ``auto`` (see ``resolve_backend``). All return the same values.
        max_chunk_bytes: memory bound of the torch backend's temporary block.

    Returns:
        ``(Q,)`` float32 distances on ``queries.device``.
    """
    return nearest_neighbour(queries, bank, backend=backend, max_chunk_bytes=max_chunk_bytes)[0]


@torch.no_grad()
def nearest_neighbour(
    queries: Tensor,
    bank: Tensor,
    *,
    backend: KnnBackend = "auto",
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> tuple[Tensor, Tensor]:
    """Like ``nearest_distance`` but also returns the ``(Q,)`` int64 index of the nearest row."""
    check_inputs(queries, bank, max_chunk_bytes)
    if queries.shape[0] == 0:
        empty = torch.empty(0, dtype=torch.float32, device=queries.device)
        return empty, torch.empty(0, dtype=torch.long, device=queries.device)
    queries = queries.float()  # no copy for float32; half-precision queries are upcast once
    resolved = resolve_backend(backend, bank.device)
    if backend == "auto" and bank.device.type == "cpu" and projected.projection_pays(bank):
        resolved = "projected"
    if resolved == "faiss":
        index = argmin_faiss(queries, bank)
    elif resolved == "projected":
        index, _ = projected.argmin_projected(queries, bank, max_chunk_bytes)
    else:
        index = argmin_torch(queries, bank, max_chunk_bytes)
    return exact_distance(queries, bank, index), index
