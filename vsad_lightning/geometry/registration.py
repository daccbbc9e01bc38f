"""Registered frames (``data.register_views``, docs/method.md#registration).

Every sample's view ``v`` is warped onto the reference sample's view ``v`` by ``R_v``
(pixel-centre convention, at image resolution). The model then lives in these registered
frames: the cross-view homographies between them are ``H'(v->u) = R_u H(v->u) R_v^-1``
(``registered_homographies``), and the returned pixel maps are carried back to each view's
original frame, ``map_orig(p) = map_ref(R_v p)`` (``maps_to_original``), so that they line up
with the original images and masks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vsad_lightning.geometry.projection import sample_through


def registered_homographies(homographies: Tensor, registration: Tensor) -> Tensor:
    """Cross-view homographies between registered frames: ``H'(v->u) = R_u H(v->u) R_v^-1``.

    Args:
        homographies: ``(..., V, V, 3, 3)``, ``[v, u]`` maps view ``v`` to view ``u``.
        registration: ``(..., V, 3, 3)``, ``R_v`` at the same image size.

    Returns:
        ``(..., V, V, 3, 3)`` in ``homographies``' dtype (computed in float64), ``[2, 2] = 1``.
    """
    R = registration.to(torch.float64)
    out = R.unsqueeze(-4) @ homographies.to(torch.float64) @ torch.linalg.inv(R).unsqueeze(-3)
    return (out / out[..., 2:, 2:]).to(homographies.dtype)


def is_identity(registration: Tensor) -> bool:
    """True when every ``R_v`` is exactly the identity (registration off, or the reference)."""
    eye = torch.eye(3, dtype=registration.dtype, device=registration.device)
    return bool(torch.equal(registration, eye.expand_as(registration)))


def maps_to_original(maps: Tensor, registration: Tensor) -> Tensor:
    """Carry maps from the registered frames back to the original ones:
    ``map_orig(p) = map_ref(R_v p)`` at every pixel centre ``p`` (bilinear, border replicated).

    Args:
        maps: ``(B, V, C, H, W)`` in the registered frames (a bool map is warped as 0/1 and
            thresholded at 0.5).
        registration: ``(B, V, 3, 3)`` ``R_v`` at ``(W, H)``.

    Returns:
        ``(B, V, C, H, W)`` in the original frames, ``maps``' dtype.
    """
    B, V, C, H, W = maps.shape
    if registration.shape != (B, V, 3, 3):
        raise ValueError(
            f"registration must be (B, V, 3, 3) = {(B, V, 3, 3)} for maps {tuple(maps.shape)}, "
            f"got {tuple(registration.shape)}"
        )
    warped, _ = sample_through(
        maps.reshape(B * V, C, H, W),
        registration.reshape(B * V, 3, 3),
        padding_mode="border",
        dtype=torch.float64,
    )
    warped = warped.view(B, V, C, H, W)
    if maps.dtype == torch.bool:
        return warped >= 0.5
    return warped.to(maps.dtype)


def sample_to_original(views: Tensor, registration: Tensor) -> Tensor:
    """One sample's ``(V, C, H, W)`` (its registered images, for pictures) in the original
    frames, so that they line up with the masks and returned maps; untouched when every
    ``R_v`` is the identity."""
    if is_identity(registration):
        return views
    return maps_to_original(views.unsqueeze(0), registration.unsqueeze(0))[0]
