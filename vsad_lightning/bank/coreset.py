"""Greedy k-center (farthest point) coresets of feature rows.

docs/method.md#memory-bank: the coreset option (``bank.coreset_ratio``) for large banks. Its own
module so that the bank storage, the streaming builder and the benchmarks can all use it without
importing each other.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

PRUNED_MIN_ROWS = 50_000
"""``method="auto"`` takes the pruned selection from this many rows (and 100 kept rows) on.
Below it the plain loop is fast enough and the block bookkeeping does not pay."""

CoresetMethod = Literal["auto", "plain", "pruned"]


@torch.no_grad()
def greedy_coreset(
    features: Tensor,
    ratio: float,
    *,
    projection_dim: int = 128,
    seed: int = 0,
    method: CoresetMethod = "auto",
) -> Tensor:
    """Indices of a greedy k-center (farthest point) coreset of ``features``.

    docs/method.md#memory-bank: the coreset option for large banks. Starting from one
    seeded random row, each step adds the row farthest from everything selected so far, which
    gives a covering radius at most twice the optimal one for that many centres (Gonzalez).

    Distances are computed on a Gaussian random projection to ``projection_dim`` dimensions
    (Johnson-Lindenstrauss: pairwise distances are kept within a small factor), fixed by
    ``seed``; when ``projection_dim >= D`` the features are used as they are (exact distances).

    Two implementations of the same rule (``method``):

    * ``"plain"``: each step is one matrix-vector product over all projected rows plus an
      elementwise minimum, ``O(M N k)`` in all (``k = min(projection_dim, D)``, ``M`` rows
      kept), i.e. ``O(ratio N^2 k)``: days for a Real-IAD category's level on a CPU.
    * ``"pruned"``: the rows are grouped into blocks of nearby rows; a block catches up with
      the centres it missed only when its bound comes to the top, and skips those that cannot
      reach it by the triangle inequality (``_greedy_pruned``). The rule and the selected rows
      are those of the plain loop (the order may differ where two rows are equally far up to
      float rounding); only the work shrinks as the covering radius does.
    * ``"auto"`` (default): pruned on a CPU from ``PRUNED_MIN_ROWS`` rows and 100 kept rows on,
      plain otherwise.

    Extra memory ``O(N k)`` for either (the centred rows; the pruned one keeps them in block
    order, plus ``O(N)`` per-row distances and block ids, and ``32 N`` coordinates while the
    blocks are formed).

    Args:
        features: ``(N, D)`` rows.
        ratio: fraction of rows to keep, in ``(0, 1]``; 1.0 returns ``arange(N)``.
        projection_dim: width of the random projection.
        seed: seed of the projection and of the first row.
        method: ``"auto"``, ``"plain"`` or ``"pruned"`` (see above).

    Returns:
        ``(M,)`` int64 unique row indices in selection order, on ``features.device``.
    """
    if features.dim() != 2 or features.shape[0] == 0:
        raise ValueError(f"expected features (N, D) with N >= 1, got {tuple(features.shape)}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    if projection_dim < 1:
        raise ValueError(f"projection_dim must be >= 1, got {projection_dim}")
    if method not in ("auto", "plain", "pruned"):
        raise ValueError(f"coreset method must be 'auto', 'plain' or 'pruned', got {method!r}")
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
    first = torch.randint(num_rows, (), generator=generator).to(device)
    if method == "auto":
        large = num_rows >= PRUNED_MIN_ROWS and num_keep >= 100
        # On a GPU the plain loop never waits for the device (one product per step); the
        # pruned one reads a block id back on every step. Not measured there (no GPU was lent).
        method = "pruned" if large and device.type == "cpu" else "plain"
    if method == "pruned":
        return _greedy_pruned(points, num_keep, int(first))
    return _greedy_plain(points, num_keep, first)


def _greedy_plain(points: Tensor, num_keep: int, first: Tensor) -> Tensor:
    """The greedy rule over all rows per step (``greedy_coreset(method="plain")``)."""
    num_rows, device = points.shape[0], points.device
    # Centre (distances do not change) so the norm expansion below cancels small numbers.
    points = points - points.mean(0)
    sq_norms = points.square().sum(1)

    selected = torch.empty(num_keep, dtype=torch.long, device=device)
    # 0-d tensors, not Python ints, so a GPU loop never waits for the device.
    newest = first
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


BLOCK_ROWS = 256
"""Target rows per block of the pruned selection. Smaller blocks have tighter radii (more are
skipped) but cost more per step to bound (one product with every block centre)."""

_VISIT_ROWS = 65_536
"""Rows per gathered piece when a step visits blocks: bounds the step's temporary memory."""


def _greedy_pruned(points: Tensor, num_keep: int, first: int) -> Tensor:
    """The greedy rule with lazy, pruned updates (``greedy_coreset(method="pruned")``).

    Rows are ordered into blocks of about ``BLOCK_ROWS`` nearby rows (``_block_order``); each
    block keeps its centre ``m_b``, its radius ``R_b = max |x - m_b|``, its rows' squared
    distances to the selection, their maximum ``u_b``, and how many of the selected centres
    those distances account for. Distances only shrink as centres are added, so a block's
    ``u_b`` stays an upper bound while it is behind. A step takes the block with the largest
    ``u_b``; if the block is behind, it is brought up to date with the centres it missed, in
    one product, and the step looks again; once the block with the largest ``u_b`` is up to
    date, its farthest row is the farthest row of all (every other ``u_b`` bounds its
    block from above), and it is selected. Catching up skips each missed centre ``c`` that
    cannot reach the block: ``|x - c| >= |m_b - c| - R_b`` (triangle inequality), so a centre
    with ``(|m_b - c| - R_b)^2 > u_b`` (plus a rounding margin) changes none of its rows.

    So a block far from everything selected lately is not touched, and a row is compared
    only with the centres that come near its block: the plain loop compares every row with
    every centre. The selection is the plain loop's (the same rule on the same distances; ties
    between equally distant rows and float rounding aside).
    """
    num_rows, dim = points.shape
    device = points.device
    order, starts, counts = _block_order(points, BLOCK_ROWS)
    num_blocks = counts.numel()
    width = int(counts.max())
    slot = torch.arange(width, device=device)
    valid = slot < counts[:, None]  # (blocks, width): padding slots repeat the block's first row
    source = order[torch.where(valid, starts[:, None] + slot, starts[:, None])]
    blocked = points[source.reshape(-1)].view(num_blocks, width, dim)
    blocked -= points.mean(0)  # centred, as the plain loop's rows (the expansion cancels less)
    sq_norms = blocked.square().sum(-1)  # (blocks, width)
    centres = (blocked * valid[..., None]).sum(1) / counts[:, None]
    radii = torch.empty(num_blocks, device=device)
    piece = max(1, _VISIT_ROWS // width)
    for b0 in range(0, num_blocks, piece):
        offset = blocked[b0 : b0 + piece] - centres[b0 : b0 + piece, None]
        radii[b0 : b0 + piece] = offset.norm(dim=-1).amax(1)
    centre_sq = centres.square().sum(1)
    # Rounding margin of the skip test: the expanded |x|^2 - 2 x.c + |c|^2 of float32 rows
    # errs by a few ulps of the largest squared norm; a centre is skipped only beyond that.
    margin = 1e-5 * float(sq_norms.max())

    where = int((order == first).nonzero())  # the first row's place in block order
    block = int(torch.searchsorted(starts, where, right=True)) - 1
    row = where - int(starts[block])
    selected = torch.empty(num_keep, dtype=torch.long, device=device)
    selected[0] = first
    chosen = torch.empty(num_keep, dim, device=device)  # the selected rows, centred
    chosen_sq = torch.empty(num_keep, device=device)
    chosen[0], chosen_sq[0] = blocked[block, row], sq_norms[block, row]

    # Every block against the first centre, all at once (no block can be skipped yet).
    flat = blocked.view(-1, dim)
    min_sq = torch.addmv(sq_norms.view(-1), flat, chosen[0], alpha=-2.0).add_(chosen_sq[0])
    min_sq = min_sq.view(num_blocks, width)
    min_sq[~valid] = -math.inf  # padding slots are never picked
    min_sq[block, row] = -math.inf
    upper = min_sq.amax(1)  # u_b
    seen = [1] * num_blocks  # centres each block's distances account for
    for step in range(1, num_keep):
        while True:
            block = int(torch.argmax(upper))
            missed = seen[block]
            if missed == step:
                break
            seen[block] = step
            new, new_sq = chosen[missed:step], chosen_sq[missed:step]
            gap = torch.addmv(new_sq, new, centres[block], alpha=-2.0).add_(centre_sq[block])
            reach = (gap.clamp_min_(0).sqrt_() - radii[block]).clamp_min_(0).square_()
            near = reach <= upper[block] + margin
            if not bool(near.all()):
                new, new_sq = new[near], new_sq[near]
            if new.shape[0] == 0:
                continue
            sq = torch.addmm(sq_norms[block, :, None], blocked[block], new.T, alpha=-2.0)
            nearest = torch.minimum(min_sq[block], sq.add_(new_sq).amin(1))
            min_sq[block] = nearest
            upper[block] = nearest.max()
        row = int(torch.argmax(min_sq[block]))
        selected[step] = source[block, row]
        chosen[step], chosen_sq[step] = blocked[block, row], sq_norms[block, row]
        min_sq[block, row] = -math.inf
        upper[block] = min_sq[block].max()
    return selected


def _block_order(points: Tensor, block_rows: int, directions: int = 32):
    """Rows grouped into ``2^L`` blocks of nearby rows, ``L = ceil(log2(N / block_rows))``.

    A k-d tree on the rows' coordinates along their leading principal directions (from up to
    65,536 sampled rows): each level splits every block at its median along the direction
    with the most spread left (a split quarters a direction's variance, roughly). Vectorised:
    one sort per level over all rows.

    Returns:
        ``(order, starts, counts)``: row indices block by block, each block's first position
        in ``order`` and its row count (counts differ by at most one).
    """
    num_rows, dim = points.shape
    device = points.device
    sample = points[torch.randperm(num_rows, generator=torch.Generator().manual_seed(0))[:65_536]]
    sample = sample - sample.mean(0)
    variance, vectors = torch.linalg.eigh(sample.T @ sample / sample.shape[0])
    keep = min(directions, dim)
    coords = points @ vectors[:, -keep:].to(device)  # (N, keep)
    spread = variance[-keep:].clone().clamp_min(0)
    splits = max(0, math.ceil(math.log2(max(1.0, num_rows / block_rows))))
    group = torch.zeros(num_rows, dtype=torch.long, device=device)
    ramp = torch.arange(num_rows, device=device)
    for level in range(splits):
        axis = int(torch.argmax(spread))
        spread[axis] /= 4
        by_key = torch.argsort(coords[:, axis])
        order = by_key[torch.argsort(group[by_key], stable=True)]  # by group, then by key
        ordered_group = group[order]
        counts = torch.bincount(ordered_group, minlength=2**level)
        starts = counts.cumsum(0) - counts
        rank = ramp - starts[ordered_group]
        upper_half = rank >= (counts[ordered_group] + 1) // 2
        group[order] = 2 * ordered_group + upper_half.long()
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group, minlength=2**splits)
    starts = counts.cumsum(0) - counts
    return order, starts, counts
