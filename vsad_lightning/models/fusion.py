"""Cross-view fusion of anomaly maps: neighbouring views confirm or discount each other.

A defect lies on the part, so every view that sees its place shows it where the homographies
say; a benign specular highlight is fixed to one camera's viewpoint, so the neighbouring views
see normal surface at that place. ``fuse_maps`` carries every neighbour's map into view ``v``
through the sample's homographies and lowers the evidence at a position of ``v`` that no
neighbour confirms:

    support_v(p) = max_{u in N(v), p̂_u inside u} s_u(p̂_u)
    fused_v(p)   = s_v(p) - strength * max(0, s_v(p) - support_v(p))   where some neighbour sees p
    fused_v(p)   = s_v(p)                                              where no neighbour sees p

``strength`` in ``[0, 1]``: 0 is no fusion (the paper's scoring), 1 keeps only what a neighbour
confirms. Fusion only ever lowers a score, never raises one, so a defect that only ``v``
sees keeps its score wherever no neighbour looks (the part's edge that the far cameras do not
see). One neighbour confirming is enough (the max), so a defect seen by two views of five
keeps its score in both.

The maps should be comparable across views (``model.calibration`` standardises them per
position and view); raw distances of different cameras have different scales.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vsad_lightning.geometry.projection import sample_through


def neighbour_pairs(neighbour_mask: Tensor) -> Tensor:
    """``(P, 2)`` ordered pairs ``(v, u)`` with ``u`` a neighbour of ``v`` (diagonal excluded)."""
    V = neighbour_mask.shape[0]
    eye = torch.eye(V, dtype=torch.bool, device=neighbour_mask.device)
    return (neighbour_mask.bool() & ~eye).nonzero()


def sample_through_homographies(
    maps: Tensor, homographies: Tensor, pairs: Tensor, *, padding_mode: str = "zeros"
) -> tuple[Tensor, Tensor]:
    """For each pair ``(v, u)``, sample ``maps[:, u]`` at the projections of ``v``'s pixels.

    Args:
        maps: ``(B, V, C, h, w)``.
        homographies: ``(B, V, V, 3, 3)`` at ``(w, h)``; ``[b, v, u]`` maps ``v``'s pixel centres
            to ``u``'s.
        pairs: ``(P, 2)`` long, ordered ``(v, u)`` (``neighbour_pairs``).
        padding_mode: ``grid_sample``'s, for the half-pixel band at the map's edge.

    Returns:
        ``(sampled, valid)``: ``(B, P, C, h, w)`` bilinear samples of ``u``'s map in ``v``'s
        frame, and ``(B, P, h, w)`` bool, True where ``p̂_u`` lies inside ``u``'s map
        (``0 <= x <= w``, ``0 <= y <= h``) with homogeneous ``w > 0``.
    """
    B, V, C, h, w = maps.shape
    P = pairs.shape[0]
    src, dst = pairs[:, 0], pairs[:, 1]
    sampled, valid = sample_through(
        maps[:, dst].reshape(B * P, C, h, w),
        homographies[:, src, dst].reshape(B * P, 3, 3),
        padding_mode=padding_mode,
    )
    return sampled.view(B, P, C, h, w), valid.view(B, P, h, w)


def cross_view_support(
    maps: Tensor, homographies: Tensor, neighbour_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """``(support, covered)`` of ``maps`` ``(B, V, 1, H, W)``: the best neighbour evidence at
    each position of each view, and whether any neighbour sees that position (module
    docstring). ``support`` is ``-inf`` where ``covered`` is False."""
    B, V, _, H, W = maps.shape
    support = torch.full_like(maps, float("-inf"), dtype=torch.float32)
    covered = torch.zeros(B, V, 1, H, W, dtype=torch.bool, device=maps.device)
    pairs = neighbour_pairs(neighbour_mask.to(maps.device))
    if pairs.shape[0] == 0:
        return support, covered
    sampled, valid = sample_through_homographies(maps, homographies, pairs)
    evidence = torch.where(valid.unsqueeze(2), sampled, torch.full_like(sampled, float("-inf")))
    index = pairs[:, 0].view(1, -1, 1, 1, 1).expand_as(evidence)
    support = support.scatter_reduce(1, index, evidence, reduce="amax", include_self=True)
    covered = covered.scatter_reduce(
        1, index[:, :, :1], valid.unsqueeze(2), reduce="amax", include_self=True
    )
    return support, covered


def fuse_maps(
    maps: Tensor, homographies: Tensor, neighbour_mask: Tensor, strength: float = 1.0
) -> Tensor:
    """Fused maps ``(B, V, 1, H, W)`` (module docstring); ``strength`` 0 returns ``maps``.

    Args:
        maps: ``(B, V, 1, H, W)`` anomaly maps at image resolution ``(W, H)``.
        homographies: ``(B, V, V, 3, 3)`` at the same resolution (``MultiViewBatch``'s).
        neighbour_mask: ``(V, V)`` bool; pairs outside it (unreliable ones included) never
            confirm or discount anything.
        strength: ``model.fusion_strength``, in ``[0, 1]``.
    """
    if maps.dim() != 5 or maps.shape[2] != 1:
        raise ValueError(f"expected anomaly maps (B, V, 1, H, W), got {tuple(maps.shape)}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"fusion strength must be in [0, 1], got {strength}")
    if strength == 0.0:
        return maps
    support, covered = cross_view_support(maps, homographies, neighbour_mask)
    # Off the cover support is -inf and the discount infinite; torch.where keeps maps there.
    discounted = maps - strength * (maps - support).clamp_min(0.0)
    return torch.where(covered, discounted, maps)
