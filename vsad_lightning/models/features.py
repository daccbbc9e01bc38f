"""Feature extraction for scoring: DDIM inversion (or fixed forward noising) then one capture.

docs/method.md#inversion: DDIM inversion of z_v from t=0 to t* in n steps with MVAM
active, then one U-Net pass at t* capturing F^(l) after FRM at the chosen levels. A cheaper
``noise`` mode (deterministic forward noising with a fixed seed) is an option.

DDIM here is deterministic (eta = 0) on the timesteps ``0 = t_0 < t_1 < ... < t_n = t*``
(``inversion_timesteps``). One step between ``t_a < t_b`` with the noise estimate ``ε̂``:

    x̂_0 = (z_from − sqrt(1 − ᾱ_from) ε̂) / sqrt(ᾱ_from),    z_to = sqrt(ᾱ_to) x̂_0 + sqrt(1 − ᾱ_to) ε̂

Both directions query the U-Net at the NOISIER end of the step, ``t_b``: denoising from ``t_b``
to ``t_a`` uses ``ε̂(z_{t_b}, t_b)``, and inversion from ``t_a`` to ``t_b`` uses
``ε̂(z_{t_a}, t_b)`` (``z_{t_b}`` is not known yet). This is diffusers'
``DDIMInverseScheduler`` convention; it makes inversion mirror denoising except for the
latent the U-Net sees, and it never asks the U-Net about a clean latent at ``t = 0``. The
clean latent ``z0`` sits at ``t_0 = 0`` (``ᾱ_0 = alphas_cumprod[0]``, within 0.1 % of 1 for SD's
schedule), and ``ᾱ`` always comes from the scheduler's ``alphas_cumprod``.

The U-Net predicts what its scheduler's ``prediction_type`` says (``epsilon``, ``v_prediction``
or ``sample``; ``models.objective`` trains it on that target); ``to_epsilon`` turns its output
into ``ε̂`` before every step, so a v-prediction checkpoint is inverted along the same DDIM path
as an epsilon one. ``FeatureExtractor`` takes the type as a required argument: a default would
silently invert a v-prediction model as if it predicted noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

LATENT_LEVEL = -1
"""Feature-level key of the encoder's latent ``z_v`` itself, scored next to the U-Net's decoder
levels when ``model.latent_weight > 0``. Decoder levels are up-block indices ``>= 0``, so the
key never clashes with one."""

ModelFn = Callable[[Tensor, int], Tensor]
"""``(z_t, t) -> ε̂``: the noise estimate of latents at integer timestep ``t``."""


def inversion_timesteps(t_star: int, num_steps: int) -> list[int]:
    """``n + 1`` increasing integer timesteps from 0 to ``t_star``, evenly spaced."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if t_star < num_steps:
        raise ValueError(
            f"t_star ({t_star}) must be at least num_steps ({num_steps}) so that every DDIM "
            "step advances by at least one timestep"
        )
    return torch.linspace(0, t_star, num_steps + 1).round().long().tolist()


def _alphas(alphas_cumprod: Tensor) -> Tensor:
    # Float64 on the CPU: the handful of per-step scalars are exact and cost no device sync.
    return alphas_cumprod.detach().to("cpu", torch.float64)


def _check_timesteps(timesteps: Sequence[int], num_train: int) -> list[int]:
    ts = [int(t) for t in timesteps]
    if len(ts) < 2 or any(b <= a for a, b in zip(ts[:-1], ts[1:], strict=False)):
        raise ValueError(f"timesteps must be at least two strictly increasing values, got {ts}")
    if ts[0] < 0 or ts[-1] >= num_train:
        raise ValueError(f"timesteps {ts} must lie in [0, {num_train - 1}] (the schedule's range)")
    return ts


def ddim_step(z: Tensor, eps: Tensor, alpha_from: float, alpha_to: float) -> Tensor:
    """Move ``z`` from noise level ``ᾱ_from`` to ``ᾱ_to`` along the DDIM (eta = 0) path."""
    x0 = (z - (1.0 - alpha_from) ** 0.5 * eps) / alpha_from**0.5
    return alpha_to**0.5 * x0 + (1.0 - alpha_to) ** 0.5 * eps


def ddim_invert(
    model_fn: ModelFn, z0: Tensor, alphas_cumprod: Tensor, timesteps: Sequence[int]
) -> Tensor:
    """Deterministic DDIM inversion of ``z0`` from ``timesteps[0]`` up to ``timesteps[-1]``.

    The step from ``t_a`` to ``t_b`` uses ``model_fn(z_{t_a}, t_b)`` (module docstring).

    Args:
        model_fn: ``(z, t) -> ε̂``, called with ``t = timesteps[1:]`` in order.
        z0: latents at noise level ``timesteps[0]`` (0 for clean latents), any shape.
        alphas_cumprod: the scheduler's ``ᾱ`` table (``scheduler.alphas_cumprod``).
        timesteps: strictly increasing integers, e.g. ``inversion_timesteps(t_star, n)``.
    """
    alphas = _alphas(alphas_cumprod)
    ts = _check_timesteps(timesteps, len(alphas))
    z = z0
    for t_from, t_to in zip(ts[:-1], ts[1:], strict=True):
        z = ddim_step(z, model_fn(z, t_to), alphas[t_from].item(), alphas[t_to].item())
    return z


def ddim_denoise(
    model_fn: ModelFn, z_t: Tensor, alphas_cumprod: Tensor, timesteps: Sequence[int]
) -> Tensor:
    """Deterministic DDIM denoising of ``z_t`` from ``timesteps[-1]`` down to ``timesteps[0]``.

    ``timesteps`` is the same increasing list ``ddim_invert`` took, walked backwards; the step
    from ``t_b`` down to ``t_a`` uses ``model_fn(z_{t_b}, t_b)``.
    """
    alphas = _alphas(alphas_cumprod)
    ts = _check_timesteps(timesteps, len(alphas))[::-1]
    z = z_t
    for t_from, t_to in zip(ts[:-1], ts[1:], strict=True):
        z = ddim_step(z, model_fn(z, t_from), alphas[t_from].item(), alphas[t_to].item())
    return z


PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")
"""The scheduler ``prediction_type``s that training and inversion support."""


def to_epsilon(model_output: Tensor, z_t: Tensor, alpha: float, prediction_type: str) -> Tensor:
    """Convert a U-Net output to the noise estimate ``ε̂`` (diffusers' ``prediction_type``)."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":  # v = sqrt(ᾱ) ε − sqrt(1 − ᾱ) x0
        return alpha**0.5 * model_output + (1.0 - alpha) ** 0.5 * z_t
    if prediction_type == "sample":
        return (z_t - alpha**0.5 * model_output) / (1.0 - alpha) ** 0.5
    raise ValueError(
        f"unknown prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample"
    )


def fixed_noise(shape: Sequence[int], seed: int) -> Tensor:
    """One ``N(0, I)`` tensor of ``shape`` drawn on the CPU from ``seed`` (device-independent)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator)


class FeatureExtractor:
    """Per-level features ``F^(l)`` of latents (docs/method.md#inversion).

    Args:
        mode: ``inversion``: DDIM-invert ``z0`` to ``t_star`` in ``num_steps`` steps with MVAM
            active at every step (features are not captured during those steps), then one
            U-Net pass at ``t_star`` on ``z_{t*}`` captures the features after FRM
            (``num_steps + 1`` U-Net passes, at ``t_1, ..., t_n = t*`` and ``t*``).
            ``noise``: noise ``z0`` straight to ``t_star`` with a fixed noise tensor, then the
            same capture pass (one U-Net pass instead of ``num_steps + 1``).
        t_star: the timestep features are read at.
        num_steps: DDIM inversion steps ``n``.
        seed: ``noise`` mode's seed. The noise is ONE ``(c, h, w)`` tensor drawn from the seed
            and shared by every view of every sample, so a sample's features never depend on
            the batch it came in, its position in it, or the device.
    """

    def __init__(
        self,
        mode: Literal["inversion", "noise"] = "inversion",
        t_star: int = 200,
        num_steps: int = 5,
        seed: int = 0,
    ) -> None:
        if mode not in ("inversion", "noise"):
            raise ValueError(f"mode must be 'inversion' or 'noise', got {mode!r}")
        if t_star < 1:
            raise ValueError(f"t_star must be >= 1, got {t_star}")
        self.mode = mode
        self.t_star = t_star
        self.num_steps = num_steps
        self.seed = seed
        self.timesteps = inversion_timesteps(t_star, num_steps) if mode == "inversion" else None

    def __repr__(self) -> str:
        return (
            f"FeatureExtractor(mode={self.mode!r}, t_star={self.t_star}, "
            f"num_steps={self.num_steps}, seed={self.seed})"
        )

    def _noised_latents(
        self, run, latents: Tensor, alphas_cumprod: Tensor, prediction_type: str
    ) -> Tensor:
        """``z_{t*}`` from clean latents ``(B, V, c, h, w)`` (by inversion or fixed noise).

        ``run(z, t, capture)`` is one ``ViewAlignedUNet`` pass at timestep ``t``.
        """
        alphas = _alphas(alphas_cumprod)
        if self.t_star >= len(alphas):
            raise ValueError(
                f"t_star ({self.t_star}) must be below the schedule's {len(alphas)} timesteps"
            )
        if self.mode == "noise":
            alpha = alphas[self.t_star].item()
            noise = fixed_noise(latents.shape[2:], self.seed).to(latents.device, latents.dtype)
            return alpha**0.5 * latents + (1.0 - alpha) ** 0.5 * noise

        def model_fn(z: Tensor, t: int) -> Tensor:
            return to_epsilon(run(z, t, False).noise_pred, z, alphas[t].item(), prediction_type)

        return ddim_invert(model_fn, latents, alphas, self.timesteps)

    @torch.no_grad()
    def __call__(
        self,
        model,
        latents: Tensor,
        encoder_hidden_states: Tensor,
        homographies: Tensor,
        image_size: tuple[int, int],
        neighbour_mask: Tensor,
        alphas_cumprod: Tensor,
        prediction_type: str,
    ) -> dict[int, Tensor]:
        """Features ``{level: (B, V, C_l, h_l, w_l)}`` of clean latents ``(B, V, c, h, w)``.

        ``model`` is a ``ViewAlignedUNet``; the other arguments are those of its ``forward``,
        plus the scheduler's ``alphas_cumprod`` and ``config.prediction_type`` (what the U-Net
        outputs; the inversion converts it to ``ε̂``).
        """
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}"
            )
        B = latents.shape[0]

        def run(z: Tensor, t: int, capture: bool):
            timesteps = torch.full((B,), t, dtype=torch.long, device=latents.device)
            return model(
                z,
                timesteps,
                encoder_hidden_states,
                homographies,
                image_size,
                neighbour_mask,
                capture=capture,
            )

        z_star = self._noised_latents(run, latents, alphas_cumprod, prediction_type)
        return run(z_star, self.t_star, True).features


FeatureNorm = Literal["none", "instance", "l2"]


def normalise_features(features: dict[int, Tensor], how: FeatureNorm) -> dict[int, Tensor]:
    """Normalise per-level features ``(B, V, C, h, w)`` before they meet the memory bank.

    ``model.feature_norm``; the bank and the queries always get the same treatment.

    - ``none``: the U-Net's features as they are (the paper).
    - ``instance``: standardise every channel over the positions of ONE view image (zero
      mean, unit variance). Each camera of a rig has its own exposure and lighting; this takes
      those per-image offsets and gains out of the distances, so a brighter side view is not
      an anomaly. A defect is local, so it survives; a change that covers the WHOLE image
      evenly does not (use ``none`` when such changes are defects).
    - ``l2``: unit length per position (cosine-like distances).
    """
    if how == "none":
        return features
    if how == "instance":
        out = {}
        for level, f in features.items():
            mean = f.mean(dim=(-2, -1), keepdim=True)
            std = f.std(dim=(-2, -1), keepdim=True)
            # The floor keeps a constant channel (std 0) finite instead of dividing by zero.
            out[level] = (f - mean) / (std + 1e-5)
        return out
    if how == "l2":
        return {level: torch.nn.functional.normalize(f, dim=2) for level, f in features.items()}
    raise ValueError(f"unknown feature_norm {how!r}; expected 'none', 'instance' or 'l2'")
