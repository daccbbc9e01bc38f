"""Backbone builders: the tiny default and local SD2-layout folders (docs/method.md#encoder)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from vsad_lightning.errors import DataError
from vsad_lightning.models.backbones import (
    PROMPT_EMBEDDING_FILE,
    build_backbone,
    save_prompt_embedding,
)


def test_tiny_unshuffle_backbone_is_invertible_and_seeded():
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    bb = build_backbone("tiny", image_size=32)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left alone
    assert (bb.name, bb.downsample_factor, bb.latent_channels) == ("tiny", 4, 48)

    images = torch.rand(3, 3, 32, 32) * 2 - 1
    latents = bb.encoder(images)
    assert latents.shape == (3, 48, 8, 8)
    torch.testing.assert_close(bb.decoder(latents), images, atol=0, rtol=0)  # exact inverse
    assert list(bb.encoder.parameters()) == []  # fixed: nothing to train or to drift

    assert bb.unet.config.in_channels == bb.unet.config.out_channels == 48
    assert bb.unet.config.sample_size == 8
    assert torch.equal(bb.prompt_embedding, torch.zeros(1, 1, 32))
    noise = bb.unet(latents, 5, encoder_hidden_states=bb.prompt_embedding.expand(3, -1, -1)).sample
    assert noise.shape == latents.shape

    assert isinstance(bb.scheduler, DDPMScheduler)
    assert bb.scheduler.alphas_cumprod.shape == (bb.scheduler.config.num_train_timesteps,)

    same = build_backbone("tiny", image_size=32)
    other = build_backbone("tiny", image_size=32, seed=1)
    for name, value in bb.unet.state_dict().items():
        assert torch.equal(value, same.unet.state_dict()[name]), name
    assert any(
        not torch.equal(v, other.unet.state_dict()[k]) for k, v in bb.unet.state_dict().items()
    )


def test_tiny_vae_backbone_shapes():
    bb = build_backbone("tiny", image_size=32, tiny_encoder="vae")
    assert (bb.downsample_factor, bb.latent_channels) == (4, 4)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = bb.encoder(images)
        assert latents.shape == (2, 4, 8, 8)
        # The latent mean: deterministic, unlike a posterior sample.
        torch.testing.assert_close(bb.encoder(images), latents, atol=0, rtol=0)
        assert bb.decoder(latents).shape == images.shape
    assert not any(p.requires_grad for p in bb.encoder.parameters())


def test_tiny_rejects_bad_options():
    with pytest.raises(ValueError, match="multiple of 16"):
        build_backbone("tiny", image_size=40)
    with pytest.raises(ValueError, match="tiny_encoder"):
        build_backbone("tiny", image_size=32, tiny_encoder="jpeg")
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("sd3")


# ------------------------------------------------------------------------------ local SD2


def write_sd2_like_folder(root: Path, scaling_factor: float = 0.18215) -> torch.Tensor:
    """A tiny U-Net, VAE and scheduler saved in the diffusers layout, plus the embedding file."""
    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=8,
    ).save_pretrained(root / "unet")
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 32),
        latent_channels=4,
        scaling_factor=scaling_factor,
    ).save_pretrained(root / "vae")
    DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    ).save_pretrained(root / "scheduler")
    embedding = torch.randn(1, 5, 16)
    save_prompt_embedding(embedding, root / PROMPT_EMBEDDING_FILE)
    return embedding


def test_local_loading_of_an_sd2_layout_folder(tmp_path):
    embedding = write_sd2_like_folder(tmp_path)
    bb = build_backbone("sd2", path=tmp_path)
    assert bb.name == "sd2"
    assert (bb.downsample_factor, bb.latent_channels) == (2, 4)
    torch.testing.assert_close(bb.prompt_embedding, embedding)
    assert isinstance(bb.scheduler, DDPMScheduler)
    # The schedule comes from the folder's scheduler config, not from our defaults.
    reference = DDIMScheduler.from_pretrained(str(tmp_path / "scheduler"))
    torch.testing.assert_close(bb.scheduler.alphas_cumprod, reference.alphas_cumprod)

    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = bb.encoder(images)
        expected = bb.encoder.vae.encode(images).latent_dist.mean * 0.18215
        assert latents.shape == (2, 4, 16, 16)
        torch.testing.assert_close(latents, expected)  # s from the VAE config, latent mean
        noise = bb.unet(latents, 10, encoder_hidden_states=bb.prompt_embedding.expand(2, -1, -1))
        assert noise.sample.shape == latents.shape
        assert bb.decoder(latents).shape == images.shape


def test_incomplete_sd2_folders_name_what_is_missing(tmp_path):
    write_sd2_like_folder(tmp_path)

    no_vae = tmp_path / "no_vae"
    shutil.copytree(tmp_path, no_vae, ignore=shutil.ignore_patterns("no_*"))
    shutil.rmtree(no_vae / "vae")
    with pytest.raises(DataError, match=r"no_vae/vae/ is missing") as err:
        build_backbone("sd2", path=no_vae)
    # The message lists what a complete folder holds.
    assert "unet/, vae/, scheduler/" in str(err.value) and PROMPT_EMBEDDING_FILE in str(err.value)

    no_prompt = tmp_path / "no_prompt"
    shutil.copytree(tmp_path, no_prompt, ignore=shutil.ignore_patterns("no_*"))
    (no_prompt / PROMPT_EMBEDDING_FILE).unlink()
    with pytest.raises(DataError, match=r"text_encoder/, tokenizer/ missing"):
        build_backbone("sd2", path=no_prompt)

    no_weights = tmp_path / "no_weights"
    shutil.copytree(tmp_path, no_weights, ignore=shutil.ignore_patterns("no_*"))
    for f in (no_weights / "unet").glob("diffusion_pytorch_model*"):
        f.unlink()
    with pytest.raises(DataError, match=r"UNet2DConditionModel from .*no_weights/unet/"):
        build_backbone("sd2", path=no_weights)

    wrong_dim = tmp_path / "no_match"
    shutil.copytree(tmp_path, wrong_dim, ignore=shutil.ignore_patterns("no_*"))
    save_prompt_embedding(torch.zeros(1, 5, 8), wrong_dim / PROMPT_EMBEDDING_FILE)
    with pytest.raises(DataError, match=r"\(1, L, 16\)"):
        build_backbone("sd2", path=wrong_dim)

    with pytest.raises(DataError, match="does not exist"):
        build_backbone("sd2", path=tmp_path / "nowhere")
    with pytest.raises(DataError, match="needs a local folder"):
        build_backbone("sd2")


def test_sd2_path_can_come_from_the_environment(tmp_path, monkeypatch):
    from vsad_lightning.errors import DataError
    from vsad_lightning.models.backbones import SD2_PATH_ENV, build_backbone

    monkeypatch.delenv(SD2_PATH_ENV, raising=False)
    with pytest.raises(DataError, match=SD2_PATH_ENV):
        build_backbone("sd2")
    monkeypatch.setenv(SD2_PATH_ENV, str(tmp_path / "sd2-copy"))
    with pytest.raises(DataError, match="sd2-copy"):
        build_backbone("sd2")  # the folder from the environment is the one checked
