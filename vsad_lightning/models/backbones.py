"""Backbones: the diffusion U-Net, the frozen image encoder, the noise schedule, the prompt.

Two backbones (docs/method.md#encoder, docs/choices.md#backbone).

- ``sd2``: Stable Diffusion 2 base from a LOCAL folder (the hub repositories are gone; users bring
  a copy). A complete folder holds::

      <path>/unet/        config.json + diffusion_pytorch_model.safetensors (or .bin)
      <path>/vae/         config.json + diffusion_pytorch_model.safetensors (or .bin)
      <path>/scheduler/   scheduler_config.json
      and EITHER <path>/empty_prompt_embedding.safetensors   (tensor "prompt_embedding", (1, L, D))
      OR         <path>/text_encoder/ + <path>/tokenizer/     (needs the optional extra ``sd2``,
                                                               i.e. the ``transformers`` package)

  Everything is read with ``from_pretrained(..., local_files_only=True)``. With the text encoder,
  the empty-prompt embedding is computed once at build time and kept in memory only: we never
  write into the user's folder. ``save_prompt_embedding`` writes the small cached file wherever
  the user wants (e.g. into their own copy of the folder) so later runs skip the text encoder.
- ``tiny``: a small randomly initialised U-Net trained from scratch on a laptop CPU (the embedded
  default). Its image encoder is a fixed invertible pixel-unshuffle by 4 (``tiny_encoder=
  "unshuffle"``, default) or a tiny random, untrained ``AutoencoderKL`` (``tiny_encoder="vae"``;
  training it in the same run is future work). Its prompt embedding is zeros (a model trained
  from scratch has no text encoder; docs/method.md#view-aligned-u-net).

The noise schedule is a diffusers ``DDPMScheduler`` (it provides ``add_noise``,
``alphas_cumprod`` and ``config.num_train_timesteps``); schedulers hold no weights, so they are
not ``nn.Module``s and live next to the models.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from vsad_lightning.errors import DataError
from vsad_lightning.models.encoders import (
    PixelShuffleDecoder,
    PixelUnshuffleEncoder,
    VAEDecoder,
    VAEEncoder,
)

PROMPT_EMBEDDING_FILE = "empty_prompt_embedding.safetensors"
"""Name of the cached empty-prompt embedding inside an SD2 folder."""
PROMPT_EMBEDDING_KEY = "prompt_embedding"
"""Name of the ``(1, L, D)`` tensor inside ``PROMPT_EMBEDDING_FILE``."""

SD2_FOLDER_LAYOUT = (
    "a complete Stable Diffusion 2 folder holds unet/, vae/, scheduler/ (diffusers "
    "save_pretrained layout) and either "
    f"{PROMPT_EMBEDDING_FILE} (tensor {PROMPT_EMBEDDING_KEY!r} of shape (1, L, D)) or "
    "text_encoder/ + tokenizer/ (needs the optional extra 'sd2': pip install transformers)"
)

SD2_PATH_ENV = "VSAD_SD2_PATH"
"""Environment variable naming the local SD2 folder when no path is configured."""

TINY_UNSHUFFLE_FACTOR = 4
"""Spatial downsampling of the tiny backbone's encoders (pixel-unshuffle and tiny VAE)."""

TINY_VAE_SCALING_FACTOR = 1.0
"""The tiny random VAE has no trained latent scale; its latent means are used as they are."""


@dataclass
class Backbone:
    """What a backbone builder returns.

    Attributes:
        unet: the diffusers ``UNet2DConditionModel``.
        encoder: images ``(N, 3, H, W)`` in [-1, 1] -> scaled latents ``z = s E(I)``
            ``(N, latent_channels, H / f, W / f)`` (the latent mean for a VAE).
        decoder: latents -> images, for pictures; ``None`` when there is none.
        scheduler: the training noise schedule (``add_noise``, ``alphas_cumprod``).
        prompt_embedding: ``(1, L, D)`` conditioning, the empty prompt (or zeros).
        downsample_factor: ``f``, image size / latent size.
        latent_channels: ``c``, channels of the latents.
        name: ``tiny`` or ``sd2``.
    """

    unet: UNet2DConditionModel
    encoder: nn.Module
    decoder: nn.Module | None
    scheduler: DDPMScheduler
    prompt_embedding: Tensor
    downsample_factor: int
    latent_channels: int
    name: str


def build_backbone(
    name: Literal["tiny", "sd2"] = "tiny",
    path: str | Path | None = None,
    image_size: int = 128,
    *,
    tiny_encoder: Literal["unshuffle", "vae"] = "unshuffle",
    tiny_block_out_channels: Sequence[int] = (32, 64, 128),
    tiny_layers_per_block: int = 1,
    tiny_cross_attention_dim: int = 32,
    seed: int = 0,
) -> Backbone:
    """Build a backbone by name.

    Args:
        name: ``tiny`` (random init, CPU-friendly) or ``sd2`` (local folder ``path``).
        path: the SD2 folder for ``sd2`` (unused by ``tiny``); when ``None``, the environment
            variable ``VSAD_SD2_PATH`` gives it (so cluster jobs can share one config).
        image_size: the training image side; the tiny U-Net's ``sample_size`` derives from it.
        tiny_encoder: ``unshuffle`` (fixed invertible pixel-unshuffle by 4, 48 latent channels)
            or ``vae`` (tiny random ``AutoencoderKL``, 4 latent channels).
        tiny_block_out_channels: the tiny U-Net's channels per resolution (multiples of 32: the
            U-Net's GroupNorms and FRM use 32 groups).
        tiny_layers_per_block: ResBlocks per down block (up blocks get one more).
        tiny_cross_attention_dim: ``D`` of the tiny zero prompt embedding.
        seed: the tiny backbone's random init is drawn from this seed (without touching the
            global RNG), so every process and every rerun starts from the same weights.
    """
    if name == "sd2":
        path = path if path is not None else os.environ.get(SD2_PATH_ENV)
        if not path:
            raise DataError(
                f"backbone 'sd2' needs a local folder: set model.backbone_path or the "
                f"environment variable {SD2_PATH_ENV}; {SD2_FOLDER_LAYOUT}"
            )
        return _build_sd2(Path(path))
    if name == "tiny":
        return _build_tiny(
            image_size=image_size,
            encoder=tiny_encoder,
            block_out_channels=tuple(tiny_block_out_channels),
            layers_per_block=tiny_layers_per_block,
            cross_attention_dim=tiny_cross_attention_dim,
            seed=seed,
        )
    raise ValueError(f"unknown backbone {name!r}; expected 'tiny' or 'sd2'")


# --------------------------------------------------------------------------------------- tiny
def tiny_noise_scheduler() -> DDPMScheduler:
    """The tiny backbone's schedule: SD2's (scaled-linear betas 0.00085..0.012 over 1000 steps).

    Sharing SD2's schedule keeps ``t_star`` meaning the same noise level for both backbones.
    """
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
    )


def _build_tiny(
    *,
    image_size: int,
    encoder: str,
    block_out_channels: tuple[int, ...],
    layers_per_block: int,
    cross_attention_dim: int,
    seed: int,
) -> Backbone:
    factor = TINY_UNSHUFFLE_FACTOR
    # The U-Net halves the latent len(blocks) - 1 times; odd sizes would break the skip joins.
    multiple = factor * 2 ** (len(block_out_channels) - 1)
    if image_size % multiple:
        raise ValueError(
            f"image_size {image_size} must be a multiple of {multiple} for the tiny backbone "
            f"(encoder downsampling {factor} x 2^{len(block_out_channels) - 1} U-Net halvings)"
        )
    if any(c % 32 for c in block_out_channels):
        raise ValueError(f"tiny_block_out_channels {block_out_channels} must be multiples of 32")
    if encoder not in ("unshuffle", "vae"):
        raise ValueError(f"unknown tiny_encoder {encoder!r}; expected 'unshuffle' or 'vae'")

    n = len(block_out_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if encoder == "unshuffle":
            latent_channels = 3 * factor**2
            image_encoder: nn.Module = PixelUnshuffleEncoder(factor)
            image_decoder: nn.Module = PixelShuffleDecoder(factor)
        else:
            latent_channels = 4
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 3,  # 3 blocks: downsampling by 4
                up_block_types=("UpDecoderBlock2D",) * 3,
                block_out_channels=(32, 64, 64),
                layers_per_block=1,
                latent_channels=latent_channels,
                norm_num_groups=32,
                sample_size=image_size,
                scaling_factor=TINY_VAE_SCALING_FACTOR,
            )
            vae.requires_grad_(False).eval()
            image_encoder, image_decoder = VAEEncoder(vae), VAEDecoder(vae)
        # Self-attention (in the cross-attention blocks) only at the two coarsest resolutions,
        # where it is cheap; the finest level stays convolutional.
        down_types = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
        up_types = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
        unet = UNet2DConditionModel(
            sample_size=image_size // factor,
            in_channels=latent_channels,
            out_channels=latent_channels,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            down_block_types=down_types,
            up_block_types=up_types,
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=8,
            norm_num_groups=32,
        )
    return Backbone(
        unet=unet,
        encoder=image_encoder,
        decoder=image_decoder,
        scheduler=tiny_noise_scheduler(),
        prompt_embedding=torch.zeros(1, 1, cross_attention_dim),
        downsample_factor=factor,
        latent_channels=latent_channels,
        name="tiny",
    )


# --------------------------------------------------------------------------------------- sd2
def save_prompt_embedding(embedding: Tensor, file: str | Path) -> None:
    """Write a ``(1, L, D)`` prompt embedding as ``PROMPT_EMBEDDING_FILE`` expects it."""
    if embedding.dim() != 3 or embedding.shape[0] != 1:
        raise ValueError(f"expected a (1, L, D) embedding, got shape {tuple(embedding.shape)}")
    save_file({PROMPT_EMBEDDING_KEY: embedding.detach().cpu().contiguous()}, str(file))


def _require(path: Path, what: str) -> Path:
    target = path / what
    if not target.exists():
        raise DataError(
            f"{target}{'/' if not target.suffix else ''} is missing; {SD2_FOLDER_LAYOUT}"
        )
    return target


def _load_part(loader, folder: Path):
    """``from_pretrained`` of one sub-folder; unreadable content becomes a ``DataError``."""
    try:
        return loader.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise DataError(
            f"could not load {loader.__name__} from {folder}/: {err}; {SD2_FOLDER_LAYOUT}"
        ) from err


def _load_prompt_embedding(path: Path) -> Tensor:
    cached = path / PROMPT_EMBEDDING_FILE
    if cached.exists():
        tensors = load_file(str(cached))
        if PROMPT_EMBEDDING_KEY not in tensors:
            raise DataError(
                f"{cached} holds {sorted(tensors)}, expected a tensor named "
                f"{PROMPT_EMBEDDING_KEY!r}"
            )
        return tensors[PROMPT_EMBEDDING_KEY].float()
    if not (path / "text_encoder").exists() or not (path / "tokenizer").exists():
        missing = [d for d in ("text_encoder", "tokenizer") if not (path / d).exists()]
        raise DataError(
            f"{path} has neither {PROMPT_EMBEDDING_FILE} nor a text encoder "
            f"({', '.join(d + '/' for d in missing)} missing); {SD2_FOLDER_LAYOUT}"
        )
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as err:
        raise DataError(
            f"{path} has no {PROMPT_EMBEDDING_FILE}; computing the empty-prompt embedding from "
            "text_encoder/ needs the optional extra 'sd2' (pip install transformers), or write "
            f"the file once with vsad_lightning.models.backbones.save_prompt_embedding"
        ) from err
    tokenizer = _load_part(CLIPTokenizer, path / "tokenizer")
    text_encoder = _load_part(CLIPTextModel, path / "text_encoder")
    tokens = tokenizer(
        "", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    )
    with torch.no_grad():
        # The text encoder runs once here, never per training step (docs/method.md#training).
        embedding = text_encoder(tokens.input_ids)[0]
    return embedding.float()


def _build_sd2(path: Path) -> Backbone:
    if not path.is_dir():
        raise DataError(f"the SD2 folder {path}/ does not exist; {SD2_FOLDER_LAYOUT}")
    for part in ("unet", "vae", "scheduler"):
        _require(path, part)
    unet = _load_part(UNet2DConditionModel, path / "unet")
    vae = _load_part(AutoencoderKL, path / "vae")
    scheduler = _load_part(DDPMScheduler, path / "scheduler")
    vae.requires_grad_(False).eval()
    prompt = _load_prompt_embedding(path)

    latent_channels = int(vae.config.latent_channels)
    if unet.config.in_channels != latent_channels:
        raise DataError(
            f"{path}/unet/ expects {unet.config.in_channels} input channels but {path}/vae/ "
            f"produces {latent_channels}-channel latents"
        )
    cross_dim = unet.config.cross_attention_dim
    if prompt.dim() != 3 or prompt.shape[0] != 1 or prompt.shape[-1] != cross_dim:
        raise DataError(
            f"the prompt embedding of {path} has shape {tuple(prompt.shape)}, expected "
            f"(1, L, {cross_dim}) to match unet/'s cross_attention_dim"
        )
    return Backbone(
        unet=unet,
        encoder=VAEEncoder(vae),
        decoder=VAEDecoder(vae),
        scheduler=scheduler,
        prompt_embedding=prompt,
        downsample_factor=2 ** (len(vae.config.block_out_channels) - 1),
        latent_channels=latent_channels,
        name="sd2",
    )
