"""ViewAlignedUNet: identity at init, training, checkpointing, layouts (docs/method.md)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from vsad_lightning.data.synthetic import VIEWS, Rig, SyntheticMultiView
from vsad_lightning.models.backbones import build_backbone
from vsad_lightning.models.objective import diffusion_objective
from vsad_lightning.models.unet import ViewAlignedUNet

IMAGE = 32
B, V = 2, 3


def rig_homographies(image_size: int = IMAGE, views: int = V) -> torch.Tensor:
    """``(B, V, V, 3, 3)`` true homographies of the synthetic rig (C1 top, C2, C3 sides)."""
    H = torch.from_numpy(Rig().homographies(image_size)[:views, :views]).float()
    return H.expand(B, views, views, 3, 3).clone()


def neighbours(views: int = V) -> torch.Tensor:
    return ~torch.eye(views, dtype=torch.bool)


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Move every parameter off its (partly zero) init so every path carries gradient."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


def synthetic_latents(backbone, image_size: int = IMAGE) -> torch.Tensor:
    """A real batch: two rendered synthetic samples (views C1..C3) through the real encoder."""
    generator = SyntheticMultiView("brick", image_size)
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(B):
        images, _ = generator.render(rng)
        views = np.stack([images[name] for name in VIEWS[:V]])  # (V, N, N, 3) uint8
        samples.append(torch.from_numpy(views).permute(0, 3, 1, 2).float() / 127.5 - 1.0)
    images = torch.stack(samples)  # (B, V, 3, N, N) in [-1, 1]
    with torch.no_grad():
        return backbone.encoder(images.flatten(0, 1)).unflatten(0, (B, V))


# Tiny tensors: one torch thread (see the fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def backbone():
    return build_backbone("tiny", image_size=IMAGE)


def test_identity_at_init_and_features_at_block_outputs(backbone):
    unet = build_backbone("tiny", image_size=IMAGE).unet
    torch.manual_seed(0)
    latents = torch.randn(B, V, backbone.latent_channels, IMAGE // 4, IMAGE // 4)
    timesteps = torch.tensor([10, 700])
    prompt = backbone.prompt_embedding
    keys_before = sorted(unet.state_dict())

    # The plain U-Net, with the outputs of its up blocks recorded.
    block_outputs = {}
    handles = [
        block.register_forward_hook(lambda m, i, o, k=k: block_outputs.__setitem__(k, o))
        for k, block in enumerate(unet.up_blocks)
    ]
    with torch.no_grad():
        plain = unet(
            latents.flatten(0, 1),
            timesteps.repeat_interleave(V),
            encoder_hidden_states=prompt.expand(B * V, -1, -1),
        ).sample
    for handle in handles:
        handle.remove()

    model = ViewAlignedUNet(unet, feature_levels=(-2, -1))
    assert model.feature_levels == [1, 2]
    assert sorted(unet.state_dict()) == keys_before  # aligner weights live outside the U-Net
    assert len(model.aligners) == sum(len(b.resnets) for b in unet.up_blocks) == 6
    with torch.no_grad():
        out = model(latents, timesteps, prompt, rig_homographies(), (IMAGE, IMAGE), neighbours())
    torch.testing.assert_close(out.noise_pred, plain.unflatten(0, (B, V)), atol=1e-5, rtol=0)

    channels = model.level_channels()
    assert channels == {1: 64, 2: 32}
    for level, feature in out.features.items():
        # Captured at the block output (after its upsampler), here still equal to the plain one.
        expected = block_outputs[level].unflatten(0, (B, V))
        assert feature.shape == (B, V, channels[level], *expected.shape[-2:])
        torch.testing.assert_close(feature, expected, atol=1e-5, rtol=0)
        h, w = feature.shape[-2:]
        scale = torch.diag(torch.tensor([w / IMAGE, h / IMAGE, 1.0]))
        expected_h = scale @ rig_homographies() @ torch.linalg.inv(scale)
        torch.testing.assert_close(out.level_homographies[level], expected_h, rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        silent = model(
            latents,
            timesteps,
            prompt,
            rig_homographies(),
            (IMAGE, IMAGE),
            neighbours(),
            capture=False,
        )
    assert silent.features == {} and silent.level_homographies == {}


def test_views_mix_within_a_sample_only(backbone):
    """The (B·V) <-> (B, V) reshapes keep samples apart and let views of one sample interact."""
    model = ViewAlignedUNet(build_backbone("tiny", image_size=IMAGE).unet, use_frm=False)
    perturb(model.aligners, seed=1)
    torch.manual_seed(0)
    latents = torch.randn(B, V, backbone.latent_channels, IMAGE // 4, IMAGE // 4)
    args = (torch.tensor([300, 300]), backbone.prompt_embedding, rig_homographies())
    rest = ((IMAGE, IMAGE), neighbours())
    with torch.no_grad():
        base = model(latents, *args, *rest).noise_pred
        changed = latents.clone()
        changed[1, 1] += 1.0  # sample 1, view 1
        out = model(changed, *args, *rest).noise_pred
    torch.testing.assert_close(out[0], base[0], atol=1e-6, rtol=0)  # other sample untouched
    assert (out[1, 0] - base[1, 0]).abs().max() > 1e-4  # neighbour view of the same sample

    # Without neighbours MVAM only sees the self candidate: views stop interacting.
    no_neighbours = torch.zeros(V, V, dtype=torch.bool)
    with torch.no_grad():
        base = model(latents, *args, (IMAGE, IMAGE), no_neighbours).noise_pred
        out = model(changed, *args, (IMAGE, IMAGE), no_neighbours).noise_pred
    torch.testing.assert_close(out[1, 0], base[1, 0], atol=1e-6, rtol=0)


def test_one_and_two_optimiser_steps_train_mvam_and_frm(backbone):
    """Step 1: only the zero-initialised outputs (MVAM W_o, FRM W_2) get gradient, because
    every other MVAM/FRM parameter reaches the output through them (exact zeros, not small).
    Step 2: every MVAM and FRM parameter gets gradient and moves."""
    model = ViewAlignedUNet(build_backbone("tiny", image_size=IMAGE).unet, train_unet="none")
    latents = synthetic_latents(backbone)
    assert not any(p.requires_grad for p in model.unet.parameters())
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable == {n for n in params if n.startswith(("aligners.", "refiners."))}
    initial = {n: params[n].detach().clone() for n in trainable}
    optimiser = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)

    def step() -> dict[str, torch.Tensor]:
        optimiser.zero_grad()
        out = diffusion_objective(
            model,
            latents,
            backbone.scheduler,
            backbone.prompt_embedding,
            rig_homographies(),
            (IMAGE, IMAGE),
            neighbours(),
            generator=generator,
        )
        out.loss.backward()
        grads = {n: params[n].grad.detach().clone() for n in trainable}
        optimiser.step()
        return grads

    def is_output(name: str) -> bool:
        return ".to_out." in name or (name.startswith("refiners.") and ".out." in name)

    grads = step()
    for name in trainable:
        if is_output(name):
            assert grads[name].abs().sum() > 0, name
            assert not torch.equal(params[name], initial[name]), name
        else:
            assert torch.count_nonzero(grads[name]) == 0, name
    grads = step()
    for name in trainable:
        assert grads[name].abs().sum() > 0, name
        assert not torch.equal(params[name], initial[name]), name
    assert all(p.grad is None for p in model.unet.parameters())


@pytest.mark.parametrize("train_unet", ["all", "none"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(backbone, train_unet):
    """Non-reentrant checkpointing: a frozen U-Net ("none") still passes gradient to MVAM."""

    def build(checkpointing: bool) -> ViewAlignedUNet:
        torch.manual_seed(0)
        model = ViewAlignedUNet(
            build_backbone("tiny", image_size=IMAGE).unet,
            train_unet=train_unet,
            gradient_checkpointing=checkpointing,
        )
        perturb(model.aligners, seed=2)
        perturb(model.refiners, seed=3)
        return model

    torch.manual_seed(1)
    latents = torch.randn(B, V, backbone.latent_channels, IMAGE // 4, IMAGE // 4)

    def run(checkpointing: bool, early_stop: bool = True):
        model = build(checkpointing)
        calls = []
        model.aligners["up2_res0"].register_forward_hook(lambda *a, calls=calls: calls.append(1))
        # Early stop (PyTorch's default) ends a recomputation once the saved tensors it needs
        # are back; without it the whole ResBlock + MVAM hook re-runs during backward, after
        # forward has returned, and must still find the call's homographies.
        with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
            out = diffusion_objective(
                model,
                latents,
                backbone.scheduler,
                backbone.prompt_embedding,
                rig_homographies(),
                (IMAGE, IMAGE),
                neighbours(),
                generator=torch.Generator().manual_seed(5),
            )
            out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return out.loss.detach(), grads, len(calls)

    loss_off, grads_off, calls_off = run(False)
    assert calls_off == 1
    assert any(n.startswith("aligners.") for n in grads_off)
    assert any(n.startswith("refiners.") for n in grads_off)
    assert any(n.startswith("unet.") for n in grads_off) == (train_unet == "all")
    for early_stop, expected_calls in ((True, None), (False, 2)):
        loss_on, grads_on, calls_on = run(True, early_stop)
        if expected_calls is not None:
            assert calls_on == expected_calls  # the hook re-ran in backward
        torch.testing.assert_close(loss_on, loss_off, atol=1e-5, rtol=0)
        assert grads_on.keys() == grads_off.keys()
        for name in grads_off:
            torch.testing.assert_close(grads_on[name], grads_off[name], atol=1e-5, rtol=1e-4)


def test_train_unet_modes_and_validation(backbone):
    unet = build_backbone("tiny", image_size=IMAGE).unet
    decoder = ViewAlignedUNet(unet, train_unet="decoder")
    for name, p in unet.named_parameters():
        in_decoder = name.startswith(("up_blocks.", "conv_norm_out.", "conv_out."))
        assert p.requires_grad == in_decoder, name
    decoder.remove_hooks()

    unet = build_backbone("tiny", image_size=IMAGE).unet
    everything = ViewAlignedUNet(unet, train_unet="all", use_mvam=False, use_frm=False)
    assert len(everything.aligners) == 0 and len(everything.refiners) == 0
    assert sum(p.numel() for p in everything.trainable_parameters()) == sum(
        p.numel() for p in unet.parameters()
    )
    everything.remove_hooks()

    with pytest.raises(ValueError, match="train_unet"):
        ViewAlignedUNet(build_backbone("tiny", image_size=IMAGE).unet, train_unet="encoder")
    with pytest.raises(ValueError, match="feature level 3 does not exist"):
        ViewAlignedUNet(build_backbone("tiny", image_size=IMAGE).unet, feature_levels=(3,))
    with pytest.raises(ValueError, match="same up block twice"):
        ViewAlignedUNet(build_backbone("tiny", image_size=IMAGE).unet, feature_levels=(2, -1))

    # The hooks need the call's homographies: running the bare U-Net is a clear error.
    unet = build_backbone("tiny", image_size=IMAGE).unet
    ViewAlignedUNet(unet)
    with pytest.raises(RuntimeError, match="ViewAlignedUNet.forward"):
        unet(torch.randn(1, 48, 8, 8), 1, encoder_hidden_states=torch.zeros(1, 1, 32))


def test_a_deep_copy_runs_its_own_aligners(backbone):
    """EMA/SWA-style copies must not keep calling the original's MVAMs through the hooks."""
    model = ViewAlignedUNet(build_backbone("tiny", image_size=IMAGE).unet, use_frm=False)
    copy_ = copy.deepcopy(model)
    perturb(copy_.aligners, seed=4)
    latents = torch.randn(1, V, backbone.latent_channels, IMAGE // 4, IMAGE // 4)
    args = (torch.tensor([50]), backbone.prompt_embedding, rig_homographies()[:1])
    with torch.no_grad():
        original = model(latents, *args, (IMAGE, IMAGE), neighbours()).noise_pred
        plain = model.unet  # identity at init: the original still equals its plain U-Net
        model.remove_hooks()
        expected = plain(
            latents.flatten(0, 1),
            args[0].repeat_interleave(V),
            encoder_hidden_states=args[1].expand(V, -1, -1),
        ).sample
        copied = copy_(latents, *args, (IMAGE, IMAGE), neighbours()).noise_pred
    torch.testing.assert_close(original, expected.unflatten(0, (1, V)), atol=1e-5, rtol=0)
    assert (copied - original).abs().max() > 1e-3


def test_sd2_layout_on_the_meta_device():
    """SD2 base's U-Net config: 4 up blocks x 3 ResBlocks -> 12 MVAMs, built without memory."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=64,  # SD2 base (512 px); the 768-v model uses 96
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
        )
        model = ViewAlignedUNet(unet, feature_levels=(0, 1, 2, 3))
        default = ViewAlignedUNet(unet)
    assert len(unet.up_blocks) == 4
    assert all(len(block.resnets) == 3 for block in unet.up_blocks)
    assert sorted(model.aligners) == sorted(f"up{i}_res{j}" for i in range(4) for j in range(3))
    assert model.level_channels() == {0: 1280, 1: 1280, 2: 640, 3: 320}
    assert [model.aligners[f"up{i}_res0"].channels for i in range(4)] == [1280, 1280, 640, 320]
    assert default.feature_levels == [2, 3]  # the paper's levels 3 and 4
    assert all(p.is_meta for p in model.parameters())
