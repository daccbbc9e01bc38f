"""The training objective L = L_d + λ_r L_r (docs/method.md#training)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from vsad_lightning.data.synthetic import Rig
from vsad_lightning.models.backbones import build_backbone
from vsad_lightning.models.frm import consistency_loss
from vsad_lightning.models.objective import diffusion_objective
from vsad_lightning.models.unet import ViewAlignedUNet

IMAGE = 32
B, V = 3, 3
NEIGHBOURS = ~torch.eye(V, dtype=torch.bool)


def rig_homographies() -> torch.Tensor:
    H = torch.from_numpy(Rig().homographies(IMAGE)[:V, :V]).float()
    return H.expand(B, V, V, 3, 3).clone()


# Tiny tensors: one torch thread (see the fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup():
    backbone = build_backbone("tiny", image_size=IMAGE)
    torch.manual_seed(0)
    model = ViewAlignedUNet(backbone.unet, train_unet="none")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in [*model.aligners.parameters(), *model.refiners.parameters()]:
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    latents = torch.randn(
        B, V, backbone.latent_channels, IMAGE // 4, IMAGE // 4, generator=generator
    )
    return backbone, model, latents


def run(setup, seed=0, lambda_r=0.1, scheduler=None, prompt=None):
    backbone, model, latents = setup
    return diffusion_objective(
        model,
        latents,
        scheduler or backbone.scheduler,
        backbone.prompt_embedding if prompt is None else prompt,
        rig_homographies(),
        (IMAGE, IMAGE),
        NEIGHBOURS,
        lambda_r=lambda_r,
        generator=torch.Generator().manual_seed(seed),
    )


def test_one_timestep_per_sample_and_the_loss_terms(setup):
    backbone, model, latents = setup
    seen = {}

    def record_inputs(module, args, kwargs):
        seen["sample"], seen["timesteps"] = args[0], args[1]
        seen["prompt"] = kwargs["encoder_hidden_states"]

    def record_output(module, args, kwargs, output):
        seen["prediction"] = output[0]

    handles = [
        model.unet.register_forward_pre_hook(record_inputs, with_kwargs=True),
        model.unet.register_forward_hook(record_output, with_kwargs=True),
    ]
    prompt = torch.randn(B, 1, backbone.prompt_embedding.shape[-1])
    try:
        out = run(setup, seed=0, prompt=prompt)
    finally:
        for handle in handles:
            handle.remove()

    # The U-Net saw B·V timesteps, equal within each sample (views share t).
    timesteps = seen["timesteps"].view(B, V)
    assert (timesteps == timesteps[:, :1]).all()
    assert len(set(timesteps[:, 0].tolist())) > 1  # samples draw their own t
    # Each sample's prompt row went to each of its views.
    torch.testing.assert_close(seen["prompt"], prompt.repeat_interleave(V, dim=0))

    # Reproduce the draws: t, then ε, from the same generator.
    generator = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (B,), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    assert torch.equal(timesteps[:, 0], t)
    a = backbone.scheduler.alphas_cumprod[t].view(B, 1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    torch.testing.assert_close(seen["sample"], noisy.flatten(0, 1))

    # L_d = MSE(ε̂, ε); L_r = mean over levels of the consistency loss of the same pass.
    torch.testing.assert_close(
        out.denoising_loss, F.mse_loss(seen["prediction"], noise.flatten(0, 1))
    )
    with torch.no_grad():
        again = model(noisy, t, prompt, rig_homographies(), (IMAGE, IMAGE), NEIGHBOURS)
    assert sorted(again.features) == [1, 2]
    per_level = [
        consistency_loss(again.features[level], again.level_homographies[level], NEIGHBOURS)
        for level in (1, 2)
    ]
    torch.testing.assert_close(out.consistency_loss, torch.stack(per_level).mean())
    assert out.consistency_loss > 0
    torch.testing.assert_close(out.loss, out.denoising_loss + 0.1 * out.consistency_loss)


def test_lambda_r_weights_the_consistency_loss_and_its_gradient_trains_the_aligners(setup):
    _, model, _ = setup
    plain = run(setup, lambda_r=0.0)
    heavy = run(setup, lambda_r=2.0)
    torch.testing.assert_close(plain.loss, plain.denoising_loss)
    torch.testing.assert_close(heavy.loss, heavy.denoising_loss + 2.0 * heavy.consistency_loss)
    torch.testing.assert_close(heavy.denoising_loss, plain.denoising_loss)
    # lambda_r = 0 leaves L_r out altogether (what use_frm false asks for): reported as 0.
    assert heavy.consistency_loss > 0 and float(plain.consistency_loss) == 0.0

    model.zero_grad()
    heavy.consistency_loss.backward()
    # L_r alone reaches the FRM of the feature levels and the MVAMs upstream of them.
    assert model.refiners["2"].out.weight.grad.abs().sum() > 0
    assert model.aligners["up2_res1"].to_out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.unet.parameters())  # train_unet="none"
    model.zero_grad()


def test_the_generator_makes_the_objective_reproducible(setup):
    first, again, other = run(setup, seed=3), run(setup, seed=3), run(setup, seed=4)
    assert torch.equal(first.loss, again.loss)
    assert not torch.equal(first.loss, other.loss)


def test_v_prediction_schedulers_train_on_the_velocity(setup):
    backbone, model, latents = setup
    scheduler = DDPMScheduler.from_config(backbone.scheduler.config, prediction_type="v_prediction")
    seen = {}

    def record_output(module, args, output):
        seen["pred"] = output[0]  # returns None: the U-Net's output is left unchanged

    handle = model.unet.register_forward_hook(record_output)
    try:
        out = run(setup, seed=0, scheduler=scheduler)
    finally:
        handle.remove()
    generator = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (B,), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    velocity = scheduler.get_velocity(latents, noise, t)
    torch.testing.assert_close(out.denoising_loss, F.mse_loss(seen["pred"], velocity.flatten(0, 1)))

    # prediction_type "sample": the target is the clean latent z_0 itself.
    sample = DDPMScheduler.from_config(backbone.scheduler.config, prediction_type="sample")
    handle = model.unet.register_forward_hook(record_output)
    try:
        out = run(setup, seed=0, scheduler=sample)
    finally:
        handle.remove()
    torch.testing.assert_close(out.denoising_loss, F.mse_loss(seen["pred"], latents.flatten(0, 1)))
    flow = DDPMScheduler.from_config(backbone.scheduler.config, prediction_type="flow")
    with pytest.raises(ValueError, match="prediction_type"):
        run(setup, scheduler=flow)


def test_frm_off_trains_on_the_denoising_loss_alone(synthetic_root_cached):
    """L_r is FRM's loss: ``use_frm false`` drops it whatever ``lambda_r`` says, so the FRM
    ablation does not keep FRM's loss on MVAM's outputs."""
    import lightning as L

    from vsad_lightning.data.datamodule import MultiViewDataModule
    from vsad_lightning.system.module import VSADModule

    data = MultiViewDataModule(str(synthetic_root_cached), "brick", resolution=64, image_size=64)
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    outputs = {}
    for use_frm in (True, False):
        L.seed_everything(0, verbose=False)
        module = VSADModule(image_size=64, attention_dim=16, num_heads=2, use_frm=use_frm)
        outputs[use_frm] = module._objective(batch, torch.Generator().manual_seed(0))
    with_frm, without = outputs[True], outputs[False]
    assert with_frm.consistency_loss > 0
    torch.testing.assert_close(
        with_frm.loss, with_frm.denoising_loss + 0.1 * with_frm.consistency_loss
    )
    assert float(without.consistency_loss) == 0.0
    torch.testing.assert_close(without.loss, without.denoising_loss, rtol=0, atol=0)
