"""Greedy k-center (farthest point) coresets of feature rows.

docs/method.md#memory-bank: the coreset option (``bank.coreset_ratio``) for large banks. Its own
module so that the bank storage, the streaming builder and the benchmarks can all use it without
importing each other.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


@torch.no_grad()
def greedy_coreset(
    features: Tensor, ratio: float, *, projection_dim: int = 128, seed: int = 0
) -> Tensor:
    """Indices of a greedy k-center (farthest point) coreset of ``features``.

    docs/method.md#memory-bank: the coreset option for large banks. Starting from one
    seeded random row, each step adds the row farthest from everything selected so far, which
    gives a covering radius at most twice the optimal one for that many centres (Gonzalez).

    Distances are computed on a Gaussian random projection to ``projection_dim`` dimensions
    (Johnson-Lindenstrauss: pairwise distances are kept within a small factor), fixed by
    ``seed``; when ``projection_dim >= D`` the features are used as they are (exact distances).

    Complexity: ``O(N D k)`` for the projection and ``O(M N k)`` for the selection, with
    ``k = min(projection_dim, D)`` and ``M = max(1, round(ratio * N))`` rows selected, i.e.
    ``O(ratio N^2 k)``: each step is one matrix-vector product over the projected rows plus an
    elementwise minimum. Extra memory ``O(N k)``.

    Args:
        features: ``(N, D)`` rows.
        ratio: fraction of rows to keep, in ``(0, 1]``; 1.0 returns ``arange(N)``.
        projection_dim: width of the random projection.
        seed: seed of the projection and of the first row.

    Returns:
        ``(M,)`` int64 unique row indices in selection order, on ``features.device``.
    """
    if features.dim() != 2 or features.shape[0] == 0:
        raise ValueError(f"expected features (N, D) with N >= 1, got {tuple(features.shape)}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    if projection_dim < 1:
        raise ValueError(f"projection_dim must be >= 1, got {projection_dim}")
    num_rows, dim = features.shape
    device = features.device
    if ratio == 1.0:
        return torch.arange(num_rows, device=device)
    num_keep = min(num_rows, max(1, round(ratio * num_rows)))

    generator = torch.Generator(device="cpu").manual_seed(seed)
    if projection_dim < dim:
        projection = torch.randn(dim, projection_dim, generator=generator) / math.sqrt(
            projection_dim
        )
        points = features.float() @ projection.to(device)
    else:
        points = features.float()
    # Centre (distances do not change) so the norm expansion below cancels small numbers.
    points = points - points.mean(0)
    sq_norms = points.square().sum(1)

    selected = torch.empty(num_keep, dtype=torch.long, device=device)
    # 0-d tensors, not Python ints, so a GPU loop never waits for the device.
    newest = torch.randint(num_rows, (), generator=generator).to(device)
    selected[0] = newest
    # min_sq[i] = squared distance of row i to the nearest selected row; selected rows are set
    # to -inf so that argmax never picks them again, even when every remaining row is a
    # duplicate of a selected one (distance 0, or slightly negative after rounding: only the
    # argmax is used, so no clamp is needed).
    min_sq = torch.full((num_rows,), math.inf, device=device)
    sq = torch.empty(num_rows, device=device)
    for step in range(1, num_keep):
        centre = points[newest]
        # |x|^2 - 2 x.c + |c|^2: one matrix-vector product and one add per step.
        torch.addmv(sq_norms, points, centre, alpha=-2.0, out=sq).add_(sq_norms[newest])
        torch.minimum(min_sq, sq, out=min_sq)
        min_sq[newest] = -math.inf
        newest = torch.argmax(min_sq)
        selected[step] = newest
    return selected
