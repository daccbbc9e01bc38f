"""The system end to end through the real console scripts, Trainer, DDP and TensorBoard files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vsad_lightning.bank.knn import nearest_distance

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEMO_CONFIG = REPO / "configs" / "demo.yaml"

# Small and fast: 64x64 images, few samples, obvious defects; same code paths as the demo.
SMALL = [
    "--data.image_size", "64",
    "--data.resolution", "64",
    "--data.batch_size", "4",
    "--trainer.max_epochs", "2",
    "--model.inversion_steps", "2",
    "--pictures.num_samples", "2",
    "--trainer.log_every_n_steps", "1",
]  # fmt: skip


def run_script(name: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(BIN / name), *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    run_script(
        "vsad-synth", "--out", str(root), "--categories", "brick", "--seed", "3",
        "--image-size", "64", "--samples-train", "24", "--samples-test", "8",
    )  # fmt: skip
    return root


@pytest.fixture(scope="module")
def fitted(small_root, tmp_path_factory) -> dict:
    runs = tmp_path_factory.mktemp("runs")
    proc = run_script(
        "vsad-fit", "--config", str(DEMO_CONFIG), "--data.root", str(small_root),
        "--data.category", "brick", "--trainer.default_root_dir", str(runs), *SMALL,
    )  # fmt: skip
    last_line = proc.stdout.strip().splitlines()[-1]
    assert last_line.startswith("metrics: "), proc.stdout[-2000:]
    metrics_path = Path(last_line.removeprefix("metrics: "))
    return {"runs": runs, "metrics_path": metrics_path, "stdout": proc.stdout}


@pytest.mark.slow
def test_fit_end_to_end_writes_metrics_well_above_chance(fitted):
    metrics_path = fitted["metrics_path"]
    run_dir = metrics_path.parent
    assert run_dir.parent.name == "version_0" or run_dir.name.startswith("version_")
    assert run_dir.parent.name == "brick" and run_dir.parent.parent.name == "realiad"
    metrics = json.loads(metrics_path.read_text())
    for key in ("category", "pixel_auroc", "pixel_ap", "pixel_aupro", "view_auroc", "view_ap",
                "sample_auroc", "sample_ap", "n_samples", "n_views"):  # fmt: skip
        assert key in metrics, key
    assert metrics["category"] == "brick"
    assert metrics["n_samples"] == 8 and metrics["n_views"] == 40
    for key in ("pixel_auroc", "view_auroc", "sample_auroc", "pixel_aupro"):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics)
    assert (run_dir / "metrics.csv").is_file()
    assert (run_dir / "checkpoints" / "final.ckpt").is_file()
    assert list((run_dir / "images").glob("*.png")), "no pictures written"
    assert "pixel_auroc" in fitted["stdout"]


@pytest.mark.slow
def test_fit_detects_obvious_defects_well_above_chance(fitted):
    # 24 normals and 2 epochs (12 steps): with 8 normals the bank misses too much benign
    # variation (sample AUROC 0.50 measured); 24 gave 1.00 / 0.92 / 0.99 (sample / view / pixel).
    metrics = json.loads(fitted["metrics_path"].read_text())
    assert metrics["pixel_auroc"] > 0.8, metrics
    assert metrics["view_auroc"] > 0.7, metrics
    assert metrics["sample_auroc"] > 0.7, metrics


@pytest.mark.slow
def test_tensorboard_event_files_hold_losses_metrics_and_maps(fitted):
    run_dir = fitted["metrics_path"].parent
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/denoising_loss", "train/consistency_loss"} <= scalars, scalars
    assert {"test/pixel_auroc", "test/sample_auroc", "test/view_auroc"} <= scalars, scalars
    assert any(tag.startswith("lr") for tag in scalars), scalars
    images = acc.Tags()["images"]
    assert any(tag.startswith("test/maps/") for tag in images), images
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.slow
def test_checkpoint_round_trip_reproduces_metrics_exactly(fitted, small_root, tmp_path):
    run_dir = fitted["metrics_path"].parent
    proc = run_script(
        "vsad-test", "--config", str(DEMO_CONFIG), "--data.root", str(small_root),
        "--data.category", "brick", "--trainer.default_root_dir", str(tmp_path), *SMALL,
        "--ckpt_path", str(run_dir / "checkpoints" / "final.ckpt"),
    )  # fmt: skip
    again = Path(proc.stdout.strip().splitlines()[-1].removeprefix("metrics: "))
    assert again != fitted["metrics_path"]
    assert json.loads(again.read_text()) == json.loads(fitted["metrics_path"].read_text())


def _bank(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict]:
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    bank = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("memory_bank.bank_")}
    (info,) = [v for k, v in checkpoint["callbacks"].items() if "MemoryBankCallback" in k]
    return bank, info


def _calibration(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    # The normals (their LOO maps, scores and homographies) are stored in the loader's order
    # whatever the number of processes and the build, so the buffers compare element-wise.
    return {k: v for k, v in state.items() if k.startswith("calibration.")}


@pytest.mark.slow
def test_ddp_two_processes_build_the_same_bank_as_one(small_root, tmp_path):
    # lr = 0: both runs keep the seeded initial weights, so the features, and therefore the
    # banks, must agree row for row whatever the number of processes.
    frozen = [*SMALL, "--trainer.max_epochs", "1", "--model.lr", "0.0",
              "--model.weight_decay", "0.0", "--model.warmup_steps", "0"]  # fmt: skip
    banks, calibrations = {}, {}
    # (devices, streaming): the in-memory path on one and two processes, and the streaming
    # builder (MemoryBankCallback(streaming=True)) on two.
    for devices, streaming in ((1, False), (2, False), (2, True)):
        root = tmp_path / f"d{devices}_{streaming}"
        proc = run_script(
            "vsad-fit", "--config", str(DEMO_CONFIG), "--data.root", str(small_root),
            "--data.category", "brick", "--trainer.default_root_dir", str(root), *frozen,
            "--trainer.devices", str(devices), "--trainer.strategy",
            "ddp" if devices == 2 else "auto", "--bank.streaming", str(streaming).lower(),
            "--bank.spill_dir", str(tmp_path),
        )  # fmt: skip
        metrics_path = Path(proc.stdout.strip().splitlines()[-1].removeprefix("metrics: "))
        final = metrics_path.parent / "checkpoints" / "final.ckpt"
        banks[devices, streaming], info = _bank(final)
        calibrations[devices, streaming] = _calibration(final)
        assert info["world_size"] == devices and info["streaming"] == streaming, info
        assert info["feature_rows"] == {
            key.removeprefix("memory_bank.bank_"): value.shape[0]
            for key, value in banks[devices, streaming].items()
        }, info
    one = banks[1, False]
    assert one.keys() == banks[2, False].keys() == banks[2, True].keys() and one
    for key, reference in one.items():
        two = banks[2, False][key]
        assert reference.shape == two.shape, key
        # Same rows as sets: every row of each bank has an (almost) exact twin in the other.
        assert nearest_distance(reference, two, backend="torch").max() < 1e-4, key
        assert nearest_distance(two, reference, backend="torch").max() < 1e-4, key
        # The streaming build puts rows in the unsharded loader's order: the one-process bank,
        # row for row.
        torch.testing.assert_close(banks[2, True][key], reference, rtol=0, atol=1e-4)
    assert not any(tmp_path.glob("vsad_bank_*")), "spill files left behind"
    # The calibration: LOO maps scored in shards and gathered give the one-process statistics.
    reference = calibrations[1, False]
    assert "calibration.view_threshold" in reference
    for run in ((2, False), (2, True)):
        assert calibrations[run].keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(calibrations[run][key], value, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_predict_writes_maps_and_scores_for_a_folder(fitted, small_root, tmp_path):
    import csv
    import shutil

    # Two test samples of the synthetic set, re-laid as the generic folder layout.
    spec = json.loads((small_root / "realiad_jsons" / "brick.json").read_text())
    keep = sorted({"_".join(Path(e["image_path"]).stem.split("_")[:3]) for e in spec["test"]})[:2]
    folder = tmp_path / "new_parts"
    for entry in spec["test"]:
        stem = Path(entry["image_path"]).stem  # brick_0009_OK_C3_<stamp>
        sample, view = "_".join(stem.split("_")[:3]), stem.split("_")[3]
        if sample in keep:
            (folder / sample).mkdir(parents=True, exist_ok=True)
            shutil.copy(small_root / "realiad_64" / "brick" / entry["image_path"],
                        folder / sample / f"{view}.jpg")  # fmt: skip
    complete = sorted(p.name for p in folder.iterdir())
    assert complete == keep and all(len(list((folder / s).iterdir())) == 5 for s in keep)

    run_dir = fitted["metrics_path"].parent
    out = tmp_path / "predictions"
    proc = run_script(
        "vsad-predict", "--config", str(DEMO_CONFIG), "--data.root", str(small_root),
        "--data.category", "brick", "--data.predict_root", str(folder),
        "--trainer.default_root_dir", str(tmp_path / "runs"), *SMALL,
        "--ckpt_path", str(run_dir / "checkpoints" / "final.ckpt"), "--output.dir", str(out),
    )  # fmt: skip
    assert proc.stdout.strip().splitlines()[-1] == f"scores: {out / 'scores.csv'}"
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert sorted({r["sample_id"] for r in rows}) == complete
    assert len(rows) == 5 * len(complete)
    for r in rows:
        # The demo's scores are calibrated (standardised): they may be negative.
        assert float(r["sample_score"]) >= float(r["view_score"])
        assert r["view_decision"] in ("OK", "NG") and r["sample_decision"] in ("OK", "NG")
    assert sorted(p.stem for p in (out / "maps").glob("*.png")) == complete


@pytest.mark.slow
def test_report_aggregates_runs_into_one_table(fitted, tmp_path):
    proc = run_script("vsad-report", str(fitted["runs"]), "--out", str(tmp_path))
    assert "| brick" in proc.stdout and "| mean" in proc.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["category"] for r in report["rows"]] == ["brick"]
    metrics = json.loads(fitted["metrics_path"].read_text())
    assert report["mean"]["pixel_auroc"] == pytest.approx(metrics["pixel_auroc"])
    assert (tmp_path / "report.csv").read_text().splitlines()[0].startswith("category,")
