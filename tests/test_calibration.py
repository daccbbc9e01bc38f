"""Calibration on normals only (``vsad_lightning.models.calibration``): leave-one-out maps,
robust statistics, OK/NG thresholds, checkpoints, and that test labels never reach any of it."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from vsad_lightning.bank.knn import nearest_distance
from vsad_lightning.bank.storage import MemoryBank, flatten_features, unflatten_features
from vsad_lightning.callbacks.memory_bank import MemoryBankCallback
from vsad_lightning.data.datamodule import MultiViewDataModule
from vsad_lightning.metrics.curves import exact_auroc
from vsad_lightning.models.calibration import (
    CALIBRATION_MODES,
    Calibration,
    leave_one_out_maps,
    robust_center_scale,
)
from vsad_lightning.models.scoring import anomaly_maps
from vsad_lightning.system.module import VSADModule

IMAGE = (24, 20)  # (W, H) of the maps in the synthetic-bank tests


def _bank(maps: torch.Tensor) -> MemoryBank:
    """A bank of whole ``(n, V, C, h, w)`` feature maps at level 0 (the positional layout)."""
    bank = MemoryBank()
    bank.set_level(0, flatten_features(maps), grid=(maps.shape[1], *maps.shape[3:]))
    return bank


def _own(bank: MemoryBank):
    return lambda ids: {level: bank.sample_features(level, ids) for level in bank.levels}


def test_positional_loo_equals_a_bank_rebuilt_without_the_sample():
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(6, 2, 5, 6, 7, generator=generator)
    bank = _bank(maps)
    torch.testing.assert_close(bank.sample_features(0, torch.tensor([4, 1])), maps[[4, 1]])
    queries = maps[[3, 0, 5]]
    exclude = torch.tensor([3, -1, 0])  # its own sample, none, another sample
    got = bank.positional_distances(0, queries, 2, exclude=exclude)
    for b, left_out in enumerate(exclude.tolist()):
        keep = [i for i in range(6) if i != left_out]
        reference = _bank(maps[keep]).positional_distances(0, queries[b : b + 1], 2)
        torch.testing.assert_close(got[b : b + 1], reference, rtol=0, atol=1e-5)
    # A training sample is in the bank: ~0 against the full bank, clearly > 0 without itself.
    assert float(got[1].max()) < 1e-5  # query 1 is sample 0, nothing left out
    assert float(got[0].min()) > 0.1


def test_loo_maps_go_through_the_test_maps_smoothing():
    generator = torch.Generator().manual_seed(1)
    maps = torch.randn(5, 2, 4, 5, 6, generator=generator)
    bank = _bank(maps)
    samples = torch.tensor([4, 0, 2])
    loo = leave_one_out_maps(
        bank, samples, _own(bank), IMAGE, {0: 2.0}, sigma=1.5, positional_radius=1, batch_size=2
    )
    assert loo.shape == (3, 2, IMAGE[1], IMAGE[0])
    for k, sample in enumerate(samples.tolist()):
        keep = [i for i in range(5) if i != sample]
        distances = _bank(maps[keep]).positional_distances(0, maps[[sample]], 1)
        expected = anomaly_maps({0: distances}, IMAGE, weights={0: 2.0}, sigma=1.5)[:, :, 0]
        torch.testing.assert_close(loo[k : k + 1], expected, rtol=0, atol=1e-5)
    # Without leaving anything out the same samples score ~0: LOO is what makes them > 0.
    plain = bank.positional_distances(0, maps[samples], 1)
    assert float(plain.max()) < 1e-5 and float(loo.min()) > 0.1


@pytest.mark.parametrize("coreset", [False, True])
def test_global_bank_kfold_scores_each_fold_against_the_other_folds(coreset):
    generator = torch.Generator().manual_seed(2)
    n, folds, grid = 7, 3, (2, 4, 5)
    maps = torch.randn(n, grid[0], 3, *grid[1:], generator=generator)
    rows = flatten_features(maps)
    origin = torch.arange(rows.shape[0]) // math.prod(grid)
    bank = MemoryBank()
    row_samples = None
    if coreset:  # a bank of every other row: the LOO needs each row's sample
        keep = torch.arange(0, rows.shape[0], 2)
        bank.set_level(0, rows[keep])
        row_samples, rows, origin = {0: origin[keep]}, rows[keep], origin[keep]
    else:
        bank.set_level(0, rows, grid=grid)

    def features_of(ids):
        return {0: maps[ids]}

    samples = torch.arange(n)
    loo = leave_one_out_maps(
        bank, samples, features_of, IMAGE, sigma=0.0, folds=folds, row_samples=row_samples
    )
    for sample in range(n):
        sub = rows[origin % folds != sample % folds]
        distances = nearest_distance(flatten_features(maps[[sample]]), sub, backend="torch")
        expected = anomaly_maps({0: unflatten_features(distances, (1, *grid))}, IMAGE, sigma=0.0)[
            :, :, 0
        ]
        torch.testing.assert_close(loo[sample : sample + 1], expected, rtol=0, atol=1e-5)
    assert float(loo.amax(dim=(1, 2, 3)).min()) > 0.1  # no sample met its own rows


def _normals(n: int = 40, views: int = 3, size: int = 16, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 1.0 + 0.05 * torch.randn(n, views, size, size, generator=generator)


def test_robust_statistics_and_the_spread_floor():
    values = torch.tensor([[1.0], [2.0], [3.0], [4.0], [100.0]])
    center, spread = robust_center_scale(values, 0)
    assert float(center) == 3.0 and float(spread) == pytest.approx(1.4826)  # the outlier: no say
    maps = _normals()
    maps[:, 1, :8] = 2.0  # half of view 1 never varies: its spread would be 0
    calibration = Calibration()
    calibration.fit(maps, floor=0.0)
    spread = calibration.position_scale.clone()
    active = spread[1, 8:].median()
    assert float(spread[1, :8].max()) < 1e-3 * float(active)  # only the tiny absolute floor
    calibration.fit(maps, floor=1.0)
    # The mean spread of view 1 is about half the active half's: the flat half gets that.
    floor = spread[1].mean()
    torch.testing.assert_close(calibration.position_scale[1, :8], floor.expand(8, 16))
    assert 0.4 * float(active) < float(floor) < 0.6 * float(active)
    # Places noisier than the floor keep their own spread.
    noisy = spread[1] > floor
    assert torch.equal(calibration.position_scale[1][noisy], spread[1][noisy])


def test_position_normalisation_shrinks_the_spread_of_normal_view_scores():
    # View 0 has a place (a specular highlight) whose normal values vary strongly from sample
    # to sample; a defect elsewhere adds a fixed bump. In raw scores the highlight sets the
    # normal view scores; per-position standardisation takes it out.
    def draw(n: int, seed: int, defect: bool) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        maps = _normals(n, seed=seed)
        maps[:, 0, 3:5, 3:5] += 1.5 * torch.rand(n, 1, 1, generator=generator)
        if defect:
            maps[:, 0, 10:12, 10:12] += 0.6
        return maps

    calibration = Calibration()
    calibration.fit(draw(40, 4, defect=False))
    normal, defective = draw(200, 5, defect=False), draw(200, 6, defect=True)
    ratio = {}
    for mode in CALIBRATION_MODES:
        good = calibration.apply(normal[:, :, None], mode).view_scores[:, 0]
        bad = calibration.apply(defective[:, :, None], mode).view_scores[:, 0]
        spread = good.quantile(0.75) - good.quantile(0.25)
        ratio[mode] = float(spread / (bad.median() - good.median()))
        scores = torch.cat([good, bad]).numpy()
        ratio[mode, "auroc"] = exact_auroc(scores, torch.arange(400).ge(200).long().numpy())
    # The spread of normal view scores in units of the defect's effect.
    assert ratio["position"] < 0.2 * ratio["none"], ratio
    assert ratio["view"] == pytest.approx(ratio["none"], rel=1e-4)  # per view: affine only
    assert ratio["position", "auroc"] > 0.99 > 0.8 > ratio["none", "auroc"], ratio


@pytest.mark.parametrize("quantile", [0.9, 0.95])
def test_quantile_thresholds_flag_the_documented_share_of_loo_normals(quantile):
    maps = _normals(40)
    calibration = Calibration()
    calibration.fit(maps, rule="quantile", value=quantile)
    n = maps.shape[0]
    expected = n - 1 - math.floor((n - 1) * quantile)  # 2 of 40 at 0.95, 4 at 0.9
    for mode in CALIBRATION_MODES:
        out = calibration.apply(maps[:, :, None], mode)
        assert out.view_labels.sum(0).tolist() == [expected] * maps.shape[1], mode
        assert int(out.sample_labels.sum()) == expected, mode
        # A view is NG exactly when its mask has a pixel: the mask is what made it NG.
        assert torch.equal(out.masks.flatten(2).any(2).long(), out.view_labels), mode
        torch.testing.assert_close(out.view_scores, out.maps.amax(dim=(2, 3, 4)))


def test_sigma_rule_and_switching_rules_after_the_fit():
    maps = _normals(40)
    calibration = Calibration()
    calibration.fit(maps, rule="quantile", value=0.95)
    quantile_thresholds = calibration.view_threshold.clone()
    assert calibration.thresholds_match("quantile", 0.95)
    calibration.set_thresholds("sigma", 3.0)
    assert calibration.thresholds_match("sigma", 3.0)
    assert not calibration.thresholds_match("quantile", 0.95)
    # Standardised scores have median 0 and spread 1 per view: the threshold is k itself.
    for mode in ("view", "position"):
        m = CALIBRATION_MODES.index(mode)
        torch.testing.assert_close(
            calibration.view_threshold[m], torch.full((3,), 3.0), rtol=1e-4, atol=0
        )
    raw = maps.amax(dim=(2, 3))
    center, spread = robust_center_scale(raw, 0)
    torch.testing.assert_close(calibration.view_threshold[0], center + 3.0 * spread)
    calibration.set_thresholds("quantile", 0.95)
    torch.testing.assert_close(calibration.view_threshold, quantile_thresholds, rtol=0, atol=0)
    with pytest.raises(ValueError, match="threshold_quantile"):
        calibration.set_thresholds("quantile", 1.0)


def _tiny_module(**overrides) -> VSADModule:
    args = dict(
        image_size=64, attention_dim=16, num_heads=2, inversion_steps=1, feature_norm="instance",
        latent_weight=2.0, bank_mode="positional", sigma=2.0,
    )  # fmt: skip
    return VSADModule(**{**args, **overrides})


def test_calibration_round_trips_through_a_weights_only_checkpoint(tmp_path):
    source = _tiny_module()
    source.calibration.fit(_normals(12, views=5, size=64))
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": source.state_dict()}, path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    fresh = _tiny_module()
    assert not fresh.calibration.is_fitted()
    fresh.load_state_dict(loaded)  # strict: the buffers are created from the checkpoint
    assert fresh.calibration.is_fitted() and fresh.calibration.num_normals == 12
    for name, value in source.calibration.state_dict().items():
        assert torch.equal(fresh.calibration.state_dict()[name], value), name
    maps = _normals(3, views=5, size=64, seed=9)[:, :, None] + 0.2
    for mode in CALIBRATION_MODES:
        a, b = source.calibration.apply(maps, mode), fresh.calibration.apply(maps, mode)
        assert torch.equal(a.view_scores, b.view_scores) and torch.equal(a.masks, b.masks)
    # A checkpoint written before calibration existed still loads (strict), unfitted.
    old = {k: v for k, v in loaded.items() if not k.startswith("model.calibration.")}
    older = _tiny_module()
    older.load_state_dict(old)
    assert not older.calibration.is_fitted()


# ------------------------------------------------------------- fitted in-process, real data


def _fit(root, tmp_path, *, streaming: bool = False, coreset: float = 1.0, **overrides):
    """A real one-step fit (lr 0, 64 px) that builds the bank and the calibration."""
    L.seed_everything(0, verbose=False)
    data = MultiViewDataModule(str(root), "brick", resolution=64, image_size=64, batch_size=4)
    module = _tiny_module(lr=0.0, **overrides)
    callback = MemoryBankCallback(
        coreset_ratio=coreset, save_checkpoint=False, streaming=streaming, spill_dir=str(tmp_path)
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[callback],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return module, data


@pytest.fixture(scope="module")
def fitted(synthetic_root_cached, tmp_path_factory, one_torch_thread):
    return _fit(synthetic_root_cached, tmp_path_factory.mktemp("fit"))


@pytest.mark.parametrize("streaming", [False, True])
def test_fit_calibrates_a_global_coreset_bank(synthetic_root_cached, synthetic_spec, tmp_path,
                                              streaming, one_torch_thread):  # fmt: skip
    module, _ = _fit(
        synthetic_root_cached, tmp_path, streaming=streaming, coreset=0.5, bank_mode="global",
        calibration_folds=4,
    )  # fmt: skip
    assert module.calibration.is_fitted()
    assert module.calibration.num_normals == synthetic_spec.samples_train
    assert not list(tmp_path.glob("vsad_bank_*")), "spill files left behind"
    # Every normal was scored without its own fold: no LOO view score is ~0.
    normal = module.calibration.normal_view_scores[0]
    assert float(normal.min()) > 0.05


def test_fit_calibrates_from_the_bank_with_loo(fitted, synthetic_spec):
    module, data = fitted
    calibration = module.calibration
    assert calibration.is_fitted() and calibration.num_normals == synthetic_spec.samples_train
    assert calibration.position_center.shape == (len(synthetic_spec.views), 64, 64)
    # The LOO view scores of training normals are clearly above their in-bank scores (~0).
    bank = module.memory_bank
    ids = torch.arange(2)
    plain = module.leave_one_out_maps  # the module's own settings
    loo = plain(ids, _own(bank), (64, 64))
    torch.testing.assert_close(
        loo.amax(dim=(2, 3)), calibration.normal_view_scores[0, :2], rtol=0, atol=1e-5
    )
    assert float(loo.amax(dim=(2, 3)).min()) > 0.1


def _flipped(batch):
    """Every test label inverted (masks emptied where a view becomes normal) and shuffled."""
    from dataclasses import replace

    order = torch.randperm(batch.batch_size, generator=torch.Generator().manual_seed(0))
    view_labels = 1 - batch.view_labels[order]
    masks = batch.masks[order] * view_labels[:, :, None, None, None]
    return replace(
        batch, view_labels=view_labels, sample_labels=view_labels.amax(dim=1), masks=masks
    )


class _Keep(L.Callback):
    def __init__(self) -> None:
        self.outputs = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.outputs.append(outputs)


def test_test_labels_change_no_calibration_buffer_and_no_score(fitted):
    module, data = fitted
    module.hparams.calibration = "position"
    data.setup("test")
    batches = list(data.test_dataloader())
    before = {k: v.clone() for k, v in module.calibration.state_dict().items()}
    runs = {}
    for name, stream in (("true", batches), ("flipped", [_flipped(b) for b in batches])):
        keep = _Keep()
        trainer = L.Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[keep],
            enable_model_summary=False,
        )  # fmt: skip
        loader = DataLoader(stream, batch_size=None, collate_fn=lambda b: b)
        trainer.test(module, dataloaders=loader, verbose=False)
        runs[name] = (keep.outputs, dict(module.test_results))
        for key, value in module.calibration.state_dict().items():
            assert torch.equal(value, before[key]), key
    for a, b in zip(runs["true"][0], runs["flipped"][0], strict=True):
        for field in ("anomaly_maps", "normalised_maps", "view_scores", "sample_scores",
                      "pred_view_labels", "pred_sample_labels", "pred_masks"):  # fmt: skip
            assert torch.equal(getattr(a, field), getattr(b, field)), field
    # The labels did reach the metrics: the decisions are now judged against flipped truth.
    decisions = {n: [r[1][f"view_{k}"] for k in ("f1", "fpr", "fnr")] for n, r in runs.items()}
    assert decisions["true"] != decisions["flipped"], decisions


def test_modes_share_one_fit_and_an_uncalibrated_model_says_what_to_do(fitted):
    module, data = fitted
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    outputs = {}
    for mode in CALIBRATION_MODES:
        module.hparams.calibration = mode
        outputs[mode] = module.score(batch)
    raw = outputs["none"]
    assert torch.equal(raw.normalised_maps, raw.anomaly_maps)
    for mode in CALIBRATION_MODES:  # the raw maps stay available in every mode
        assert torch.equal(outputs[mode].anomaly_maps, raw.anomaly_maps)
    assert not torch.equal(outputs["position"].view_scores, raw.view_scores)
    module.hparams.threshold_rule = "sigma"  # re-derived from the stored normal scores
    sigma = module.score(batch)
    assert module.calibration.thresholds_match("sigma", module.hparams.threshold_sigma)
    assert torch.equal(sigma.view_scores, outputs["position"].view_scores)
    module.hparams.threshold_rule = "quantile"

    bare = _tiny_module(calibration="position")
    bare.memory_bank.load_state_dict(module.memory_bank.state_dict())
    with pytest.raises(ValueError, match="model.calibration none"):
        bare.score(batch)


# ------------------------------------------------------------------ console scripts, e2e


@pytest.mark.slow
def test_fit_then_test_in_every_mode_from_one_checkpoint(
    console_script, tiny_fit_args, synthetic_root_cached, synthetic_spec, tmp_path
):
    import csv
    import json
    from pathlib import Path

    data = ["--data.root", str(synthetic_root_cached), "--data.category", "brick"]
    fit = console_script(
        "vsad-fit", *tiny_fit_args, *data, "--trainer.default_root_dir", str(tmp_path / "fit"),
        "--model.calibration", "view",
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    run = Path(fit.stdout.strip().splitlines()[-1].removeprefix("metrics: ")).parent
    metrics = {"view": json.loads((run / "metrics.json").read_text())}
    decisions = [f"{level}_{name}" for level in ("view", "sample") for name in ("f1", "fpr", "fnr")]
    assert set(decisions) <= set(metrics["view"]), metrics["view"]
    rows = list(csv.DictReader((run / "scores.csv").open()))
    assert len(rows) == synthetic_spec.samples_test * len(synthetic_spec.views)
    assert {r["view_decision"] for r in rows} <= {"OK", "NG"}
    assert {r["sample_truth"] for r in rows} == {"OK", "NG"}
    # The scores.csv decisions are the ones behind the metrics.
    normal_views = [r for r in rows if r["view_truth"] == "OK"]
    fpr = sum(r["view_decision"] == "NG" for r in normal_views) / len(normal_views)
    assert fpr == pytest.approx(metrics["view"]["view_fpr"])

    checkpoint = run / "checkpoints" / "final.ckpt"
    # Another mode, and the same mode under another threshold rule, from the same checkpoint.
    for name, extra in (
        ("position", ["--model.calibration", "position"]),
        ("sigma", ["--model.calibration", "view", "--model.threshold_rule", "sigma"]),
    ):
        test = console_script(
            "vsad-test", *tiny_fit_args, *data, "--trainer.default_root_dir",
            str(tmp_path / name), "--ckpt_path", str(checkpoint), *extra,
        )  # fmt: skip
        assert test.returncode == 0, test.stderr[-3000:]
        path = Path(test.stdout.strip().splitlines()[-1].removeprefix("metrics: "))
        metrics[name] = json.loads(path.read_text())
        assert set(decisions) <= set(metrics[name]), name
    assert metrics["position"]["n_views"] == metrics["view"]["n_views"]
    assert metrics["position"]["pixel_auroc"] != metrics["view"]["pixel_auroc"]
    # The same scores under another rule: threshold-free metrics unchanged, decisions not.
    assert metrics["sigma"]["view_auroc"] == metrics["view"]["view_auroc"]
    assert metrics["sigma"]["pixel_auroc"] == metrics["view"]["pixel_auroc"]


# ------------------------------------------------------------------ cross-view fusion


def _highlight_normals(n: int = 12, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` normals of 2 views that see the same plane (identity homographies); view 0 has a
    highlight at a random place per sample that view 1 does not show."""
    gen = torch.Generator().manual_seed(0)
    maps = 0.2 * torch.rand(n, 2, size, size, generator=gen)
    for i in range(n):
        y, x = torch.randint(2, size - 2, (2,), generator=gen).tolist()
        maps[i, 0, y - 1 : y + 2, x - 1 : x + 2] = 3.0
    return maps, torch.eye(3).repeat(n, 2, 2, 1, 1)


def test_fused_calibration_discounts_a_highlight_and_keeps_a_defect_both_views_see():
    maps, homographies = _highlight_normals()
    mask = ~torch.eye(2, dtype=torch.bool)
    calibration = Calibration()
    calibration.fit(maps, homographies=homographies, neighbour_mask=mask, fusion_strength=1.0)
    assert calibration.fusion_matches(1.0) and not calibration.fusion_matches(0.0)
    fused_normals = calibration.normal_view_scores.clone()
    calibration.set_view_statistics(0.0)
    # Unfused, the highlights set view 0's raw normal scores; fused, they are gone.
    raw = CALIBRATION_MODES.index("none")
    assert float(calibration.normal_view_scores[raw, :, 0].min()) > 2.5
    assert float(fused_normals[raw, :, 0].max()) < 0.5
    with pytest.raises(RuntimeError, match="set_view_statistics"):
        calibration.apply(maps[:1, :, None], "none", fusion_strength=1.0)

    calibration.set_view_statistics(1.0)
    calibration.set_thresholds("quantile", 0.95)
    test = 0.1 * torch.ones(2, 2, 1, 16, 16)
    test[0, :, :, 7:10, 7:10] = 3.0  # a defect both views see
    test[1, 0, :, 7:10, 7:10] = 3.0  # a highlight in view 0 only
    out = calibration.apply(
        test, "none", homographies=homographies[:2], neighbour_mask=mask, fusion_strength=1.0
    )
    assert out.sample_labels.tolist() == [1, 0]
    assert float(out.view_scores[0, 0]) == pytest.approx(3.0)
    assert float(out.view_scores[1, 0]) == pytest.approx(0.1)


def test_fusion_needs_the_normals_homographies():
    maps, _ = _highlight_normals(4)
    calibration = Calibration()
    calibration.fit(maps)
    with pytest.raises(ValueError, match="homographies"):
        calibration.set_view_statistics(0.5)


def test_a_fit_stores_the_normals_geometry_and_fusion_can_be_switched_at_test_time(fitted):
    module, data = fitted
    calibration = module.calibration
    n, V = calibration.num_normals, len(data.view_names)
    assert calibration.normal_homographies.shape == (n, V, V, 3, 3)
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    assert torch.equal(calibration.neighbour_mask.bool(), batch.neighbour_mask)
    module.hparams.calibration = "position"
    plain = module.score(batch)
    module.hparams.fusion_strength = 1.0
    try:
        fused = module.score(batch)  # the normals' statistics are re-derived for 1.0
        assert calibration.fusion_matches(1.0)
        assert torch.equal(fused.anomaly_maps, plain.anomaly_maps)
        assert not torch.equal(fused.view_scores, plain.view_scores)
    finally:
        module.hparams.fusion_strength = 0.0
        module.score(batch)
    assert calibration.fusion_matches(0.0)
