"""Exact nearest-neighbour L2 distances from query rows to a memory bank.

docs/method.md#scoring: the pixel score uses ``min_{m in M} || F(p) - m ||_2`` for
every position ``p`` of every test view, against banks of up to millions of rows. This module
computes that minimum exactly, in bounded memory.

How (torch backend):

1. The bank and the queries are centred on the bank mean ``mu`` (distances do not change under
   a common translation). Features after a GELU/GroupNorm stack often share a large common
   offset; centring shrinks the norms that the expansion below has to cancel.
2. For blocks of ``q_chunk`` queries x ``n_chunk`` bank rows, ``|b|^2 - 2 a.b`` comes out of
   ONE matrix product into a preallocated buffer: the queries get an extra column of ones and
   the bank chunk becomes ``[-2 b, |b|^2]``, so the norms are added inside the GEMM rather than
   by extra passes over the block (``|a|^2`` is constant per query, so it does not change the
   argmin and is never added). A running (value, index) minimum is kept across bank chunks.
   The block plus the augmented bank chunk stay within ``max_chunk_bytes`` whatever ``Q`` and
   ``N`` are.
3. Precision: the expansion in float32 loses accuracy when distances are small compared with
   the norms (relative error of ``d^2`` about ``eps_32 * |a||b| / d^2``), so its *values* are
   never returned. Only its argmin is used: the winning bank row is gathered and
   ``|| a - b ||`` is computed directly. The returned distance is then exact to float32
   rounding for the chosen row (0 exactly when the query is a bank row); the only residual
   error is picking a different row among neighbours whose squared distances differ by less
   than the expansion's rounding error, and then the returned value exceeds the true minimum by
   at most that rounding error.

The faiss backend (``IndexFlatL2``, exact search, k=1) gives the same argmin and goes through
the same exact recomputation, so both backends return the same values.

Cost: ``2 Q N (D + 1)`` flops for the search plus ``O((Q + N) D)`` for centring, norms and the
recomputation; extra memory ``max_chunk_bytes + O(Q D)`` (the augmented queries) + ``O(N)``
(the cached bank norms).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

_T = TypeVar("_T")

KnnBackend = Literal["auto", "torch", "faiss", "pruned", "projected"]

DEFAULT_MAX_CHUNK_BYTES = 256 * 2**20
"""Bound on the temporary (query chunk x bank chunk) distance block and the augmented bank chunk."""

_PREFERRED_QUERY_CHUNK = 4096
"""Queries per block when the budget allows: large enough for an efficient GEMM."""

_MIN_BANK_CHUNK = 1024
"""Bank rows per block below which the query chunk is shrunk instead (tiny budgets)."""

_ROW_CHUNK = 16384
"""Rows per step for the bank statistics, the faiss index copy and the exact recomputation.

Fixed (not derived from ``max_chunk_bytes``) so the cached statistics, hence the results, do not
depend on the chunking of the call that first computed them."""


def faiss_available() -> bool:
    """Whether ``import faiss`` works (the optional ``faiss`` extra, faiss-cpu)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(
    backend: KnnBackend, device: torch.device
) -> Literal["torch", "faiss", "pruned", "projected"]:
    """``auto`` means the exact torch search (refined below); the others are taken as asked.

    ``nearest_neighbour`` refines ``auto`` for CPU banks whose spectrum lets the exact projected
    search pay (``projection_pays``). faiss (``IndexFlatL2``) is never chosen by ``auto``: on
    the 2-core CPU where it was measured, the torch search was 4-9x faster than pip's faiss-cpu
    (README, Performance). ``pruned`` (the exact cluster-pruned search) is never chosen by
    ``auto`` either: it pays only on banks with cluster structure, which the measured features
    lack, and its index costs ``2 N K D`` flops per bank
    (benchmarks/results/knn_1e6_pruned_auto.md).
    """
    if backend == "auto":
        return "torch"
    if backend == "faiss" and not faiss_available():
        raise ValueError("knn backend 'faiss' requested but `import faiss` fails (faiss-cpu)")
    if backend not in ("torch", "faiss", "pruned", "projected"):
        raise ValueError(
            f"knn backend must be 'auto', 'torch', 'faiss', 'pruned' or 'projected', "
            f"got {backend!r}"
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
        backend: ``torch`` (chunked matmul), ``faiss`` (``IndexFlatL2``) or ``auto`` (see
            ``resolve_backend``). Both return the same values.
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
    _check_inputs(queries, bank, max_chunk_bytes)
    if queries.shape[0] == 0:
        empty = torch.empty(0, dtype=torch.float32, device=queries.device)
        return empty, torch.empty(0, dtype=torch.long, device=queries.device)
    queries = queries.float()  # no copy for float32; half-precision queries are upcast once
    resolved = resolve_backend(backend, bank.device)
    if backend == "auto" and bank.device.type == "cpu" and projection_pays(bank):
        resolved = "projected"
    if resolved == "faiss":
        index = _argmin_faiss(queries, bank)
    elif resolved == "pruned":
        index, _ = _argmin_pruned(queries, bank, max_chunk_bytes)
    elif resolved == "projected":
        index, _ = _argmin_projected(queries, bank, max_chunk_bytes)
    else:
        index = _argmin_torch(queries, bank, max_chunk_bytes)
    return _exact_distance(queries, bank, index), index


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


# ------------------------------------------------------------------------------------ internals
def _check_inputs(queries: Tensor, bank: Tensor, max_chunk_bytes: int) -> None:
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
class _BankStats:
    """Per-bank constants of the torch search, cached per bank tensor (see ``_bank_stats``)."""

    mean: Tensor  # (D,) float32
    centred_sq_norms: Tensor  # (N,) float32, |b - mean|^2


_STATS_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()
_FAISS_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _version(tensor: Tensor) -> int | None:
    """The in-place version counter, or None for inference tensors (which have none)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def _per_bank(cache: WeakIdKeyDictionary, bank: Tensor, build: Callable[[], _T]) -> _T:
    """``build()`` once per bank object: cached by the tensor's identity and invalidated by its
    in-place version counter, so a bank overwritten in place (``load_state_dict`` copies into
    the buffer) is rebuilt. Inference tensors have no counter and are never cached."""
    version = _version(bank)
    if version is not None:
        entry = cache.get(bank)
        if entry is not None and entry[0] == version:
            return entry[1]
    value = build()
    if version is not None:
        cache[bank] = (version, value)
    return value


def _bank_stats(bank: Tensor) -> _BankStats:
    """Mean and centred squared norms of the bank, computed once per bank (``_per_bank``)."""
    return _per_bank(_STATS_CACHE, bank, lambda: _build_bank_stats(bank))


def _build_bank_stats(bank: Tensor) -> _BankStats:
    num_rows = bank.shape[0]
    # The mean only centres the data (any nearby point would do; distances do not depend on
    # it): float32 sums per chunk, accumulated in float64 across the (up to millions of) rows.
    total = torch.zeros(bank.shape[1], dtype=torch.float64, device=bank.device)
    for i in range(0, num_rows, _ROW_CHUNK):
        total += bank[i : i + _ROW_CHUNK].sum(0, dtype=torch.float32)
    mean = (total / num_rows).float()
    norms = torch.empty(num_rows, device=bank.device)
    for i, centred in _centred_chunks(bank, mean):
        torch.linalg.vector_norm(centred, dim=1, out=norms[i : i + centred.shape[0]])
    return _BankStats(mean, norms.square_())


def _argmin_torch(queries: Tensor, bank: Tensor, max_chunk_bytes: int) -> Tensor:
    num_queries, dim = queries.shape
    num_bank = bank.shape[0]
    q_chunk, n_chunk = chunk_sizes(num_queries, num_bank, dim, max_chunk_bytes)
    stats = _bank_stats(bank)
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


def _faiss_index(bank: Tensor, mean: Tensor):
    """An ``IndexFlatL2`` over the centred bank, cached per bank object like ``_bank_stats``.

    The index holds a float32 copy of the bank (faiss stores its own vectors), so the cache
    costs ``4 N D`` bytes for as long as the bank tensor lives.
    """
    import faiss

    def build():
        index = faiss.IndexFlatL2(bank.shape[1])
        for _, centred in _centred_chunks(bank.detach().cpu(), mean):
            index.add(centred.numpy())
        return index

    return _per_bank(_FAISS_CACHE, bank, build)


def _argmin_faiss(queries: Tensor, bank: Tensor) -> Tensor:
    stats = _bank_stats(bank)
    mean = stats.mean.cpu()
    index = _faiss_index(bank, mean)
    centred = queries.detach().cpu().float() - mean
    _, labels = index.search(centred.numpy(), 1)
    return torch.from_numpy(labels[:, 0]).to(device=queries.device, dtype=torch.long)


def _exact_distance(queries: Tensor, bank: Tensor, index: Tensor) -> Tensor:
    """``|| a - bank[index] ||`` computed directly (no expansion): exact to float32 rounding."""
    num_queries, dim = queries.shape
    out = torch.empty(num_queries, device=queries.device)
    step = min(_ROW_CHUNK, num_queries)
    nearest = torch.empty(step, dim, dtype=bank.dtype, device=bank.device)
    diff = torch.empty(step, dim, device=bank.device)
    for q0 in range(0, num_queries, step):
        n = min(step, num_queries - q0)
        torch.index_select(bank, 0, index[q0 : q0 + n], out=nearest[:n])
        torch.sub(queries[q0 : q0 + n], nearest[:n], out=diff[:n])
        torch.linalg.vector_norm(diff[:n], dim=1, out=out[q0 : q0 + n])
    return out


def _centred_chunks(bank: Tensor, mean: Tensor) -> Iterator[tuple[int, Tensor]]:
    """``(start, bank[start:start+c] - mean)`` in float32, ``c = _ROW_CHUNK`` rows at a time.

    One buffer is reused for every chunk (yielded views are overwritten by the next step):
    allocating a fresh tens-of-MB temporary per chunk let the C allocator's peak grow by the sum
    of all of them (measured: +1.2 GB for a 1e6 x 320 bank).
    """
    rows = min(_ROW_CHUNK, bank.shape[0])
    buffer = torch.empty(rows, bank.shape[1], device=bank.device)
    for i in range(0, bank.shape[0], rows):
        n = min(rows, bank.shape[0] - i)
        yield i, torch.sub(bank[i : i + n], mean, out=buffer[:n])


# ------------------------------------------------------------------------ exact pruned search
_ROWS_PER_CLUSTER = 512
"""Average cluster size of the pruned search's index: ``K = N / 512`` clusters (at most
``_MAX_CLUSTERS``).

Fewer, larger clusters prune coarsely (a cluster that straddles two groups of rows has a radius
as large as their distance); more clusters cost more to assign at build time (``2 N K D``
flops, about a tenth of one 20480-query search at N = 1e6) and more per-cluster steps."""

_MAX_CLUSTERS = 4096
_KMEANS_SAMPLE_PER_CLUSTER = 16
_KMEANS_ITERATIONS = 5

_PRUNE_FALLBACK_FRACTION = 0.5
"""When more than this fraction of the (query, bank row) pairs survive the bounds, the chunk is
searched by brute force instead: scattered per-cluster products are slower than one long GEMM,
so pruning only pays when it removes most of the work (it does not on unclustered data)."""

_PRUNE_QUERY_CHUNK = 32_768
"""Queries per pass: bounds the ``(Q, K)`` bound matrix and the surviving-pair list."""

_UNIT_ROUNDOFF = 2.0**-24
"""float32 unit roundoff ``u``."""


@dataclass(frozen=True)
class _ClusterIndex:
    """The pruned search's per-bank index, cached like ``_bank_stats``.

    All coordinates are centred on the bank mean (``_BankStats.mean``).
    """

    centroids: Tensor  # (K, D) float32
    centroid_sq_norms: Tensor  # (K,)
    radii: Tensor  # (K,) upper bound of |(b - mean) - centroid| over the cluster's rows
    order: Tensor  # (N,) int64 bank rows grouped by cluster
    offsets: list[int]  # cluster k's rows are order[offsets[k] : offsets[k + 1]]


_CLUSTER_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _nearest_centroid(points: Tensor, centroids: Tensor, centroid_sq_norms: Tensor) -> Tensor:
    """Index of the nearest centroid (expansion argmin; any assignment keeps the search exact)."""
    scores = torch.addmm(centroid_sq_norms, points, centroids.T, alpha=-2.0)
    return scores.argmin(dim=1)


def _cluster_index(bank: Tensor) -> _ClusterIndex:
    """Partition the bank into ``K ~ N / 512`` k-means clusters with exact radii.

    k-means runs on a seeded sample (``16 K`` rows), initialised by farthest-point selection
    (``greedy_coreset``: every well-separated group of rows gets a centroid) and refined by 5
    Lloyd steps; then every row is assigned
    to its nearest centroid in one chunked pass, the centroids become the means of their rows,
    and each radius is the largest direct distance ``|b - c_k|`` of its rows (rounded up).
    The clustering only affects the speed: exactness rests on the radii, which hold for any
    assignment. Build cost about ``2 N K D`` flops; memory ``O(N + K D)`` besides the sample
    (no copy of the bank: rows are gathered per cluster at search time).
    """
    return _per_bank(_CLUSTER_CACHE, bank, lambda: _build_cluster_index(bank))


def _build_cluster_index(bank: Tensor) -> _ClusterIndex:
    stats = _bank_stats(bank)
    num_rows, dim = bank.shape
    device = bank.device
    num_clusters = max(1, min(num_rows, _MAX_CLUSTERS, round(num_rows / _ROWS_PER_CLUSTER)))
    generator = torch.Generator().manual_seed(0)
    sample_size = min(num_rows, num_clusters * _KMEANS_SAMPLE_PER_CLUSTER)
    picked = torch.randperm(num_rows, generator=generator)[:sample_size].to(device)
    sample = bank[picked].float() - stats.mean
    # Imported here: memory_bank imports this module.
    from vsad_lightning.models.memory_bank import greedy_coreset

    first = greedy_coreset(sample, num_clusters / sample_size, projection_dim=128, seed=0)
    centroids = sample[first].clone()
    num_clusters = centroids.shape[0]
    for _ in range(_KMEANS_ITERATIONS):
        assign = _nearest_centroid(sample, centroids, centroids.square().sum(1))
        _update_centroids(centroids, sample, assign)
    del sample

    assign = torch.empty(num_rows, dtype=torch.long, device=device)
    sums = torch.zeros(num_clusters, dim, dtype=torch.float64, device=device)
    sq_norms = centroids.square().sum(1)
    for i, centred in _centred_chunks(bank, stats.mean):
        part = _nearest_centroid(centred, centroids, sq_norms)
        assign[i : i + part.shape[0]] = part
        sums.index_add_(0, part, centred.double())
    counts = torch.bincount(assign, minlength=num_clusters)
    filled = counts > 0
    centroids[filled] = (sums[filled] / counts[filled, None]).float()
    radii = torch.zeros(num_clusters, device=device)
    for i, centred in _centred_chunks(bank, stats.mean):
        part = assign[i : i + centred.shape[0]]
        distance = torch.linalg.vector_norm(centred - centroids[part], dim=1)
        radii.scatter_reduce_(0, part, distance, reduce="amax")
    # A float32 norm of D terms is within (D + 2) u of the true one (recursive summation
    # bound; blocked BLAS sums do better): round every radius up by that.
    radii.mul_(1.0 + (dim + 2) * _UNIT_ROUNDOFF)
    offsets = [0, *torch.cumsum(counts, 0).tolist()]
    return _ClusterIndex(
        centroids=centroids,
        centroid_sq_norms=centroids.square().sum(1),
        radii=radii,
        order=torch.argsort(assign, stable=True),
        offsets=offsets,
    )


def _update_centroids(centroids: Tensor, points: Tensor, assign: Tensor) -> None:
    """Lloyd step in place: each non-empty cluster's centroid becomes the mean of its points."""
    sums = torch.zeros_like(centroids).index_add_(0, assign, points)
    counts = torch.bincount(assign, minlength=centroids.shape[0])
    filled = counts > 0
    centroids[filled] = sums[filled] / counts[filled, None]


@torch.no_grad()
def pruned_search(
    queries: Tensor, bank: Tensor, *, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
) -> tuple[Tensor, Tensor, float]:
    """``nearest_neighbour(backend="pruned")`` plus the fraction of (query, row) pairs compared.

    The fraction is 1.0 when the search fell back to brute force, and shows how much work
    the bounds saved otherwise (benchmarks/knn.py reports it). Same exact results as the
    brute-force search.
    """
    return _search_counting_pairs(_argmin_pruned, queries, bank, max_chunk_bytes)


def _search_counting_pairs(
    argmin, queries: Tensor, bank: Tensor, max_chunk_bytes: int
) -> tuple[Tensor, Tensor, float]:
    """Distances, indices and compared-pair fraction of an ``argmin -> (index, pairs)`` search."""
    _check_inputs(queries, bank, max_chunk_bytes)
    queries = queries.float()
    index, pairs = argmin(queries, bank, max_chunk_bytes)
    total = max(1, queries.shape[0] * bank.shape[0])
    return _exact_distance(queries, bank, index), index, pairs / total


def _argmin_pruned(queries: Tensor, bank: Tensor, max_chunk_bytes: int) -> tuple[Tensor, float]:
    """Exact argmin with cluster pruning (see ``_argmin_pruned_chunk``) and the pairs compared."""
    index = _cluster_index(bank)
    stats = _bank_stats(bank)
    out = torch.empty(queries.shape[0], dtype=torch.long, device=queries.device)
    visited = 0.0
    for q0 in range(0, queries.shape[0], _PRUNE_QUERY_CHUNK):
        chunk = queries[q0 : q0 + _PRUNE_QUERY_CHUNK]
        out[q0 : q0 + chunk.shape[0]], pairs = _argmin_pruned_chunk(
            chunk, bank, stats, index, max_chunk_bytes
        )
        visited += pairs
    return out, visited


def _argmin_pruned_chunk(
    queries: Tensor, bank: Tensor, stats: _BankStats, index: _ClusterIndex, max_chunk_bytes: int
) -> tuple[Tensor, float]:
    """The same argmin as the brute-force search, visiting only clusters that can hold it.

    For a query ``a`` and a cluster with centroid ``c`` and radius ``r``, every row ``b`` of the
    cluster has ``|a - b| >= |a - c| - r`` (triangle inequality). The search

    1. computes these lower bounds for all ``K`` clusters (one ``Q x K`` product; the float32
       expansion's rounding error, at most ``gamma (|a|^2 + |c|^2)`` with
       ``gamma = 2 (D + 4) u``, is subtracted first so the bounds stay bounds);
    2. searches each query's nearest-centroid cluster and takes the winner's directly computed
       distance, rounded up, as an upper bound ``U`` of the query's true minimum;
    3. searches, per cluster, only the queries whose lower bound is ``<= U``. A skipped cluster
       has every row strictly farther than a row already seen, so the true nearest row is
       always among the visited ones; the running argmin over them uses the same expansion
       values as ``_argmin_torch``, hence the same guarantee (see the module docstring).

    If more than ``_PRUNE_FALLBACK_FRACTION`` of the pairs survive step 3's test, the chunk is
    searched by brute force instead (unclustered data: the bounds prune little).

    Returns the argmin and the number of (query, bank row) pairs compared.
    """
    num_queries, dim = queries.shape
    device = queries.device
    num_bank = bank.shape[0]
    augmented = torch.ones(num_queries, dim + 1, device=device)
    centred = torch.sub(queries.float(), stats.mean, out=augmented[:, :dim])
    sq_norms = centred.square().sum(1)

    # 1. Lower bounds of the distance from each query to each cluster.
    expansion = torch.addmm(
        sq_norms[:, None] + index.centroid_sq_norms, centred, index.centroids.T, alpha=-2.0
    )
    gamma = 2.0 * (dim + 4) * _UNIT_ROUNDOFF
    slack = gamma * (sq_norms[:, None] + index.centroid_sq_norms)
    lower = expansion.sub_(slack).clamp_(min=0.0).sqrt_().sub_(index.radii).clamp_(min=0.0)
    lower.mul_(1.0 - 4 * _UNIT_ROUNDOFF)  # the rounding of sqrt and of the subtraction
    del slack

    best_value = torch.full((num_queries,), math.inf, device=device)
    best_index = torch.zeros(num_queries, dtype=torch.long, device=device)

    # 2. The nearest centroid's cluster gives an upper bound per query.
    first = lower.argmin(dim=1)
    _search_pairs(
        first, torch.arange(num_queries, device=device), augmented, bank, stats, index,
        max_chunk_bytes, best_value, best_index,
    )  # fmt: skip
    upper = _exact_distance(queries, bank, best_index).mul_(1.0 + (dim + 2) * _UNIT_ROUNDOFF)

    # 3. Every other cluster that can hold a nearer row.
    survive = lower <= upper[:, None]
    survive[torch.arange(num_queries, device=device), first] = False
    del lower
    sizes = torch.diff(torch.tensor(index.offsets, device=device)).float()
    work = float((survive.float() @ sizes).sum())  # surviving (query, row) pairs
    sizes_first = sizes[first].sum().item()
    if work + sizes_first > _PRUNE_FALLBACK_FRACTION * num_queries * num_bank:
        return _argmin_torch(queries, bank, max_chunk_bytes), float(num_queries * num_bank)
    cluster, query = survive.T.nonzero(as_tuple=True)  # sorted by cluster
    del survive
    _search_pairs(
        cluster, query, augmented, bank, stats, index, max_chunk_bytes, best_value, best_index
    )
    return best_index, work + sizes_first


def _search_pairs(
    cluster: Tensor,
    query: Tensor,
    augmented_queries: Tensor,
    bank: Tensor,
    stats: _BankStats,
    index: _ClusterIndex,
    max_chunk_bytes: int,
    best_value: Tensor,
    best_index: Tensor,
) -> None:
    """Update the running argmin of ``query[i]`` with the rows of ``cluster[i]`` for every i.

    Pairs are grouped by cluster; each cluster's rows are gathered and centred once, as
    ``[-2 (b - mu), |b - mu|^2]`` like ``_argmin_torch``'s bank chunks, and meet all of that
    cluster's queries in blocks within ``max_chunk_bytes``.
    """
    if cluster.numel() == 0:
        return
    dim = bank.shape[1]
    ordering = torch.argsort(cluster, stable=True)
    cluster, query = cluster[ordering], query[ordering]
    ids, counts = torch.unique_consecutive(cluster, return_counts=True)
    starts = [0, *torch.cumsum(counts, 0).tolist()]
    for k, s0, s1 in zip(ids.tolist(), starts[:-1], starts[1:], strict=True):
        rows = index.order[index.offsets[k] : index.offsets[k + 1]]
        if rows.numel() == 0:
            continue
        members = query[s0:s1]
        q_chunk, n_chunk = chunk_sizes(members.numel(), rows.numel(), dim, max_chunk_bytes)
        for n0 in range(0, rows.numel(), n_chunk):
            part = rows[n0 : n0 + n_chunk]
            bank_chunk = torch.empty(part.numel(), dim + 1, device=bank.device)
            torch.sub(bank[part], stats.mean, out=bank_chunk[:, :dim]).mul_(-2.0)
            bank_chunk[:, dim] = stats.centred_sq_norms[part]
            for q0 in range(0, members.numel(), q_chunk):
                who = members[q0 : q0 + q_chunk]
                scores = augmented_queries[who] @ bank_chunk.T
                value, position = scores.min(dim=1)
                better = value < best_value[who]
                best_value[who] = torch.where(better, value, best_value[who])
                best_index[who] = torch.where(better, part[position], best_index[who])


# --------------------------------------------------------------------- exact projected search
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
"""Bank rows per block of the projected search (see ``_argmin_projected``)."""

_SURVIVOR_FALLBACK_FRACTION = 0.02
"""When more than this share of a block's (query, row) pairs survive the bound, that block is
searched by the brute-force expansion instead of pair by pair (a weak bound on this data)."""


@dataclass(frozen=True)
class _ProjectionIndex:
    """The projected search's per-bank index, cached like ``_bank_stats``.

    ``basis`` is None when the spectrum is too flat for the bound to pay (brute force).
    ``bank_coords`` holds ``[-2 z_b, |z_b|^2]`` with ``z_b = [P^T (b - mu), |residual_b|]``,
    the augmented form of ``_argmin_torch``, so one GEMM gives ``|z_b|^2 - 2 z_a . z_b``.
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
    return _per_bank(_PROJECTION_CACHE, bank, lambda: _build_projection_index(bank))


def _build_projection_index(bank: Tensor) -> _ProjectionIndex:
    stats = _bank_stats(bank)
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
        for i, centred in _centred_chunks(bank, stats.mean):
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
    return _search_counting_pairs(_argmin_projected, queries, bank, max_chunk_bytes)


def _argmin_projected(queries: Tensor, bank: Tensor, max_chunk_bytes: int) -> tuple[Tensor, float]:
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
        return _argmin_torch(queries, bank, max_chunk_bytes), float(num_queries * num_bank)
    stats = _bank_stats(bank)
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
    gamma = 2.0 * (width + 4) * _UNIT_ROUNDOFF
    upper_factor = 1.0 + (dim + 2) * _UNIT_ROUNDOFF
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
        slack = 8.0 * dim * _UNIT_ROUNDOFF * (centred.norm(dim=1) + index.max_centred_norm)
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
                found = _argmin_torch(
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
