"""The positional search as it was before the norm cache and the augmented GEMM (frozen copy).

``benchmarks/latency.py`` runs it next to ``vsad_lightning.bank.positional`` in the same process,
so the before/after ratio is measured under the same load. Not used by the package.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


@torch.no_grad()
def positional_search(
    rows: Tensor,
    grid: tuple[int, int, int],
    features: Tensor,
    radius: int,
    *,
    max_chunk_bytes: int,
    excluded: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """``(B, V, h, w)`` exact distance of each query to the nearest bank row in its window.

    The nearest candidate is chosen from the expanded ``|a|^2 - 2ab + |b|^2`` form, then its
    distance is recomputed directly.

    Args:
        rows: ``(n V h w, C)`` bank rows, whole feature maps in ``flatten_features`` order.
        grid: ``(V, h, w)``.
        features: ``(B, V, C, h, w)`` queries on the bank's grid (checked by the caller).
        radius: the window's half-width in feature positions.
        max_chunk_bytes: bound of the per-chunk ``(positions, shifts x B, n)`` score block and
            its gathered queries.
        excluded: ``(queries, bank samples)`` index pairs whose comparison is masked.
    """
    views, height, width = grid
    channels = rows.shape[1]
    positions = views * height * width
    count = rows.shape[0] // positions
    bank = rows.float().view(count, positions, channels)  # (n, P, C), P = V h w
    queries = features.to(rows.device, torch.float32).permute(0, 1, 3, 4, 2)  # (B, V, h, w, C)
    batch, device, r = queries.shape[0], queries.device, radius
    offsets = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
    shifts = torch.tensor(offsets, device=device)  # (S, 2)
    num_shifts = len(offsets)
    # Why the queries move, not the bank: with B = 1 each bank row meets at most S queries,
    # so the search is bound by reading the bank; one batched GEMM per chunk of positions
    # reads it once, in place, instead of once per shift. Bank position (v, y, x) meets, in
    # shift (dy, dx), the query at (y - dy, x - dx): an index into the zero-padded queries
    # (padding rows only ever meet out-of-map positions, which step 2 never reads).
    padded_h, padded_w = height + 2 * r, width + 2 * r
    padded = torch.nn.functional.pad(queries, (0, 0, r, r, r, r))
    padded = padded.reshape(batch, views * padded_h * padded_w, channels)
    v_idx = torch.arange(views, device=device).view(-1, 1, 1)
    y_idx = torch.arange(height, device=device).view(1, -1, 1)
    x_idx = torch.arange(width, device=device).view(1, 1, -1)
    row_of = (v_idx * padded_h + y_idx + r).expand(views, height, width).reshape(-1, 1)
    col_of = (x_idx + r).expand(views, height, width).reshape(-1, 1)
    source = (row_of - shifts[:, 0]) * padded_w + (col_of - shifts[:, 1])  # (P, S)
    bank_sq = bank.square().sum(-1).T  # (P, n)

    # 1. Per bank position and shift: the nearest of the n training rows (expanded form).
    per_position = 4 * num_shifts * batch * (count + channels)  # scores + gathered queries
    step = max(1, min(positions, max_chunk_bytes // max(1, per_position)))
    values = torch.empty(positions, num_shifts, batch, device=device)
    indices = torch.empty(positions, num_shifts, batch, dtype=torch.long, device=device)
    for p0 in range(0, positions, step):
        p1 = min(positions, p0 + step)
        q = padded[:, source[p0:p1]].permute(1, 2, 0, 3)  # (p, S, B, C)
        q = q.reshape(p1 - p0, num_shifts * batch, channels)
        b = bank[:, p0:p1].permute(1, 2, 0)  # (p, C, n): a strided view, no copy
        scores = torch.baddbmm(bank_sq[p0:p1, None, :], q, b, alpha=-2.0)
        if excluded is not None:
            query_of, sample_of = excluded
            scores.view(p1 - p0, num_shifts, batch, count)[:, :, query_of, sample_of] = math.inf
        value, index = scores.min(dim=-1)
        values[p0:p1] = value.view(p1 - p0, num_shifts, batch)
        indices[p0:p1] = index.view(p1 - p0, num_shifts, batch)

    # 2. Back to query positions: query (y, x) met bank position (y + dy, x + dx) in shift
    # (dy, dx); positions off the map read the +inf padding. Shifts in order, strict <.
    values = values.view(views, height, width, num_shifts, batch).permute(3, 4, 0, 1, 2)
    indices = indices.view(views, height, width, num_shifts, batch).permute(3, 4, 0, 1, 2)
    values = torch.nn.functional.pad(values, (r, r, r, r), value=math.inf)
    indices = torch.nn.functional.pad(indices, (r, r, r, r))
    best = queries.new_full((batch, views, height, width), math.inf)
    best_row = torch.zeros(best.shape, dtype=torch.long, device=device)
    best_dy = torch.zeros_like(best_row)
    best_dx = torch.zeros_like(best_row)
    for s, (dy, dx) in enumerate(offsets):
        window = (s, slice(None), slice(None), slice(r + dy, r + dy + height))
        window += (slice(r + dx, r + dx + width),)
        better = values[window] < best
        best = torch.where(better, values[window], best)
        best_row = torch.where(better, indices[window], best_row)
        best_dy.masked_fill_(better, dy)
        best_dx.masked_fill_(better, dx)
    # Exact distance to each winner (the expanded form loses precision when a ~ b).
    maps = bank.view(count, views, height, width, channels)
    v_pos = v_idx.view(1, views, 1, 1).expand_as(best_row)
    y_pos = y_idx.view(1, 1, height, 1) + best_dy
    x_pos = x_idx.view(1, 1, 1, width) + best_dx
    winners = maps[best_row, v_pos, y_pos, x_pos]  # (B, V, h, w, C)
    return (queries - winners).norm(dim=-1)
