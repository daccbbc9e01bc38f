"""Homography algebra on pixel-centre coordinates (docs/conventions.md#coordinates).

Convention: pixel ``(i, j)`` (column ``i``, row ``j``) covers ``[i, i+1) x [j, j+1)`` and its
centre is ``(i + 0.5, j + 0.5)``. With this convention, changing resolution is a pure scaling
``S = diag(w/W, h/H, 1)``, so ``H_l = S H S^-1`` is exact at every feature level. OpenCV's
keypoints put pixel centres on integers instead; ``from_opencv_convention`` converts.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def scale_matrix(
    from_size: tuple[int, int], to_size: tuple[int, int], *, dtype=torch.float32, device=None
) -> Tensor:
    """``S`` mapping pixel-centre coordinates at ``from_size=(W, H)`` to ``to_size=(w, h)``."""
    (W, H), (w, h) = from_size, to_size
    return torch.tensor(
        [[w / W, 0.0, 0.0], [0.0, h / H, 0.0], [0.0, 0.0, 1.0]], dtype=dtype, device=device
    )


def scale_homography(H: Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> Tensor:
    """Rescale homographies ``(..., 3, 3)`` from image size ``(W, H)`` to ``(w, h)``.

    ``H_l = S H S^-1`` (docs/conventions.md#rescaling). Computed in float64 so that deep
    levels of large images keep sub-pixel accuracy, then cast back.
    """
    S = scale_matrix(from_size, to_size, dtype=torch.float64, device=H.device)
    S_inv = scale_matrix(to_size, from_size, dtype=torch.float64, device=H.device)
    return (S @ H.to(torch.float64) @ S_inv).to(H.dtype)


def project_points(H: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
    """Apply homographies to points.

    Args:
        H: ``(..., 3, 3)``.
        points: ``(..., N, 2)`` with leading dimensions broadcastable against ``H``'s.

    Returns:
        ``(projected, w)``: ``(..., N, 2)`` dehomogenised points and ``(..., N)`` homogeneous
        ``w``. Points with ``w <= 0`` lie behind the target camera; their coordinates are
        returned as computed (``w`` is clamped away from zero only to avoid inf/nan).
    """
    ones = torch.ones_like(points[..., :1])
    homogeneous = torch.cat([points, ones], dim=-1)  # (..., N, 3)
    mapped = homogeneous @ H.transpose(-1, -2)  # (..., N, 3)
    w = mapped[..., 2]
    eps = torch.finfo(mapped.dtype).eps
    safe_w = torch.where(w.abs() < eps, torch.full_like(w, eps), w)
    return mapped[..., :2] / safe_w.unsqueeze(-1), w


def pixel_centre_grid(width: int, height: int, *, dtype=torch.float32, device=None) -> Tensor:
    """``(height * width, 2)`` pixel-centre coordinates ``(x, y)`` in row-major order."""
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=dtype, device=device) + 0.5,
        torch.arange(width, dtype=dtype, device=device) + 0.5,
        indexing="ij",
    )
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)


def pixel_to_grid_sample(coords: Tensor, width: int, height: int) -> Tensor:
    """Pixel-centre coordinates ``(..., 2)`` -> ``grid_sample`` coordinates in ``[-1, 1]``.

    With ``align_corners=False``, ``-1`` and ``+1`` are the outer edges of the map, so pixel
    ``i``'s centre ``i + 0.5`` maps to ``2 (i + 0.5) / w - 1``: ``c -> 2c / w - 1`` exactly.
    """
    size = torch.tensor([width, height], dtype=coords.dtype, device=coords.device)
    return 2.0 * coords / size - 1.0


def sample_through(
    maps: Tensor,
    homographies: Tensor,
    *,
    padding_mode: str = "zeros",
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Sample ``maps`` at the images of the pixel centres under ``homographies``.

    ``out[n](p) = maps[n](H[n] p)`` (bilinear, ``align_corners=False``): the one warp that
    MVAM's consistency loss, cross-view fusion and registration share.

    Args:
        maps: ``(N, C, h, w)``.
        homographies: ``(N, 3, 3)``, from the output's pixel centres into ``maps``' (same size).
        padding_mode: ``grid_sample``'s, for the half-pixel band at the map's edge.
        dtype: precision of the projection (float64 keeps sub-pixel accuracy on large maps).

    Returns:
        ``(sampled, valid)``: ``(N, C, h, w)`` float32, and ``(N, h, w)`` bool, True where the
        projection lies inside the map (``0 <= x <= w``, ``0 <= y <= h``) with ``w_hom > 0``.
    """
    N, C, h, w = maps.shape
    centres = pixel_centre_grid(w, h, dtype=dtype, device=maps.device)
    projected, w_hom = project_points(homographies.to(maps.device, dtype), centres)
    projected = torch.nan_to_num(projected, nan=-1.0, posinf=-1.0, neginf=-1.0)
    x, y = projected[..., 0], projected[..., 1]
    valid = (w_hom > 0) & (x >= 0) & (x <= w) & (y >= 0) & (y <= h)
    # Invalid points are masked by the caller; clamping keeps grid_sample's input tame.
    grid = pixel_to_grid_sample(projected, w, h).clamp(-2.0, 2.0).float()
    sampled = F.grid_sample(
        maps.float(),
        grid.reshape(N, h, w, 2),
        mode="bilinear",
        padding_mode=padding_mode,
        align_corners=False,
    )
    return sampled, valid.view(N, h, w)


def from_opencv_convention(H_cv: Tensor) -> Tensor:
    """Convert a homography estimated on OpenCV coordinates (centres on integers)."""
    T = torch.eye(3, dtype=H_cv.dtype, device=H_cv.device)
    T[0, 2] = T[1, 2] = 0.5
    T_inv = torch.eye(3, dtype=H_cv.dtype, device=H_cv.device)
    T_inv[0, 2] = T_inv[1, 2] = -0.5
    return T @ H_cv @ T_inv


def to_opencv_convention(H: np.ndarray) -> np.ndarray:
    """A pixel-centre ``(3, 3)`` homography for OpenCV's warps (centres on integers):
    ``T^-1 H T``, the inverse of ``from_opencv_convention`` (docs/conventions.md)."""
    T = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    return np.linalg.inv(T) @ np.asarray(H, dtype=np.float64) @ T


NEIGHBOUR_GRAPHS = ("all", "ring", "top_and_ring")


def neighbour_mask(graph: str, num_views: int) -> Tensor:
    """``(V, V)`` bool neighbour mask for a named graph (docs/conventions.md#neighbour-graphs).

    - ``all``: every other view.
    - ``ring``: views ``v - 1`` and ``v + 1`` (cyclic).
    - ``top_and_ring``: view 0 is the top camera, neighbour of every side view; side views
      ``1..V-1`` form a cycle (Real-IAD: C1 top, C2..C5 sides).
    """
    V = num_views
    mask = torch.zeros(V, V, dtype=torch.bool)
    if graph == "all":
        mask = ~torch.eye(V, dtype=torch.bool)
    elif graph == "ring":
        for v in range(V):
            mask[v, (v + 1) % V] = mask[v, (v - 1) % V] = True
    elif graph == "top_and_ring":
        mask[0, 1:] = mask[1:, 0] = True
        sides = V - 1
        for k in range(sides):
            v = 1 + k
            mask[v, 1 + (k + 1) % sides] = mask[v, 1 + (k - 1) % sides] = True
    else:
        raise ValueError(f"unknown neighbour graph {graph!r}; expected one of {NEIGHBOUR_GRAPHS}")
    mask.fill_diagonal_(False)
    return mask
