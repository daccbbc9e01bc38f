"""Resize and normalise the views of one sample, and rescale its homographies to match.

Images and masks are resized with the same geometry (OpenCV's pixel-centre convention), so
the homography at the new size is exactly ``scale_homography(H, native, new)``
(docs/conventions.md#rescaling). Images: area averaging when shrinking, bilinear when growing,
then ``[0, 255] -> [-1, 1]``. Masks: nearest neighbour on pixel centres
(``cv2.INTER_NEAREST_EXACT``), so they stay exactly 0 or 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
from torch import Tensor

from vsad_lightning.errors import DataError
from vsad_lightning.geometry.cache import HomographyCache
from vsad_lightning.geometry.projection import scale_homography

ASPECT_TOLERANCE = 0.01
"""Relative aspect-ratio difference allowed between a sample and its homography cache."""


def as_size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``256 -> (256, 256)``; ``(W, H)`` is kept; ``None`` means the native size."""
    if image_size is None:
        return None
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = tuple(int(s) for s in image_size)
        if len(size) != 2:
            raise ValueError(f"image_size must be an int or (W, H), got {image_size!r}")
    if min(size) < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return size  # type: ignore[return-value]


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(H, W, C)`` uint8 -> ``(h, w, C)`` uint8 at ``size=(w, h)``."""
    if (image.shape[1], image.shape[0]) == size:
        return image
    shrinking = size[0] * size[1] < image.shape[0] * image.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interpolation)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` bool -> ``(h, w)`` bool, nearest pixel centre."""
    if (mask.shape[1], mask.shape[0]) == size:
        return mask
    out = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST_EXACT)
    return out > 0


def views_to_tensors(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray | None],
    size: tuple[int, int] | None,
) -> tuple[Tensor, Tensor]:
    """Resize and normalise one sample's views.

    Args:
        images: ``V`` arrays ``(H, W, 3)`` uint8 RGB, all the same size.
        masks: ``V`` arrays ``(H, W)`` bool, or ``None`` for a view without a mask.
        size: ``(w, h)`` to resize to, ``None`` to keep the native size.

    Returns:
        images ``(V, 3, h, w)`` float32 in [-1, 1] and masks ``(V, 1, h, w)`` float32 in {0, 1}.
    """
    native = (images[0].shape[1], images[0].shape[0])
    size = size or native
    stacked = np.stack([resize_image(im, size) for im in images])  # (V, h, w, 3)
    out_images = torch.from_numpy(stacked).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    w, h = size
    out_masks = torch.zeros(len(images), 1, h, w, dtype=torch.float32)
    for v, mask in enumerate(masks):
        if mask is not None:
            out_masks[v, 0] = torch.from_numpy(resize_mask(mask, size))
    return out_images.contiguous(), out_masks


def homographies_for(
    cache: HomographyCache,
    views: Sequence[str],
    native_size: tuple[int, int],
    out_size: tuple[int, int],
    sample: str = "",
) -> Tensor:
    """``(V, V, 3, 3)`` float32 for ``views``, rescaled from the cache's size to ``out_size``.

    The cache may have been estimated at another resolution of the same images (Real-IAD's
    ``realiad_256`` vs ``realiad_512``): the scaling is exact as long as the images are resized
    copies, which the aspect ratio check guards.
    """
    cw, ch = cache.image_size
    nw, nh = native_size
    if abs((nw / nh) / (cw / ch) - 1.0) > ASPECT_TOLERANCE:
        raise DataError(
            f"sample {sample!r} has images of {nw}x{nh} px, but the homography cache of "
            f"category {cache.category!r} was estimated on {cw}x{ch} px images (another aspect "
            "ratio); rebuild it with vsad-homography"
        )
    H = cache.matrices(list(views)).to(torch.float64)
    return scale_homography(H, (cw, ch), out_size).to(torch.float32)
