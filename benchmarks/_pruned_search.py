"""The exact cluster-pruned search, kept for the benchmarks only.

It moved out of the package: ``auto`` never chose it, and it measured no gain on this
project's features (no cluster structure; benchmarks/results/knn_1e6_pruned_auto.md), while its
index costs ``2 N K D`` flops per bank. ``benchmarks/knn.py --methods pruned`` still runs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from vsad_lightning.bank.brute_force import argmin_torch, chunk_sizes
from vsad_lightning.bank.common import (
    DEFAULT_MAX_CHUNK_BYTES,
    UNIT_ROUNDOFF,
    BankStats,
    bank_stats,
    centred_chunks,
    exact_distance,
    per_bank,
    search_counting_pairs,
)
from vsad_lightning.bank.coreset import greedy_coreset

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


@dataclass(frozen=True)
class _ClusterIndex:
    """The pruned search's per-bank index, cached like ``bank_stats``.

    All coordinates are centred on the bank mean (``BankStats.mean``).
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
    return per_bank(_CLUSTER_CACHE, bank, lambda: _build_cluster_index(bank))


def _build_cluster_index(bank: Tensor) -> _ClusterIndex:
    stats = bank_stats(bank)
    num_rows, dim = bank.shape
    device = bank.device
    num_clusters = max(1, min(num_rows, _MAX_CLUSTERS, round(num_rows / _ROWS_PER_CLUSTER)))
    generator = torch.Generator().manual_seed(0)
    sample_size = min(num_rows, num_clusters * _KMEANS_SAMPLE_PER_CLUSTER)
    picked = torch.randperm(num_rows, generator=generator)[:sample_size].to(device)
    sample = bank[picked].float() - stats.mean

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
    for i, centred in centred_chunks(bank, stats.mean):
        part = _nearest_centroid(centred, centroids, sq_norms)
        assign[i : i + part.shape[0]] = part
        sums.index_add_(0, part, centred.double())
    counts = torch.bincount(assign, minlength=num_clusters)
    filled = counts > 0
    centroids[filled] = (sums[filled] / counts[filled, None]).float()
    radii = torch.zeros(num_clusters, device=device)
    for i, centred in centred_chunks(bank, stats.mean):
        part = assign[i : i + centred.shape[0]]
        distance = torch.linalg.vector_norm(centred - centroids[part], dim=1)
        radii.scatter_reduce_(0, part, distance, reduce="amax")
    # A float32 norm of D terms is within (D + 2) u of the true one (recursive summation
    # bound; blocked BLAS sums do better): round every radius up by that.
    radii.mul_(1.0 + (dim + 2) * UNIT_ROUNDOFF)
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
    return search_counting_pairs(_argmin_pruned, queries, bank, max_chunk_bytes)


def _argmin_pruned(queries: Tensor, bank: Tensor, max_chunk_bytes: int) -> tuple[Tensor, float]:
    """Exact argmin with cluster pruning (see ``_argmin_pruned_chunk``) and the pairs compared."""
    index = _cluster_index(bank)
    stats = bank_stats(bank)
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
    queries: Tensor, bank: Tensor, stats: BankStats, index: _ClusterIndex, max_chunk_bytes: int
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
    gamma = 2.0 * (dim + 4) * UNIT_ROUNDOFF
    slack = gamma * (sq_norms[:, None] + index.centroid_sq_norms)
    lower = expansion.sub_(slack).clamp_(min=0.0).sqrt_().sub_(index.radii).clamp_(min=0.0)
    lower.mul_(1.0 - 4 * UNIT_ROUNDOFF)  # the rounding of sqrt and of the subtraction
    del slack

    best_value = torch.full((num_queries,), math.inf, device=device)
    best_index = torch.zeros(num_queries, dtype=torch.long, device=device)

    # 2. The nearest centroid's cluster gives an upper bound per query.
    first = lower.argmin(dim=1)
    _search_pairs(
        first, torch.arange(num_queries, device=device), augmented, bank, stats, index,
        max_chunk_bytes, best_value, best_index,
    )  # fmt: skip
    upper = exact_distance(queries, bank, best_index).mul_(1.0 + (dim + 2) * UNIT_ROUNDOFF)

    # 3. Every other cluster that can hold a nearer row.
    survive = lower <= upper[:, None]
    survive[torch.arange(num_queries, device=device), first] = False
    del lower
    sizes = torch.diff(torch.tensor(index.offsets, device=device)).float()
    work = float((survive.float() @ sizes).sum())  # surviving (query, row) pairs
    sizes_first = sizes[first].sum().item()
    if work + sizes_first > _PRUNE_FALLBACK_FRACTION * num_queries * num_bank:
        return argmin_torch(queries, bank, max_chunk_bytes), float(num_queries * num_bank)
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
    stats: BankStats,
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
