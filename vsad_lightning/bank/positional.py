"""The exact positional search: each query meets only the bank rows near its own place.

The positional bank (``model.bank_mode: positional``, docs/method.md#memory-bank): a fixed
inspection rig sees each part at nearly the same place in every image, so the query at view
``v``, position ``(y, x)`` is compared only with training features of the same view within
``radius`` positions (Chebyshev). ``MemoryBank.positional_distances`` validates its arguments
and calls ``positional_search``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from vsad_lightning.bank.common import per_bank

_POSITIONS_PER_CHUNK = 1024
"""Bank positions per GEMM chunk (at most; ``max_chunk_bytes`` and, on a CPU,
``CPU_BLOCK_BYTES`` may cut it). Measured on 2 cores with n = 250, C = 32: 64 positions per chunk
were slower than the previous search, which rebuilt the bank operand per chunk (per-call
overhead)."""

CPU_BLOCK_BYTES = 2 * 2**20
"""On a CPU, a chunk's score block ``(positions, shifts x B, n)`` is kept near this size, so the
GEMM writes it and the minimum reads it back while it is still in the core's cache, and no
block is large enough to be mapped fresh from the kernel on every call. Measured on 2 cores
(the demo's latent level at 256 px, 250 samples, radius 3, one sample; distances identical):
1024 positions per chunk (a 50 MB block) 0.41-0.45 s, 32 positions (1.5 MB) 0.32-0.36 s,
8 positions 0.40 s (per-call overhead); inside the scoring of a whole sample, where the large
blocks also page-faulted, the three levels together took 0.67 s against 0.36-0.45 s
(benchmarks/results/latency_cpu.md). A GPU keeps the large chunks: a kernel launch per small
chunk would cost more there than a cache miss."""

LAYOUT_CACHE_MAX_BYTES = 2 * 2**30
"""Largest position-major copy of a bank level kept between searches (``position_major``).

The copy is the search's GEMM operand ``[-2 b, |b|^2]`` in float32, ``P x n x (C + 1)`` values:
1.0 GB for the demo's latent level at 256 px with 250 training samples. Building it per call
(strided reads of the sample-major rows) took as long as the GEMM itself; a bigger bank (a
Real-IAD category at SD2 widths) keeps its memory and builds each chunk per call instead."""

_NORMS_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()
_LAYOUT_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()


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
    # Augmented queries [a, 1]: with the bank as [-2 b, |b|^2] one GEMM gives |b|^2 - 2 a.b,
    # the norms added inside the product instead of by a pass over the scores.
    padded = torch.zeros(batch, views, padded_h, padded_w, channels + 1, device=device)
    padded[:, :, r : r + height, r : r + width, :channels] = queries
    padded[..., channels] = 1.0
    # Query-row-major (R, B, C + 1), so a chunk's queries are one index_select into a buffer.
    padded = padded.reshape(batch, -1, channels + 1).transpose(0, 1).contiguous()
    v_idx = torch.arange(views, device=device).view(-1, 1, 1)
    y_idx = torch.arange(height, device=device).view(1, -1, 1)
    x_idx = torch.arange(width, device=device).view(1, 1, -1)
    row_of = (v_idx * padded_h + y_idx + r).expand(views, height, width).reshape(-1, 1)
    col_of = (x_idx + r).expand(views, height, width).reshape(-1, 1)
    source = (row_of - shifts[:, 0]) * padded_w + (col_of - shifts[:, 1])  # (P, S)

    # 1. Per bank position and shift: the nearest of the n training rows (expanded form).
    per_position = 4 * (num_shifts * batch * (count + channels + 1) + count * (channels + 1))
    block_bytes = max_chunk_bytes
    if device.type == "cpu":
        block_bytes = min(block_bytes, CPU_BLOCK_BYTES)
    step = max(1, min(positions, _POSITIONS_PER_CHUNK, block_bytes // max(1, per_position)))
    operand = BankOperand(rows, positions, step)
    values = torch.empty(positions, num_shifts * batch, device=device)
    indices = torch.empty(positions, num_shifts * batch, dtype=torch.long, device=device)
    block = torch.empty(step, num_shifts * batch, count, device=device)
    gathered = torch.empty(step * num_shifts, batch, channels + 1, device=device)
    for p0 in range(0, positions, step):
        p1 = min(positions, p0 + step)
        p = p1 - p0
        index = source[p0:p1].reshape(-1)
        q = torch.index_select(padded, 0, index, out=gathered[: p * num_shifts])
        q = q.view(p, num_shifts * batch, channels + 1)  # (p, S x B, C + 1), shift-major
        scores = torch.bmm(q, operand.range(p0, p1).transpose(1, 2), out=block[:p])
        if excluded is not None:
            query_of, sample_of = excluded
            scores.view(p, num_shifts, batch, count)[:, :, query_of, sample_of] = math.inf
        torch.min(scores, dim=-1, out=(values[p0:p1], indices[p0:p1]))

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
    maps = rows.view(count, views, height, width, channels)
    v_pos = v_idx.view(1, views, 1, 1).expand_as(best_row)
    y_pos = y_idx.view(1, 1, height, 1) + best_dy
    x_pos = x_idx.view(1, 1, 1, width) + best_dx
    winners = maps[best_row, v_pos, y_pos, x_pos].float()  # (B, V, h, w, C)
    return (queries - winners).norm(dim=-1)


class BankOperand:
    """The search's GEMM operand ``[-2 b, |b|^2]`` of bank positions, ``(k, n, C + 1)``.

    Read from the position-major copy cached per bank (``position_major``) when the copy fits
    ``LAYOUT_CACHE_MAX_BYTES``; otherwise built per call, ``chunk`` positions at a time into one
    reused buffer, from the sample-major rows (float16 converted on the way) and the cached norms
    (``positional_norms``).
    """

    def __init__(self, rows: Tensor, positions: int, chunk: int) -> None:
        self.channels = rows.shape[1]
        self.bank = rows.view(rows.shape[0] // positions, positions, self.channels)  # (n, P, C)
        self.cached = position_major(rows, positions)
        if self.cached is None:
            self.norms = positional_norms(rows, positions)
            self.buffer = torch.empty(
                chunk, self.bank.shape[0], self.channels + 1, device=rows.device
            )

    def range(self, p0: int, p1: int) -> Tensor:
        """Positions ``p0 .. p1 - 1`` (at most ``chunk`` of them); valid until the next call."""
        if self.cached is not None:
            return self.cached[p0:p1]
        out = self.buffer[: p1 - p0]
        torch.mul(self.bank[:, p0:p1].transpose(0, 1), -2.0, out=out[..., : self.channels])
        out[..., self.channels] = self.norms[p0:p1]
        return out


def position_major(rows: Tensor, positions: int) -> Tensor | None:
    """``(P, n, C + 1)`` float32 ``[-2 b, |b|^2]``, cached per bank (``common.per_bank``), or
    None when it would exceed ``LAYOUT_CACHE_MAX_BYTES``."""
    count, channels = rows.shape[0] // positions, rows.shape[1]
    if 4 * positions * count * (channels + 1) > LAYOUT_CACHE_MAX_BYTES:
        return None

    def build() -> Tensor:
        out = torch.empty(positions, count, channels + 1, device=rows.device)
        for i in range(count):  # one stored feature map at a time: no float32 copy of the bank
            sample = rows[i * positions : (i + 1) * positions].float()
            torch.mul(sample, -2.0, out=out[:, i, :channels])
            out[:, i, channels] = sample.square().sum(1)
        return out

    return per_bank(_LAYOUT_CACHE, rows, build)


def positional_norms(rows: Tensor, positions: int) -> Tensor:
    """``(P, n)`` float32 squared norms of the bank rows, position-major, cached per bank.

    Computed once per bank tensor (``common.per_bank``: invalidated when the bank changes in
    place), so a search no longer reads the whole bank a second time for them.
    """

    def build() -> Tensor:
        count = rows.shape[0] // positions
        out = torch.empty(positions, count, device=rows.device)
        for i in range(count):  # one stored feature map at a time: no float32 copy of the bank
            out[:, i] = rows[i * positions : (i + 1) * positions].float().square().sum(1)
        return out

    return per_bank(_NORMS_CACHE, rows, build)
