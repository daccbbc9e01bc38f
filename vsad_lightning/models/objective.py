"""The training objective ``L = L_d + λ_r L_r`` (docs/method.md#training).

- One timestep ``t`` per sample, shared by its ``V`` views (the views of one object are
  denoised at the same noise level, so MVAM aligns features of equal noise).
- ``ε ~ N(0, I)``, ``z_t = scheduler.add_noise(z_0, ε, t)``.
- ``L_d = MSE(ε̂, ε)``. A scheduler with ``prediction_type="v_prediction"`` trains the U-Net on
  its own target ``v`` (``scheduler.get_velocity``) instead, and ``"sample"`` on ``z_0``; SD2
  base and the tiny backbone predict ``ε``. The inversion (``models.features.to_epsilon``)
  reads the output with the same type.
- ``L_r``: the mean over feature levels of ``consistency_loss`` on the features captured after
  FRM in the same forward pass (docs/method.md#consistency-loss). L_r is FRM's loss: with
  ``lambda_r = 0`` (which ``VSADModule`` passes when ``use_frm`` is false) it is neither
  computed nor applied, and the features are not captured; ``consistency_loss`` is then 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import Tensor

from vsad_lightning.models.frm import consistency_loss
from vsad_lightning.models.unet import ViewAlignedUNet


@dataclass
class ObjectiveOutput:
    """Scalars of one training step: ``loss = denoising_loss + λ_r consistency_loss``."""

    loss: Tensor
    denoising_loss: Tensor
    consistency_loss: Tensor


def diffusion_objective(
    model: ViewAlignedUNet,
    latents: Tensor,
    scheduler: DDPMScheduler,
    encoder_hidden_states: Tensor,
    homographies: Tensor,
    image_size: tuple[int, int],
    neighbour_mask: Tensor,
    lambda_r: float = 0.1,
    generator: torch.Generator | None = None,
    max_timestep: int | None = None,
) -> ObjectiveOutput:
    """``L = L_d + λ_r L_r`` on clean latents ``(B, V, c, h, w)``.

    Args:
        model: the view-aligned U-Net.
        latents: ``z_0 = s E(I)`` of every view.
        scheduler: the training noise schedule (``add_noise``, ``config.num_train_timesteps``).
        encoder_hidden_states: ``(1 or B, L, D)`` prompt embedding.
        homographies: ``(B, V, V, 3, 3)`` at image resolution ``image_size = (W, H)``.
        neighbour_mask: ``(V, V)`` bool.
        lambda_r: ``λ_r`` (default 0.1); 0 leaves L_r out (reported as 0).
        generator: draws ``t`` and ``ε`` (on the generator's device, then moved); ``None``
            uses the global RNG of ``latents``' device.
        max_timestep: draw ``t`` uniformly from ``[0, max_timestep)`` instead of the whole
            schedule (``None``). The features are read at a small ``t*``; a model trained from
            scratch learns the low-noise regime that those features come from much sooner when
            training concentrates there.
    """
    if latents.dim() != 5:
        raise ValueError(f"latents must be (B, V, c, h, w), got shape {tuple(latents.shape)}")
    B = latents.shape[0]
    device = latents.device
    neighbour_mask = neighbour_mask.to(device=device, dtype=torch.bool)
    draw_on = generator.device if generator is not None else device
    num_train = int(scheduler.config.num_train_timesteps)
    if max_timestep is not None:
        if not 1 <= max_timestep <= num_train:
            raise ValueError(f"max_timestep must be in [1, {num_train}], got {max_timestep}")
        num_train = max_timestep
    timesteps = torch.randint(0, num_train, (B,), generator=generator, device=draw_on).to(device)
    noise = torch.randn(latents.shape, generator=generator, device=draw_on, dtype=latents.dtype).to(
        device
    )
    # add_noise broadcasts the (B,) timesteps over (V, c, h, w): one t per sample.
    noisy = scheduler.add_noise(latents, noise, timesteps)
    with_consistency = lambda_r != 0

    out = model(
        noisy,
        timesteps,
        encoder_hidden_states,
        homographies,
        image_size,
        neighbour_mask,
        capture=with_consistency,
    )
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    elif prediction_type == "sample":
        target = latents
    else:
        raise ValueError(
            f"diffusion_objective supports prediction_type epsilon, v_prediction or sample, got "
            f"{prediction_type!r}"
        )
    denoising = F.mse_loss(out.noise_pred.float(), target.float())
    if not with_consistency:
        return ObjectiveOutput(
            loss=denoising, denoising_loss=denoising, consistency_loss=torch.zeros_like(denoising)
        )
    per_level = [
        consistency_loss(out.features[level], out.level_homographies[level], neighbour_mask)
        for level in sorted(out.features)
    ]
    consistency = torch.stack(per_level).mean()
    return ObjectiveOutput(
        loss=denoising + lambda_r * consistency,
        denoising_loss=denoising,
        consistency_loss=consistency,
    )
