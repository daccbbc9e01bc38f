"""FRM, the Fusion Refiner Module, and its consistency loss L_r (docs/method.md#frm).

``F_v = x̃_v + W_2 GELU(W_1 [GN(x̃_v); g])`` with ``g = mean_v GAP(x̃_v)`` the global
multi-view context of the sample and ``W_2`` zero-initialised (identity at step 0).

``L_r = mean_{(v,u), p} || n(F_v(p)) − n(F_u(p̂_u)) ||²`` over neighbouring ordered pairs and
valid positions, ``n`` the L2 normalisation over channels and ``F_u`` sampled bilinearly at
``p̂_u = π(H(v→u)[p; 1])`` (pixel-centre coordinates, homographies scaled to the map).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vsad_lightning.geometry.projection import sample_through


class FRM(nn.Module):
    """Fusion Refiner Module: a residual 1x1-conv MLP on each view plus the sample's context.

    Args:
        channels: ``C`` of the feature map.
        hidden_channels: width of the MLP (default ``C``).
        num_groups: GroupNorm groups; ``gcd(num_groups, C)`` is used so any ``C`` works.

    ``W_1`` acts on the channel concatenation ``[GN(x̃_v); g]`` (``2C`` inputs). It is stored as
    its two halves, ``local_in`` (the ``GN(x̃_v)`` columns, with the bias) and ``global_in``
    (the ``g`` columns): ``W_1 [a; g] = W_1a a + W_1b g`` exactly, and ``W_1b g`` is computed
    once per sample instead of on an ``h·w``-times broadcast copy of ``g``.
    """

    def __init__(
        self, channels: int, hidden_channels: int | None = None, num_groups: int = 32
    ) -> None:
        super().__init__()
        hidden = hidden_channels or channels
        self.channels = channels
        self.norm = nn.GroupNorm(math.gcd(num_groups, channels), channels)
        self.local_in = nn.Conv2d(channels, hidden, 1)  # W_1, GN(x̃_v) half (+ bias)
        self.global_in = nn.Linear(channels, hidden, bias=False)  # W_1, g half
        self.act = nn.GELU()
        self.out = nn.Conv2d(hidden, channels, 1)  # W_2, zero-initialised
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, V, C, h, w) -> (B, V, C, h, w)``."""
        if x.dim() != 5 or x.shape[2] != self.channels:
            raise ValueError(
                f"FRM expects x of shape (B, V, {self.channels}, h, w), got {tuple(x.shape)}"
            )
        B, V, C, h, w = x.shape
        context = x.mean(dim=(1, 3, 4))  # g = mean_v GAP(x̃_v): (B, C)
        flat = x.reshape(B * V, C, h, w)
        hidden = self.local_in(self.norm(flat)).view(B, V, -1, h, w)
        hidden = hidden + self.global_in(context).view(B, 1, -1, 1, 1)
        update = self.out(self.act(hidden).flatten(0, 1)).view(B, V, C, h, w)
        return x + update


def consistency_loss(features: Tensor, homographies: Tensor, neighbour_mask: Tensor) -> Tensor:
    """``L_r`` at one level (docs/method.md#consistency-loss), all ordered neighbour pairs at once.

    Args:
        features: ``(B, V, C, h, w)``, the FRM outputs.
        homographies: ``(B, V, V, 3, 3)`` scaled to ``(w, h)``, ``[b, v, u]`` maps ``v → u``.
        neighbour_mask: ``(V, V)`` bool.

    A position is valid for pair ``(v, u)`` when ``p̂_u`` lies inside the map
    (``0 ≤ x ≤ w``, ``0 ≤ y ≤ h``) and the homogeneous ``w > 0``. Sampling uses
    ``padding_mode="border"``: in the half-pixel band between the outermost pixel centres and
    the map's edge the border pixel is replicated rather than blended with zeros.
    Computed in float32. Returns a scalar that is 0 (with a gradient path to ``features``)
    when no valid pair exists.
    """
    if features.dim() != 5:
        raise ValueError(f"features must be (B, V, C, h, w), got {tuple(features.shape)}")
    B, V, C, h, w = features.shape
    if tuple(homographies.shape) != (B, V, V, 3, 3):
        raise ValueError(
            f"homographies must have shape (B, V, V, 3, 3) = {(B, V, V, 3, 3)}, "
            f"got {tuple(homographies.shape)}"
        )
    if neighbour_mask.dtype != torch.bool or tuple(neighbour_mask.shape) != (V, V):
        raise ValueError(
            f"neighbour_mask must be a bool tensor of shape ({V}, {V}), "
            f"got {neighbour_mask.dtype} {tuple(neighbour_mask.shape)}"
        )
    device = features.device
    pairs = (neighbour_mask.to(device) & ~torch.eye(V, dtype=torch.bool, device=device)).nonzero()
    src, dst = pairs[:, 0], pairs[:, 1]  # ordered pairs (v, u)
    P = pairs.shape[0]
    with torch.autocast(device_type=device.type, enabled=False):
        feats = features.float()
        if P == 0:
            return feats.sum() * 0.0
        sampled, valid = sample_through(
            feats[:, dst].reshape(B * P, C, h, w),
            homographies[:, src, dst].reshape(B * P, 3, 3),
            padding_mode="border",
        )
        target = sampled.view(B, P, C, h * w)
        valid = valid.view(B, P, h * w)
        anchor = feats[:, src].reshape(B, P, C, h * w)
        diff = F.normalize(anchor, dim=2) - F.normalize(target, dim=2)
        squared = diff.pow(2).sum(dim=2)  # (B, P, N)
        total = torch.where(valid, squared, torch.zeros_like(squared)).sum()
        return total / valid.sum().clamp_min(1)
