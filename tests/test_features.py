"""DDIM inversion and the feature extractor (docs/method.md#inversion)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler

from vsad_lightning.data.synthetic import Rig
from vsad_lightning.models.backbones import build_backbone
from vsad_lightning.models.features import (
    FeatureExtractor,
    ddim_denoise,
    ddim_invert,
    fixed_noise,
    inversion_timesteps,
    normalise_features,
    to_epsilon,
)
from vsad_lightning.models.unet import ViewAlignedUNet

IMAGE = 32
B, V = 2, 3


def rig_homographies(batch: int = B) -> torch.Tensor:
    H = torch.from_numpy(Rig().homographies(IMAGE)[:V, :V]).float()
    return H.expand(batch, V, V, 3, 3).clone()


NEIGHBOURS = ~torch.eye(V, dtype=torch.bool)


# Tiny tensors: one torch thread (see the fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup():
    """A tiny backbone with MVAM and FRM moved off their identity init, and clean latents."""
    backbone = build_backbone("tiny", image_size=IMAGE)
    torch.manual_seed(0)
    model = ViewAlignedUNet(backbone.unet).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in [*model.aligners.parameters(), *model.refiners.parameters()]:
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    images = torch.rand(B * V, 3, IMAGE, IMAGE, generator=generator) * 2 - 1
    latents = backbone.encoder(images).unflatten(0, (B, V))
    return backbone, model, latents


def model_fn(model, backbone, batch: int = B, homographies=None):
    H = rig_homographies(batch) if homographies is None else homographies

    def fn(z: torch.Tensor, t: int) -> torch.Tensor:
        timesteps = torch.full((batch,), t)
        out = model(z, timesteps, backbone.prompt_embedding, H, (IMAGE, IMAGE), NEIGHBOURS, False)
        return out.noise_pred

    return fn


def test_ddim_with_a_constant_noise_estimate_is_exact(setup):
    """If ε̂ never changes, every DDIM step stays on one line: inversion has a closed form and
    denoising undoes it exactly. Checks the step formula and the use of the given ᾱ table."""
    backbone, _, latents = setup
    alphas = backbone.scheduler.alphas_cumprod.double()
    eps = torch.randn(latents.shape, dtype=torch.float64)
    z0 = latents.double()
    timesteps = [0, 50, 120, 200]
    z_t = ddim_invert(lambda z, t: eps, z0, alphas, timesteps)
    a0, a_star = alphas[0], alphas[200]
    x0 = (z0 - (1 - a0).sqrt() * eps) / a0.sqrt()
    torch.testing.assert_close(z_t, a_star.sqrt() * x0 + (1 - a_star).sqrt() * eps)
    torch.testing.assert_close(ddim_denoise(lambda z, t: eps, z_t, alphas, timesteps), z0)

    with pytest.raises(ValueError, match="strictly increasing"):
        ddim_invert(lambda z, t: eps, z0, alphas, [0, 50, 50])
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        ddim_invert(lambda z, t: eps, z0, alphas, [0, 1000])


MEASURED_RECONSTRUCTION_ERROR = 0.00861  # relative, n = 20, t* = 200 (see the test below)


def test_inversion_then_denoising_reconstructs_the_latents(setup):
    """Tiny model, t* = 200: within 1.3 % at n = 20 and first-order convergence in n.

    The residual comes from the model, not the arithmetic (exact for a constant ε̂, above):
    inversion uses ε̂(z_{t_a}, t_b) where denoising uses ε̂(z_{t_b}, t_b), and an untrained
    U-Net is very sensitive to its input, so the error halves as n doubles. Measured at
    n = 20: 0.86 % on these random-image latents (1.65 % at n = 10), 2.8 % on synthetic brick
    views; the bound is the measured value with a stated margin, the convergence order holds
    for any set-up.
    """
    backbone, model, latents = setup
    fn = model_fn(model, backbone)
    alphas = backbone.scheduler.alphas_cumprod
    errors = {}
    with torch.no_grad():
        for n in (10, 20):
            timesteps = inversion_timesteps(200, n)
            z_t = ddim_invert(fn, latents, alphas, timesteps)
            assert (z_t - latents).norm() / latents.norm() > 0.2  # it did move to t*
            reconstructed = ddim_denoise(fn, z_t, alphas, timesteps)
            errors[n] = ((reconstructed - latents).norm() / latents.norm()).item()
    # Measured 0.861 % at n = 20 and 1.651 % at n = 10 (torch 2.13 CPU, one thread). The
    # residual is float32 arithmetic through an untrained U-Net, so it moves with the BLAS build
    # and thread count: the bound is the measured value plus a stated 50 % margin.
    assert errors[20] < 1.5 * MEASURED_RECONSTRUCTION_ERROR, errors
    assert 1.5 < errors[10] / errors[20] < 2.5, errors


def test_inversion_mode_runs_mvam_at_every_step_and_captures_once(setup):
    backbone, model, latents = setup
    extractor = FeatureExtractor("inversion", t_star=200, num_steps=5)
    assert extractor.timesteps == [0, 40, 80, 120, 160, 200]
    seen_timesteps, mvam_calls = [], []
    pre = model.unet.register_forward_pre_hook(lambda m, args: seen_timesteps.append(args[1]))
    post = model.aligners["up0_res0"].register_forward_hook(lambda *a: mvam_calls.append(1))
    try:
        features = extractor(
            model,
            latents,
            backbone.prompt_embedding,
            rig_homographies(),
            (IMAGE, IMAGE),
            NEIGHBOURS,
            backbone.scheduler.alphas_cumprod,
            "epsilon",
        )
    finally:
        pre.remove()
        post.remove()
    # Inversion steps query the U-Net at the end of each step (t_1..t_n), then one capture at t*.
    assert [int(t[0]) for t in seen_timesteps] == [40, 80, 120, 160, 200, 200]
    assert all(t.shape == (B * V,) and (t == t[0]).all() for t in seen_timesteps)
    assert len(mvam_calls) == 6  # n inversion steps + the capture pass, MVAM active in all

    channels = model.level_channels()
    assert sorted(features) == [1, 2]
    for level, f in features.items():
        assert f.shape == (B, V, channels[level], IMAGE // 4, IMAGE // 4)
        assert not f.requires_grad

    # Same as doing it by hand: invert, then one capturing pass at t*.
    with torch.no_grad():
        z_star = ddim_invert(
            model_fn(model, backbone),
            latents,
            backbone.scheduler.alphas_cumprod,
            extractor.timesteps,
        )
        manual = model(
            z_star,
            torch.full((B,), 200),
            backbone.prompt_embedding,
            rig_homographies(),
            (IMAGE, IMAGE),
            NEIGHBOURS,
        ).features
    for level in features:
        torch.testing.assert_close(features[level], manual[level])


def test_noise_mode_uses_one_seeded_noise_tensor(setup):
    backbone, model, latents = setup
    alphas = backbone.scheduler.alphas_cumprod
    args = (
        backbone.prompt_embedding, rig_homographies(), (IMAGE, IMAGE), NEIGHBOURS, alphas, "epsilon"
    )  # fmt: skip
    calls = []
    pre = model.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0]))
    try:
        features = FeatureExtractor("noise", t_star=300, seed=7)(model, latents, *args)
    finally:
        pre.remove()
    assert len(calls) == 1  # a single U-Net pass
    a = alphas[300]
    noise = fixed_noise(latents.shape[2:], 7)
    expected_input = a.sqrt() * latents + (1 - a).sqrt() * noise  # same noise for every view
    torch.testing.assert_close(calls[0], expected_input.flatten(0, 1))

    again = FeatureExtractor("noise", t_star=300, seed=7)(model, latents, *args)
    other_seed = FeatureExtractor("noise", t_star=300, seed=8)(model, latents, *args)
    inversion = FeatureExtractor("inversion", t_star=300, num_steps=3)(model, latents, *args)
    for level in features:
        torch.testing.assert_close(again[level], features[level], atol=0, rtol=0)
        assert (other_seed[level] - features[level]).abs().max() > 1e-3
        assert (inversion[level] - features[level]).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["inversion", "noise"])
def test_features_of_a_sample_do_not_depend_on_its_batch(setup, mode):
    backbone, model, latents = setup
    extractor = FeatureExtractor(mode, t_star=100, num_steps=2)
    rest = ((IMAGE, IMAGE), NEIGHBOURS, backbone.scheduler.alphas_cumprod, "epsilon")
    together = extractor(model, latents, backbone.prompt_embedding, rig_homographies(), *rest)
    alone = extractor(model, latents[1:], backbone.prompt_embedding, rig_homographies(1), *rest)
    for level in together:
        torch.testing.assert_close(alone[level][0], together[level][1], atol=1e-5, rtol=1e-4)


def test_prediction_type_conversions_recover_the_noise():
    torch.manual_seed(0)
    x0, eps, alpha = torch.randn(4, 8), torch.randn(4, 8), 0.7
    z = alpha**0.5 * x0 + (1 - alpha) ** 0.5 * eps
    v = alpha**0.5 * eps - (1 - alpha) ** 0.5 * x0
    torch.testing.assert_close(to_epsilon(eps, z, alpha, "epsilon"), eps)
    torch.testing.assert_close(to_epsilon(v, z, alpha, "v_prediction"), eps)
    torch.testing.assert_close(to_epsilon(x0, z, alpha, "sample"), eps)
    with pytest.raises(ValueError, match="prediction_type"):
        to_epsilon(eps, z, alpha, "flow")


def _inversion_round_trip(setup, prediction_type: str, invert_as: str) -> float:
    """Invert with ``FeatureExtractor`` reading the U-Net as ``invert_as``, then denoise with
    diffusers' own ``DDIMScheduler.step`` for ``prediction_type`` on the same timesteps: the
    relative error of the reconstructed latents."""
    backbone, model, latents = setup
    config = dict(backbone.scheduler.config, prediction_type=prediction_type)
    denoiser = DDIMScheduler.from_config(config, set_alpha_to_one=False)
    extractor = FeatureExtractor("inversion", t_star=200, num_steps=10)  # steps of 20
    denoiser.set_timesteps(1000 // 20)  # timestep t -> t - 20, as the inversion's steps
    fn = model_fn(model, backbone)

    def run(z, t, capture):  # what FeatureExtractor calls: the U-Net's raw output
        return SimpleNamespace(noise_pred=fn(z, t))

    alphas = denoiser.alphas_cumprod
    with torch.no_grad():
        z = extractor._noised_latents(run, latents, alphas, invert_as)
        for t in reversed(extractor.timesteps[1:]):
            z = denoiser.step(fn(z, t), t, z).prev_sample
    return ((z - latents).norm() / latents.norm()).item()


def test_inversion_honours_the_prediction_type(setup):
    """The untrained U-Net's output read as ``v`` is a different model from the same output
    read as ``ε``; each inverted with its own type, diffusers' DDIM step for that type brings
    the latents back as closely (measured at 10 steps: 1.65 % epsilon, 1.40 % v); inverted as
    if it predicted ``ε``, the v-model does not come back (14.6 %). (``sample`` is converted by
    the same ``to_epsilon``, unit-tested above; an untrained U-Net read as ``x_0`` is too
    ill-conditioned at small ``t`` for this round trip to say anything.)"""
    epsilon = _inversion_round_trip(setup, "epsilon", "epsilon")
    velocity = _inversion_round_trip(setup, "v_prediction", "v_prediction")
    wrong = _inversion_round_trip(setup, "v_prediction", "epsilon")
    assert epsilon < 0.03 and velocity < 1.5 * epsilon, (epsilon, velocity)
    assert wrong > 5 * velocity, (wrong, velocity)


def test_invalid_settings_are_rejected(setup):
    backbone, model, latents = setup
    with pytest.raises(ValueError, match="mode"):
        FeatureExtractor("sampling")
    with pytest.raises(ValueError, match="at least num_steps"):
        FeatureExtractor("inversion", t_star=3, num_steps=5)
    extractor = FeatureExtractor("noise", t_star=1000)
    with pytest.raises(ValueError, match="below the schedule's 1000 timesteps"):
        extractor(
            model,
            latents,
            backbone.prompt_embedding,
            rig_homographies(),
            (IMAGE, IMAGE),
            NEIGHBOURS,
            backbone.scheduler.alphas_cumprod,
            "epsilon",
        )
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        FeatureExtractor("noise", t_star=100)(
            model,
            latents,
            backbone.prompt_embedding,
            rig_homographies(),
            (IMAGE, IMAGE),
            NEIGHBOURS,
            backbone.scheduler.alphas_cumprod,
            "flow",
        )


def test_instance_norm_removes_a_per_view_gain_and_offset_but_keeps_local_defects():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(1, 1, 8, 6, 6, generator=gen)
    # A second camera sees the same part brighter and with more contrast.
    brighter = 3.0 * base + 5.0
    out = normalise_features({0: torch.cat([base, brighter], dim=1)}, "instance")[0]
    torch.testing.assert_close(out[:, 0], out[:, 1], rtol=1e-4, atol=1e-4)
    assert out.mean(dim=(-2, -1)).abs().max() < 1e-5
    # A local defect still stands out after normalisation.
    defect = base.clone()
    defect[..., 2, 3] += 10.0
    normed = normalise_features({0: torch.cat([base, defect], dim=1)}, "instance")[0]
    diff = (normed[:, 0] - normed[:, 1]).norm(dim=1)[0]
    assert diff.argmax() == 2 * 6 + 3


def test_l2_norm_gives_unit_rows_and_none_is_identity():
    f = {1: torch.randn(2, 3, 4, 5, 5)}
    assert normalise_features(f, "none") is f
    torch.testing.assert_close(normalise_features(f, "l2")[1].norm(dim=2), torch.ones(2, 3, 5, 5))
    with pytest.raises(ValueError, match="feature_norm"):
        normalise_features(f, "batch")


def test_latent_weight_adds_the_latent_as_one_more_level(synthetic_root_cached):
    """``model.latent_weight``: the encoder's latent is scored as level ``LATENT_LEVEL``, with the
    same normalisation as the U-Net levels, and the U-Net levels do not change."""
    import lightning as L

    from vsad_lightning.data.datamodule import MultiViewDataModule
    from vsad_lightning.models.features import LATENT_LEVEL
    from vsad_lightning.system.module import VSADModule

    data = MultiViewDataModule(str(synthetic_root_cached), "brick", resolution=64, image_size=64)
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    features = {}
    for weight in (0.0, 2.0):
        L.seed_everything(0, verbose=False)
        module = VSADModule(
            image_size=64, attention_dim=16, num_heads=2, inversion_steps=1,
            feature_norm="instance", latent_weight=weight,
        )  # fmt: skip
        module.eval()
        features[weight] = module.extract_features(batch)
        assert (LATENT_LEVEL in module.level_weights) == (weight > 0)
    assert LATENT_LEVEL not in features[0.0]
    assert set(features[2.0]) == set(features[0.0]) | {LATENT_LEVEL}
    for level, f in features[0.0].items():
        torch.testing.assert_close(features[2.0][level], f, rtol=0, atol=0)
    expected = normalise_features({0: module.encode(batch.images)}, "instance")[0]
    torch.testing.assert_close(features[2.0][LATENT_LEVEL], expected)
    assert module.level_weights[LATENT_LEVEL] == 2.0
    # A bank fitted without the latent (a checkpoint of latent_weight 0) is refused by name.
    for level, f in features[0.0].items():
        module.memory_bank.set_level(level, f.permute(0, 1, 3, 4, 2).reshape(-1, f.shape[2]))
    with pytest.raises(ValueError, match=r"missing \[-1\].*latent_weight 0"):
        module.score(batch)
    with pytest.raises(ValueError, match="latent_weight"):
        VSADModule(image_size=64, attention_dim=16, num_heads=2, latent_weight=-1.0)


def test_the_module_inverts_with_its_schedulers_prediction_type(synthetic_root_cached):
    """``VSADModule.extract_features`` hands the scheduler's ``prediction_type`` to the
    inversion: a v-prediction schedule gives the features of inverting the output as ``v``."""
    import lightning as L
    from diffusers import DDPMScheduler

    from vsad_lightning.data.datamodule import MultiViewDataModule
    from vsad_lightning.system.module import VSADModule

    data = MultiViewDataModule(str(synthetic_root_cached), "brick", resolution=64, image_size=64)
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    L.seed_everything(0, verbose=False)
    module = VSADModule(image_size=64, attention_dim=16, num_heads=2, inversion_steps=2).eval()
    epsilon = module.extract_features(batch)
    config = dict(module.noise_scheduler.config, prediction_type="v_prediction")
    module.model.noise_scheduler = DDPMScheduler.from_config(config)  # the model's schedule
    velocity = module.extract_features(batch)
    by_hand = module.feature_extractor(
        module.unet, module.encode(batch.images), module._conditioning(batch.batch_size),
        batch.homographies, batch.image_size, batch.neighbour_mask,
        module.noise_scheduler.alphas_cumprod, "v_prediction",
    )  # fmt: skip
    for level, f in velocity.items():
        assert (f - epsilon[level]).abs().max() > 1e-3, level
        torch.testing.assert_close(f, by_hand[level], rtol=0, atol=0)
