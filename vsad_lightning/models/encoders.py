"""Frozen image encoders and decoders: images <-> scaled latents ``z = s E(I)``.

docs/method.md#encoder: ``z_v = s * E(I_v)`` with the frozen VAE (latent mean; SD2's scaling factor
0.18215 comes from the VAE config). The tiny backbone (trained from scratch on a CPU) uses a
fixed, exactly invertible pixel-unshuffle instead, so no autoencoder has to be trained first.
Every encoder maps ``(N, 3, H, W)`` images in [-1, 1] to ``(N, c, H / f, W / f)`` latents.
"""

from __future__ import annotations

import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import Tensor, nn


class PixelUnshuffleEncoder(nn.Module):
    """Fixed invertible downsampling: every ``f x f`` pixel block becomes ``3 f^2`` channels.

    It has no parameters, loses no information and keeps the pixel values (in [-1, 1]), so the
    tiny U-Net denoises the image itself at a ``f``-times lower spatial resolution.
    """

    def __init__(self, factor: int = 4) -> None:
        super().__init__()
        if factor < 1:
            raise ValueError(f"the downsampling factor must be >= 1, got {factor}")
        self.factor = factor

    def forward(self, images: Tensor) -> Tensor:
        H, W = images.shape[-2:]
        if H % self.factor or W % self.factor:
            raise ValueError(
                f"images of size {W}x{H} cannot be pixel-unshuffled by {self.factor}: both sides "
                f"must be multiples of {self.factor}"
            )
        return F.pixel_unshuffle(images, self.factor)


class PixelShuffleDecoder(nn.Module):
    """The exact inverse of ``PixelUnshuffleEncoder``."""

    def __init__(self, factor: int = 4) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, latents: Tensor) -> Tensor:
        return F.pixel_shuffle(latents, self.factor)


class VAEEncoder(nn.Module):
    """``z = s * mean(E(I))``: the latent mean of an ``AutoencoderKL``, times its scaling factor.

    The mean (not a sample of the posterior) keeps the features of one image deterministic.
    """

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, images: Tensor) -> Tensor:
        posterior = self.vae.encode(images).latent_dist
        return posterior.mean * self.scaling_factor


class VAEDecoder(nn.Module):
    """``I = D(z / s)``, the inverse of ``VAEEncoder`` (for pictures, never for scoring)."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents / self.scaling_factor).sample
