"""MVAM, the Multi-View Alignment Module (docs/method.md#mvam).

For view ``v`` of a feature map ``x`` at one decoder level and every position ``p``, MVAM
attends over a small set of *candidates*: the self position (``u = v``, ``q = p``) plus, for
every other view ``u``, the ``R x R`` integer grid of positions around ``p̂_u = π(H(v→u)[p; 1])``.
Each candidate carries the sub-pixel displacement ``Δp`` between its pixel centre and
``p̂_u``, encoded by a frequency embedding ``γ(Δp)`` that enters the keys and values.

Conventions (docs/conventions.md): feature pixel ``(i, j)`` (column, row) has centre
``(i + 0.5, j + 0.5)``; ``homographies[b, v, u]`` maps pixel-centre coordinates of view ``v``
to view ``u`` *at this map's resolution* (``scale_homography`` to ``(w, h)``).

Choices made here (the design is silent on them):

- **Base of the candidate grid.** ``base = floor(p̂_u)``, the pixel that contains ``p̂_u``
  (pixels cover ``[i, i+1)``). It equals ``round(p̂_u - 0.5)`` (the pixel whose centre is
  nearest) except exactly on pixel boundaries, where ``floor`` is deterministic and
  ``round``'s half-to-even rule would alternate between left and right.
- **Neighbour pairs only.** The views are grouped by their number of neighbours ``k``
  (``neighbour_groups``); inside a group every position has the same ``K = 1 + k R²``
  candidates, so each group is one gather and a few batched matmuls, and non-neighbour pairs
  are never computed. With Real-IAD's ``top_and_ring`` graph on 5 views (the top view has 4
  neighbours, the ring views 3) that is 149 candidates per position and view set instead of
  the 185 of gathering every other view and masking the non-neighbours (20 % less work).
- **Positional terms applied after the attention sum.** ``k_c = W_k x_u(q) + P_k γ(Δp)`` gives
  ``q·k_c = q·W_k x_u(q) + (P_kᵀ q)·γ(Δp)`` and ``Σ a_c v_c = Σ a_c W_v x_u(q) + P_v Σ a_c γ(Δp)``
  (per head). Both identities are exact, so only the projected features are gathered and the
  ``(K, attention_dim)``-wide positional keys and values are never materialised.
- ``W_q``, ``W_k``, ``W_v``, ``P_k``, ``P_v`` have no bias (a key bias shifts every logit
  equally, a value bias is absorbed by ``W_o``'s bias); ``W_o`` has one, zero-initialised
  together with its weight so MVAM is exactly the identity at step 0. Consequence: at step 0
  only ``W_o`` receives gradient (every other parameter reaches the output through ``W_o``);
  the rest start learning from the second optimiser step.
- The geometry (projection, validity, ``Δp``, ``γ``) is computed in float32 (float64 when the
  homographies are float64) with autocast disabled and without gradient: homographies are
  data, not parameters. ``γ`` is cast to the activation dtype only when it meets the keys.

Memory (the dominant tensors of one forward pass, per MVAM call, kept for backward):
``M = B·V·h·w`` positions, ``K = 1 + (V−1)·R²`` candidates, ``D = attention_dim``,
``s`` = bytes per element of the activation dtype (4 fp32, 2 bf16), ``H`` heads, ``L``
frequencies:

- gathered keys and values: ``M·K·2D·s`` bytes (the big one; independent of the channel
  count ``C``, which only enters through the ``M·C`` input/output maps);
- gather index (int64) ``8·M·K``, validity ``M·K``, offsets ``8·M·K``, ``γ`` ``16·L·M·K``,
  logits and attention weights ``2·4·H·M·K``.

``candidate_bytes`` computes these numbers. Example: SD2 at a 64x64 latent, 5 views, R = 3,
D = 64, fp32: ``M = 20480``, ``K = 37``, gathered K/V = 388 MB per call; in bf16, 194 MB.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vsad_lightning.geometry.projection import pixel_centre_grid, project_points


def other_views(num_views: int, *, device=None) -> Tensor:
    """``(V, V-1)`` long: ``other_views(V)[v, j]`` is the ``j``-th view ``u != v`` (ascending)."""
    j = torch.arange(num_views - 1, device=device)
    v = torch.arange(num_views, device=device)[:, None]
    return j[None, :] + (j[None, :] >= v).long()


def frequency_embedding(offsets: Tensor, window: int, num_frequencies: int) -> Tensor:
    """``γ(Δp)`` of docs/method.md#mvam, step 3, for offsets ``(..., 2)`` (``Δx, Δy``).

    Returns ``(..., 4L)`` ordered ``[sin(f_k Δx), cos(f_k Δx), sin(f_k Δy), cos(f_k Δy)]`` for
    ``k = 0..L-1`` with ``f_k = 2^k π / R``.
    """
    k = torch.arange(num_frequencies, device=offsets.device, dtype=offsets.dtype)
    freqs = (2.0**k) * torch.pi / window  # (L,)
    angles = offsets[..., None, :] * freqs[:, None]  # (..., L, 2): [f_k Δx, f_k Δy]
    sin, cos = torch.sin(angles), torch.cos(angles)
    # (..., L, 4) = [sin x, cos x, sin y, cos y] per frequency, then flattened.
    emb = torch.stack([sin[..., 0], cos[..., 0], sin[..., 1], cos[..., 1]], dim=-1)
    return emb.flatten(-2)


@dataclass
class CandidateGeometry:
    """Where every candidate of every position comes from (no features involved).

    Layout is position-major: ``N = h*w`` positions in row-major order, then ``K`` candidates.
    Candidate ``0`` is the self candidate; candidate ``1 + j·R² + (dy + r)·R + (dx + r)`` is
    offset ``(dx, dy)`` around the projection into the ``j``-th other view
    (``other_views[v, j]``).

    Attributes:
        source: ``(B, V, N, K)`` long, ``u·N + q`` with ``q = qy·w + qx`` the flat position
            in view ``u`` (clamped into the map for invalid candidates, so it is always a
            legal index).
        valid: ``(B, V, N, K)`` bool.
        offsets: ``(B, V, N, K, 2)`` geometry dtype, ``Δp = (q + 0.5) − p̂_u`` in feature pixels
            ``(x, y)``; 0 for the self candidate. Meaningless where ``valid`` is False.
        projected: ``(B, V, V-1, N, 2)`` geometry dtype, ``p̂_u`` for ``u = other_views[v, j]``.
        other_views: ``(V, V-1)`` long.
        height, width: the map size.
    """

    source: Tensor
    valid: Tensor
    offsets: Tensor
    projected: Tensor
    other_views: Tensor
    height: int
    width: int

    @property
    def source_view(self) -> Tensor:
        """``(B, V, N, K)`` long: the view ``u`` each candidate is read from."""
        return torch.div(self.source, self.height * self.width, rounding_mode="floor")

    @property
    def source_index(self) -> Tensor:
        """``(B, V, N, K)`` long: the flat position ``q = qy·w + qx`` in view ``u``."""
        return self.source % (self.height * self.width)


@dataclass
class CandidateSet(CandidateGeometry):
    """``CandidateGeometry`` plus the gathered values.

    Attributes:
        values: ``(B, V, N, K, D)``: ``values[b, v, n, k]`` is the input's ``D``-vector at
            the candidate's ``(source_view, source_index)`` (position-major, channels last,
            which is the layout the gather produces and the attention consumes).
    """

    values: Tensor


def _check_homographies(homographies: Tensor, batch: int, views: int) -> None:
    expected = (batch, views, views, 3, 3)
    if tuple(homographies.shape) != expected:
        raise ValueError(
            f"homographies must have shape (B, V, V, 3, 3) = {expected}, "
            f"got {tuple(homographies.shape)}"
        )


def _check_neighbour_mask(mask: Tensor, views: int) -> None:
    if mask.dtype != torch.bool or tuple(mask.shape) != (views, views):
        raise ValueError(
            f"neighbour_mask must be a bool tensor of shape (V, V) = ({views}, {views}), "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )


@torch.no_grad()
def candidate_geometry(
    homographies: Tensor, neighbour_mask: Tensor, window: int, height: int, width: int
) -> CandidateGeometry:
    """Candidate positions, validity and offsets (docs/method.md#mvam, steps 1-3), vectorised.

    Every view gets candidates from all ``V - 1`` other views, non-neighbours marked invalid
    (the layout of ``CandidateGeometry``). ``MVAM.forward`` itself computes neighbour pairs
    only (``neighbour_groups``); this full layout is what the tests and benchmarks inspect.

    Args:
        homographies: ``(B, V, V, 3, 3)`` scaled to ``(width, height)``, pixel centres,
            ``[b, v, u]`` maps ``v → u``.
        neighbour_mask: ``(V, V)`` bool, ``[v, u]`` True when ``u`` is a neighbour of ``v``.
        window: ``R`` (odd).
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window (R) must be a positive odd integer, got {window}")
    B, V = homographies.shape[:2]
    _check_homographies(homographies, B, V)
    _check_neighbour_mask(neighbour_mask, V)
    device = homographies.device
    views = torch.arange(V, device=device)
    others = other_views(V, device=device)  # (V, V-1)
    is_neighbour = neighbour_mask.to(device)[views[:, None], others]
    return _geometry(homographies, views, others, is_neighbour, window, height, width)


def _views_of(x: Tensor, views: Tensor) -> Tensor:
    """``x[:, views]``, as a slice (no copy, a cheap backward) when ``views`` are consecutive."""
    first, count = int(views[0]), views.numel()
    if int(views[-1]) - first + 1 == count:
        return x[:, first : first + count]
    return x[:, views]


def neighbour_groups(neighbour_mask: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The views grouped by their number of neighbours: ``[(views (G,), partners (G, k))]``.

    ``partners[i]`` lists the neighbours of ``views[i]`` in ascending order. Within a group
    every view has the same ``K = 1 + k R²`` candidates, so a group is one gather and a few
    batched matmuls; non-neighbour pairs are never computed (with ``top_and_ring`` on 5 views,
    the top view has 4 neighbours and the ring views 3: 149 instead of 185 candidates per
    position). Groups are ordered by their first view, views ascending inside a group.
    """
    mask = neighbour_mask.clone()
    mask.fill_diagonal_(False)
    counts = mask.sum(1)
    groups = []
    for k in set(counts.tolist()):
        views = (counts == k).nonzero().flatten()
        partners = torch.stack([mask[v].nonzero().flatten() for v in views.tolist()])
        groups.append((views, partners.view(views.numel(), k)))
    # By first view: when every group is a run of consecutive views (top_and_ring: [0],
    # [1..4]), the groups' outputs concatenate in view order and need no reordering.
    return sorted(groups, key=lambda group: int(group[0][0]))


def _geometry(
    homographies: Tensor,
    views: Tensor,
    partners: Tensor,
    partner_valid: Tensor,
    window: int,
    height: int,
    width: int,
) -> CandidateGeometry:
    """Candidates of ``views`` (G,) from their ``partners`` (G, k) (``partner_valid``: the pairs
    that may contribute); layout as ``CandidateGeometry`` with ``k`` in place of ``V - 1``."""
    B = homographies.shape[0]
    G, k = partners.shape
    device = homographies.device
    N, R, r = height * width, window, window // 2
    with torch.autocast(device_type=device.type, enabled=False):
        # float32 at least: bf16 resolves only 0.25-0.5 pixel at coordinates around 64.
        dtype = torch.float64 if homographies.dtype == torch.float64 else torch.float32
        H = homographies.to(dtype)[:, views[:, None], partners]  # (B, G, k, 3, 3)
        centres = pixel_centre_grid(width, height, dtype=dtype, device=device)  # (N, 2)
        projected, w_hom = project_points(H, centres)  # (B,G,k,N,2), (B,G,k,N)
        projected = torch.nan_to_num(projected, nan=-1e6, posinf=1e6, neginf=-1e6)
        # Clamp before the integer conversion (float→int of huge values is undefined); a
        # clamped point is still so far outside that every candidate around it is outside.
        limits = torch.tensor([width, height], device=device, dtype=dtype)
        base = torch.floor(torch.minimum(projected.clamp_min(-r - 2.0), limits + r + 2)).long()

        dy, dx = torch.meshgrid(
            torch.arange(-r, r + 1, device=device),
            torch.arange(-r, r + 1, device=device),
            indexing="ij",
        )
        grid = torch.stack([dx.reshape(-1), dy.reshape(-1)], dim=-1)  # (R², 2), row-major
        q = base[..., None, :] + grid  # (B, G, k, N, R², 2)
        qx, qy = q[..., 0], q[..., 1]
        inside = (qx >= 0) & (qx < width) & (qy >= 0) & (qy < height)
        in_front = (w_hom > 0)[..., None]
        valid = inside & in_front & partner_valid.to(device)[None, :, :, None, None]
        offsets = (q.to(dtype) + 0.5) - projected[..., None, :]  # (B, G, k, N, R², 2)
        flat_q = qy.clamp(0, height - 1) * width + qx.clamp(0, width - 1)
        source = partners[None, :, :, None, None] * N + flat_q

        # (B, G, k, N, R², ...) -> (B, G, N, k·R², ...), then prepend the self candidate.
        def to_position_major(t: Tensor) -> Tensor:
            t = t.movedim(3, 2)
            return t.reshape(*t.shape[:3], k * R * R, *t.shape[5:])

        n = torch.arange(N, device=device)
        self_source = (views[:, None] * N + n).expand(B, G, N)
        source = torch.cat([self_source[..., None], to_position_major(source)], dim=-1)
        valid = torch.cat(
            [torch.ones(B, G, N, 1, dtype=torch.bool, device=device), to_position_major(valid)],
            dim=-1,
        )
        self_offsets = torch.zeros(B, G, N, 1, 2, dtype=dtype, device=device)
        offsets = torch.cat([self_offsets, to_position_major(offsets)], dim=-2)
    return CandidateGeometry(
        source=source,
        valid=valid,
        offsets=offsets,
        projected=projected,
        other_views=partners,
        height=height,
        width=width,
    )


def gather_rows(values: Tensor, source: Tensor) -> Tensor:
    """Gather ``values`` ``(B, V, D, h, w)`` at ``source`` ``(B, V, N, K)`` → ``(B, V, N, K, D)``.

    One ``index_select`` over the flattened ``(B·V·h·w, D)`` rows (channels last, so each
    candidate is one contiguous row); its backward is one ``index_add`` into a map-sized
    buffer.
    """
    B, V, D, h, w = values.shape
    rows = values.permute(0, 1, 3, 4, 2).reshape(B * V * h * w, D)
    batch_offset = torch.arange(B, device=source.device).view(B, 1, 1, 1) * (V * h * w)
    flat = (source + batch_offset).reshape(-1)
    return rows.index_select(0, flat).view(*source.shape, D)


def gather_candidates(
    values: Tensor, homographies: Tensor, neighbour_mask: Tensor, window: int
) -> CandidateSet:
    """Candidates of every position of every view, with their gathered values.

    Args:
        values: ``(B, V, D, h, w)`` already-projected features.
        homographies: ``(B, V, V, 3, 3)`` scaled to ``(w, h)``.
        neighbour_mask: ``(V, V)`` bool.
        window: ``R``.

    Returns:
        A ``CandidateSet`` (layout in ``CandidateGeometry``; ``values`` is
        ``(B, V, h*w, K, D)``).
    """
    if values.dim() != 5:
        raise ValueError(f"values must be (B, V, D, h, w), got shape {tuple(values.shape)}")
    B, V, _, h, w = values.shape
    _check_homographies(homographies, B, V)
    geometry = candidate_geometry(homographies, neighbour_mask, window, h, w)
    return CandidateSet(**vars(geometry), values=gather_rows(values, geometry.source))


def candidate_bytes(
    batch: int,
    views: int,
    height: int,
    width: int,
    attention_dim: int = 64,
    window: int = 3,
    num_heads: int = 4,
    num_frequencies: int = 4,
    element_size: int = 4,
) -> dict[str, int]:
    """Bytes of the per-candidate tensors of one MVAM call (see the module docstring)."""
    M = batch * views * height * width
    K = 1 + (views - 1) * window * window
    gathered = M * K * 2 * attention_dim * element_size
    geometry = M * K * (8 + 1 + 8 + 16 * num_frequencies)
    attention = M * K * 2 * 4 * num_heads
    return {
        "positions": M,
        "candidates": K,
        "gathered_kv": gathered,
        "geometry": geometry,
        "attention": attention,
        "total": gathered + geometry + attention,
    }


class MVAM(nn.Module):
    """Multi-View Alignment Module: homography-guided windowed attention across views.

    Args:
        channels: ``C`` of the feature map.
        attention_dim: ``D``, the width of queries, keys and values (split over heads).
        num_heads: attention heads; ``D`` must be divisible by it.
        window: ``R``, the candidate grid side (odd; default 3).
        num_frequencies: ``L`` of ``γ`` (default 4).
        neighbour_mask: default ``(V, V)`` bool neighbour mask (``None``: every other view).
    """

    def __init__(
        self,
        channels: int,
        attention_dim: int = 64,
        num_heads: int = 4,
        window: int = 3,
        num_frequencies: int = 4,
        neighbour_mask: Tensor | None = None,
    ) -> None:
        super().__init__()
        if attention_dim % num_heads != 0:
            raise ValueError(
                f"attention_dim ({attention_dim}) must be divisible by num_heads ({num_heads})"
            )
        if window < 1 or window % 2 == 0:
            raise ValueError(f"window (R) must be a positive odd integer, got {window}")
        self.channels = channels
        self.attention_dim = attention_dim
        self.num_heads = num_heads
        self.head_dim = attention_dim // num_heads
        self.window = window
        self.num_frequencies = num_frequencies
        embed = 4 * num_frequencies
        # W_q, W_k, W_v: per-position projections, applied *before* gathering (step 4).
        self.to_q = nn.Conv2d(channels, attention_dim, 1, bias=False)
        self.to_k = nn.Conv2d(channels, attention_dim, 1, bias=False)
        self.to_v = nn.Conv2d(channels, attention_dim, 1, bias=False)
        # P_k, P_v: the displacement embedding's contribution to keys and values.
        self.pos_k = nn.Linear(embed, attention_dim, bias=False)
        self.pos_v = nn.Linear(embed, attention_dim, bias=False)
        # W_o, zero-initialised: exact identity at step 0 (step 5).
        self.to_out = nn.Conv2d(attention_dim, channels, 1)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)
        if neighbour_mask is not None:
            _check_neighbour_mask(neighbour_mask, neighbour_mask.shape[0])
            self.register_buffer("neighbour_mask", neighbour_mask.clone(), persistent=False)
        else:
            self.neighbour_mask = None

    def _resolve_mask(self, override: Tensor | None, views: int, device) -> Tensor:
        mask = override if override is not None else self.neighbour_mask
        if mask is None:
            return ~torch.eye(views, dtype=torch.bool, device=device)
        _check_neighbour_mask(mask, views)
        return mask.to(device)

    def forward(
        self,
        x: Tensor,
        homographies: Tensor,
        neighbour_mask: Tensor | None = None,
        layout_cache: dict | None = None,
    ) -> Tensor:
        """Align ``x`` ``(B, V, C, h, w)`` across views; returns the same shape.

        ``homographies`` ``(B, V, V, 3, 3)`` must already be scaled to this map's ``(w, h)``.
        ``neighbour_mask`` overrides the constructor's (``None`` in both: every other view).
        ``layout_cache``: a dict shared by the MVAMs of ONE U-Net call (same homographies and
        neighbour mask). The candidate geometry and its ``γ(Δp)`` depend only on those, the
        map size, ``R`` and ``L``, so the first MVAM at a size computes them and the others
        reuse them (measured: they were 40 % of MVAM's forward time on the tiny backbone).
        """
        if x.dim() != 5 or x.shape[2] != self.channels:
            raise ValueError(
                f"MVAM expects x of shape (B, V, {self.channels}, h, w), got {tuple(x.shape)}"
            )
        B, V, C, h, w = x.shape
        _check_homographies(homographies, B, V)
        mask = self._resolve_mask(neighbour_mask, V, x.device)
        key = (B, V, h, w, self.window, self.num_frequencies)
        layout = layout_cache.get(key) if layout_cache is not None else None
        if layout is None:
            layout = self._layout(homographies, mask, h, w)
            if layout_cache is not None:
                layout_cache[key] = layout
        groups, order = layout
        D = self.attention_dim

        # Step 4: project every position once, then gather D-wide rows (never C-wide ones).
        flat_x = x.reshape(B * V, C, h, w)
        weight = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight], dim=0)
        qkv = F.conv2d(flat_x, weight).view(B, V, 3 * D, h, w)
        keys_all, vals_all = qkv[:, :, D : 2 * D], qkv[:, :, 2 * D :]
        mixed = [
            self._attend(_views_of(qkv, views)[:, :, :D], keys_all, vals_all, geometry, gamma)
            for views, geometry, gamma in groups
        ]
        # (B, V, h·w, D) in view order: the groups' views concatenated, then put back in place.
        mixed = torch.cat(mixed, dim=1) if len(mixed) > 1 else mixed[0]
        if order is not None:
            mixed = mixed[:, order]
        mixed = mixed.reshape(B * V, h, w, D).permute(0, 3, 1, 2)
        return x + self.to_out(mixed).view(B, V, C, h, w)

    def _layout(self, homographies: Tensor, mask: Tensor, h: int, w: int):
        """Per neighbour group: its views, candidate geometry and ``γ(Δp)``; plus the order that
        puts the groups' concatenated outputs back in view order (None: already in order)."""
        groups = []
        for views, partners in neighbour_groups(mask.cpu()):
            views, partners = views.to(mask.device), partners.to(mask.device)
            every = torch.ones(partners.shape, dtype=torch.bool, device=mask.device)
            geometry = _geometry(homographies, views, partners, every, self.window, h, w)
            gamma = frequency_embedding(geometry.offsets, self.window, self.num_frequencies)
            K = geometry.source.shape[-1]
            groups.append((views, geometry, gamma.view(-1, K, gamma.shape[-1])))
        concatenated = torch.cat([views for views, _, _ in groups])
        V = mask.shape[0]
        if torch.equal(concatenated, torch.arange(V, device=mask.device)):
            return groups, None
        return groups, torch.argsort(concatenated)

    def _attend(
        self, q: Tensor, keys_all: Tensor, vals_all: Tensor, geometry: CandidateGeometry, gamma
    ) -> Tensor:
        """Steps 4-5 for one neighbour group: ``(B, G, h·w, D)`` attention output of its views.

        ``q`` ``(B, G, D, h, w)`` are the group's queries, ``keys_all``/``vals_all``
        ``(B, V, D, h, w)`` every view's projected keys and values.
        """
        B, G = q.shape[:2]
        D, heads, dh = self.attention_dim, self.num_heads, self.head_dim
        N, K = geometry.source.shape[2], geometry.source.shape[-1]
        M = B * G * N
        q = q.permute(0, 1, 3, 4, 2).reshape(M, heads, dh)
        keys = gather_rows(keys_all, geometry.source).view(M, K, D)
        vals = gather_rows(vals_all, geometry.source).view(M, K, D)
        gamma = gamma.to(q.dtype)  # (M, K, 4L)
        p_k = self.pos_k.weight.view(heads, dh, -1)  # (heads, dh, 4L)
        p_v = self.pos_v.weight.view(heads, dh, -1)

        # Logits q·k_c per head, as one batched matmul against a block-diagonal query
        # (M, D, heads): column h holds q_h in rows h·dh..(h+1)·dh. This keeps the gathered
        # keys in their (M, K, D) layout (no copy), at the cost of `heads`x the tiny FLOPs.
        q_blocks = torch.diag_embed(q.transpose(1, 2)).transpose(1, 2).reshape(M, D, heads)
        logits = torch.bmm(keys, q_blocks)  # (M, K, heads): q·W_k x_u(q)
        q_pos = torch.einsum("mhd,hdf->mfh", q, p_k.to(q.dtype))  # P_kᵀ q per head
        logits = logits + torch.bmm(gamma, q_pos)  # + (P_kᵀ q)·γ(Δp)
        # Softmax in float32 at least (bf16 logits lose the small differences that matter).
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * dh**-0.5
        logits = logits.masked_fill(~geometry.valid.view(M, K, 1), float("-inf"))
        attn = logits.softmax(dim=1).to(vals.dtype)  # self candidate is valid: finite

        # Σ_c a_c v_c per head = Σ a_c W_v x_u(q) + P_v Σ a_c γ(Δp).
        attn_t = attn.transpose(1, 2)  # (M, heads, K)
        mixed = torch.bmm(attn_t, vals).view(M, heads, heads, dh)  # all head pairs
        mixed = torch.diagonal(mixed, dim1=1, dim2=2).transpose(1, 2)  # (M, heads, dh)
        mixed_gamma = torch.bmm(attn_t, gamma)  # (M, heads, 4L)
        mixed = mixed + torch.einsum("mhf,hdf->mhd", mixed_gamma, p_v.to(mixed_gamma.dtype))
        return mixed.reshape(B, G, N, D)
