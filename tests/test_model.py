"""``VSADModel`` apart from the system: its rig in the state dict, old checkpoints, settings."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from vsad_lightning.callbacks.memory_bank import MemoryBankCallback
from vsad_lightning.errors import DataError
from vsad_lightning.geometry.projection import neighbour_mask
from vsad_lightning.models.features import LATENT_LEVEL
from vsad_lightning.models.model import VSADModel
from vsad_lightning.system.module import VSADModule

TINY = dict(image_size=32, attention_dim=16, num_heads=2, inversion_steps=1)


def _rigged(model: VSADModel) -> VSADModel:
    views = ["C1", "C2", "C3"]
    H = torch.eye(3).repeat(3, 3, 1, 1)
    H[0, 1, 0, 2] = 1.5  # C1 -> C2 shifts by 1.5 px
    model.rig.set(views, neighbour_mask("all", 3), H, (32, 32), neighbour_graph="all")
    return model


def test_rig_travels_in_a_weights_only_state_dict(tmp_path):
    source = _rigged(VSADModel(**TINY))
    torch.save(source.state_dict(), tmp_path / "model.pt")
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    fresh = VSADModel(**TINY)
    assert not fresh.rig.is_set()
    fresh.load_state_dict(state, strict=True)
    assert fresh.rig.view_names == ["C1", "C2", "C3"] and fresh.rig.image_size == (32, 32)
    assert torch.equal(fresh.rig.homographies, source.rig.homographies)
    assert torch.equal(fresh.rig.neighbour_mask, source.rig.neighbour_mask)
    # Without per-sample homographies every sample gets the rig's.
    assert torch.equal(fresh.rig.sample_homographies(None), source.rig.homographies)


def test_a_model_without_rig_or_bank_says_what_is_missing():
    model = VSADModel(**TINY)
    images = torch.zeros(1, 3, 3, 32, 32)
    with pytest.raises(RuntimeError, match="memory bank is empty"):
        model(images)
    for level in model.level_weights:
        model.memory_bank.set_level(level, torch.ones(4, 8))
    with pytest.raises(DataError, match="holds no camera rig"):
        model(images)
    _rigged(model).rig.check_views(["C1", "C2", "C3"])
    with pytest.raises(DataError, match=r"fitted on views \['C1', 'C2', 'C3'\]"):
        model.rig.check_views(["C1", "C3", "C2"])


def test_checkpoints_from_before_the_model_split_still_load():
    source = VSADModule(**TINY)
    legacy = {
        k.removeprefix("model."): v
        for k, v in source.state_dict().items()
        if not k.startswith("model.rig.")  # no rig then either
    }
    assert any(k.startswith("unet.") for k in legacy)
    fresh = VSADModule(**TINY)
    fresh.load_state_dict(legacy, strict=True)
    for key, value in source.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(fresh.state_dict()[key], value), key
    assert not fresh.model.rig.is_set()


def test_system_settings_reach_the_model_and_are_validated():
    module = VSADModule(**TINY, latent_weight=2.0)
    levels = {level: 1.0 for level in module.feature_levels}
    assert module.level_weights == {**levels, LATENT_LEVEL: 2.0}
    module.hparams.calibration = "view"
    assert module._sync_model().config.calibration == "view"
    module.hparams.threshold_quantile = 1.5
    with pytest.raises(ValueError, match="threshold_quantile"):
        module._sync_model()
    with pytest.raises(ValueError, match="fusion_strength"):
        VSADModule(**TINY, fusion_strength=2.0)


def test_the_system_brings_its_bank_callback_once():
    alone = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    module = VSADModule(**TINY)
    module._trainer = alone
    (callback,) = module.configure_callbacks()
    assert isinstance(callback, MemoryBankCallback)
    configured = MemoryBankCallback(coreset_ratio=0.5)
    with_cli = L.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[configured]
    )
    module._trainer = with_cli
    assert module.configure_callbacks() == []  # the CLI's (configured) callback is kept


def test_vsad_lists_its_subcommands_with_one_line_each(capsys):
    from vsad_lightning.cli.main import SUBCOMMANDS, main

    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    for name in ("fit", "test", "predict", "export", "homography", "synth", "report"):
        (line,) = [ln for ln in listed.splitlines() if ln.strip().startswith(name + " ")]
        assert SUBCOMMANDS[name][1] in line
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_bank_dtype_float16_stores_half_and_scores_like_float32():
    from vsad_lightning.data.batch import MultiViewBatch

    views, size = ["C1", "C2", "C3"], 32
    g = torch.Generator().manual_seed(0)

    def batch(ids: list[str]) -> MultiViewBatch:
        B = len(ids)
        return MultiViewBatch(
            images=torch.rand(B, 3, 3, size, size, generator=g) * 2 - 1,
            masks=torch.zeros(B, 3, 1, size, size),
            view_labels=torch.zeros(B, 3, dtype=torch.long),
            sample_labels=torch.zeros(B, dtype=torch.long),
            homographies=torch.eye(3).repeat(B, 3, 3, 1, 1),
            neighbour_mask=neighbour_mask("all", 3),
            sample_ids=ids,
            categories=["c"] * B,
            view_names=views,
        )

    loader = [batch(["a", "b"]), batch(["c", "d"])]
    test = batch(["t"])
    scores = {}
    for dtype in (torch.float32, torch.float16):
        torch.manual_seed(0)
        model = _rigged(VSADModel(**TINY))
        info = model.fit_memory_bank(loader, dtype=dtype)
        assert info["dtype"] == str(dtype).removeprefix("torch.")
        assert {model.memory_bank.bank(lv).dtype for lv in model.memory_bank.levels} == {dtype}
        scores[dtype] = model(test.images).anomaly_maps
    # Rounding the stored rows to float16 moves the maps by far less than their spread.
    spread = scores[torch.float32].std()
    assert (scores[torch.float16] - scores[torch.float32]).abs().max() < 0.01 * spread
    with pytest.raises(ValueError, match="bank.dtype"):
        MemoryBankCallback(dtype="int8")


def test_unet_image_size_runs_the_unet_on_smaller_views_and_keeps_the_latent_full_size():
    torch.manual_seed(0)
    settings = dict(TINY, latent_weight=2.0, feature_norm="none")
    split = VSADModel(**{**settings, "image_size": 64, "unet_image_size": 32})
    small = VSADModel(**settings)  # image_size 32: what the split model's U-Net must see
    small.load_state_dict(split.state_dict(), strict=True)  # same weights, same shapes
    images = torch.rand(2, 3, 3, 64, 64) * 2 - 1
    H, mask = torch.eye(3).repeat(2, 3, 3, 1, 1), neighbour_mask("all", 3)
    features = split.extract_features(images, H, mask)
    resized = torch.nn.functional.interpolate(images.flatten(0, 1), size=32, mode="area")
    expected = small.extract_features(resized.unflatten(0, (2, 3)), H, mask)
    for level in split.feature_levels:  # the U-Net's levels: computed from the 32 px views
        assert torch.allclose(features[level], expected[level], atol=1e-5), level
    # The latent level: the 64 px views' own (4x4 pixel patches of 16 x 16 places).
    assert torch.equal(features[LATENT_LEVEL], split.encode(images))
    assert features[LATENT_LEVEL].shape[-2:] == (16, 16)
    assert expected[LATENT_LEVEL].shape[-2:] == (8, 8)
    # The setting rebuilds from the hyperparameters (checkpoints, bundles).
    assert VSADModel(**split.hyperparameters()).unet_image_size == 32


@pytest.mark.parametrize(
    "sizes, message",
    [
        (
            {"image_size": 32, "unet_image_size": 64},
            r"unet_image_size 64 must be in \(0, image_size",
        ),
        ({"image_size": 66, "unet_image_size": 32}, "image_size 66 must be a multiple of the enc"),
        (
            {"image_size": 64, "unet_image_size": 24},
            "unet_image_size 24: image_size 24 must be a multiple of 16",
        ),
    ],
)
def test_unet_image_size_that_cannot_work_is_refused(sizes, message):
    with pytest.raises(ValueError, match=message):
        VSADModel(**{**TINY, **sizes})
