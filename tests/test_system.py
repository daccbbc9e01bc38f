"""The system end to end through the real console scripts, Trainer, DDP and TensorBoard files."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vsad_lightning.bank.knn import nearest_distance
from vsad_lightning.data.dataset import cache_path_for
from vsad_lightning.data.sample_homographies import sample_cache_path
from vsad_lightning.geometry.cache import HomographyCache
from vsad_lightning.geometry.projection import neighbour_mask

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


# The end-to-end runs below read 128 px images (the demo's resolution) and feed the model 64 px:
# at 128 px the pooled homography estimate finds every neighbour pair (20 of 20 "ok" measured on
# this data), so MVAM runs on estimated geometry; at 64 px only 4 of 20 were "ok" and the rest
# fell back to the identity. The model's cost is that of 64 px.
SYSTEM = [*SMALL, "--data.resolution", "128"]


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
        "--image-size", "128", "--samples-train", "24", "--samples-test", "8",
    )  # fmt: skip
    return root


@pytest.fixture(scope="module")
def fitted(small_root, tmp_path_factory) -> dict:
    runs = tmp_path_factory.mktemp("runs")
    proc = run_script(
        "vsad-fit", "--config", str(DEMO_CONFIG), "--data.root", str(small_root),
        "--data.category", "brick", "--trainer.default_root_dir", str(runs), *SYSTEM,
    )  # fmt: skip
    last_line = proc.stdout.strip().splitlines()[-1]
    assert last_line.startswith("metrics: "), proc.stdout[-2000:]
    metrics_path = Path(last_line.removeprefix("metrics: "))
    return {
        "runs": runs,
        "metrics_path": metrics_path,
        "stdout": proc.stdout,
        "stderr": proc.stderr,
    }


@pytest.mark.slow
def test_fit_end_to_end_writes_the_run_folder(fitted):
    metrics_path = fitted["metrics_path"]
    run_dir = metrics_path.parent
    assert run_dir.name == "version_0", run_dir
    assert run_dir.parent.name == "brick" and run_dir.parent.parent.name == "realiad"
    metrics = json.loads(metrics_path.read_text())
    for key in ("category", "pixel_auroc", "pixel_ap", "pixel_aupro", "view_auroc", "view_ap",
                "sample_auroc", "sample_ap", "n_samples", "n_views"):  # fmt: skip
        assert key in metrics, key
    assert metrics["category"] == "brick"
    assert metrics["n_samples"] == 8 and metrics["n_views"] == 40
    assert (run_dir / "metrics.csv").is_file()
    assert (run_dir / "checkpoints" / "final.ckpt").is_file()
    assert list((run_dir / "images").glob("*.png")), "no pictures written"
    # The printed table shows the numbers of metrics.json (in percent, two decimals).
    row = next(line for line in fitted["stdout"].splitlines() if line.startswith("| brick"))
    assert (
        f"{100 * metrics['sample_auroc']:.2f}" in row
        and f"{100 * metrics['pixel_auroc']:.2f}" in row
    )


@pytest.mark.slow
def test_fit_estimates_the_neighbour_homographies_it_uses(fitted, small_root):
    # The run estimated the category's homographies at 128 px; the neighbour pairs the model
    # attends across must mostly be real estimates, not the identity fallback.
    cache = HomographyCache.load(cache_path_for(small_root, "brick", 128))
    mask = neighbour_mask("top_and_ring", len(cache.views))
    pairs = [
        cache.pairs[f"{cache.views[v]}->{cache.views[u]}"]
        for v in range(len(cache.views))
        for u in range(len(cache.views))
        if v != u and mask[v, u]
    ]
    ok = sum(pair.status == "ok" for pair in pairs)
    assert len(pairs) >= 8 and ok >= 0.8 * len(pairs), f"{ok} of {len(pairs)} neighbour pairs ok"
    # Each sample's own homographies (what the model used): estimated from the sample itself
    # ("refined" or "matched"), not the category's prior or a fallback; measured: all refined.
    for split, count in (("train", 24), ("test", 8)):
        path = sample_cache_path(cache_path_for(small_root, "brick", 128), split)
        samples = json.loads(path.read_text())["samples"]
        statuses = [pair["status"] for sample in samples.values() for pair in sample.values()]
        estimated = sum(status in ("refined", "matched") for status in statuses)
        assert len(samples) == count and len(statuses) == count * len(pairs), split
        assert estimated >= 0.8 * len(statuses), (split, estimated, len(statuses))


@pytest.mark.slow
def test_fit_detects_obvious_defects_well_above_chance(fitted):
    # 24 normals, 2 epochs (12 steps), 128 px data at 64 px model input. Measured on this data:
    # sample 1.00, view 1.00, pixel AUROC 0.999, pixel AUPRO 0.994, pixel AP 0.82. The bounds
    # leave room for other BLAS builds, not for a broken method (chance is 0.5; AUPRO of random
    # maps is about 0.15).
    metrics = json.loads(fitted["metrics_path"].read_text())
    assert metrics["sample_auroc"] >= 0.9, metrics
    assert metrics["view_auroc"] >= 0.9, metrics
    assert metrics["pixel_auroc"] >= 0.95, metrics
    assert metrics["pixel_aupro"] >= 0.9, metrics
    assert metrics["pixel_ap"] >= 0.5, metrics


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


@pytest.fixture(scope="module")
def tested(fitted, small_root, tmp_path_factory) -> Path:
    """``vsad-test`` of the fitted run's ``final.ckpt`` on the same data: its metrics.json."""
    run_dir = fitted["metrics_path"].parent
    proc = run_script(
        "vsad-test", "--config", str(DEMO_CONFIG), "--data.root", str(small_root),
        "--data.category", "brick", "--trainer.default_root_dir",
        str(tmp_path_factory.mktemp("tested")), *SYSTEM,
        "--ckpt_path", str(run_dir / "checkpoints" / "final.ckpt"),
    )  # fmt: skip
    return Path(proc.stdout.strip().splitlines()[-1].removeprefix("metrics: "))


@pytest.mark.slow
def test_checkpoint_round_trip_reproduces_metrics_exactly(fitted, tested):
    assert tested != fitted["metrics_path"]
    assert json.loads(tested.read_text()) == json.loads(fitted["metrics_path"].read_text())
    # Per view as well: the same scores and decisions in scores.csv.
    assert _read_scores(tested.parent / "scores.csv") == _read_scores(
        fitted["metrics_path"].parent / "scores.csv"
    )


def _bank(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict]:
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    bank = {
        k: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.memory_bank.bank_")
    }
    info = checkpoint["memory_bank_build"]  # final.ckpt holds weights, no callback state
    return bank, info


def _calibration(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    # The normals (their LOO maps, scores and homographies) are stored in the loader's order
    # whatever the number of processes and the build, so the buffers compare element-wise.
    return {k: v for k, v in state.items() if k.startswith("model.calibration.")}


@pytest.mark.slow
def test_ddp_two_processes_build_the_same_bank_as_one(small_root, tmp_path):
    # lr = 0: both runs keep the seeded initial weights, so the features, and therefore the
    # banks, must agree row for row whatever the number of processes.
    frozen = [*SYSTEM, "--trainer.max_epochs", "1", "--model.lr", "0.0",
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
            key.removeprefix("model.memory_bank.bank_"): value.shape[0]
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
    assert "model.calibration.view_threshold" in reference
    for run in ((2, False), (2, True)):
        assert calibrations[run].keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(calibrations[run][key], value, rtol=1e-3, atol=1e-3)


def _read_scores(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    """``scores.csv`` rows keyed by ``(sample_id, view)``."""
    with path.open() as f:
        return {(r["sample_id"], r["view"]): r for r in csv.DictReader(f)}


@pytest.mark.slow
def test_predict_scores_a_folder_exactly_as_test_scored_the_same_samples(
    fitted, tested, small_root, tmp_path
):
    # Two normal and two anomalous test samples of the synthetic set, re-laid as the generic
    # folder layout (sample folder, one image per view).
    spec = json.loads((small_root / "realiad_jsons" / "brick.json").read_text())
    samples = sorted({"_".join(Path(e["image_path"]).stem.split("_")[:3]) for e in spec["test"]})
    keep = [s for s in samples if s.endswith("_OK")][:2] + [
        s for s in samples if s.endswith("_NG")
    ][:2]
    assert len(keep) == 4
    folder = tmp_path / "new_parts"
    for entry in spec["test"]:
        stem = Path(entry["image_path"]).stem  # brick_0009_OK_C3_<stamp>
        sample, view = "_".join(stem.split("_")[:3]), stem.split("_")[3]
        if sample in keep:
            (folder / sample).mkdir(parents=True, exist_ok=True)
            shutil.copy(small_root / "realiad_128" / "brick" / entry["image_path"],
                        folder / sample / f"{view}.jpg")  # fmt: skip
    complete = sorted(p.name for p in folder.iterdir())
    assert complete == sorted(keep) and all(len(list((folder / s).iterdir())) == 5 for s in keep)

    run_dir = fitted["metrics_path"].parent
    out = tmp_path / "predictions"
    proc = run_script(
        "vsad-predict", "--config", str(DEMO_CONFIG), "--data.root", str(small_root),
        "--data.category", "brick", "--data.predict_root", str(folder),
        "--trainer.default_root_dir", str(tmp_path / "runs"), *SYSTEM,
        "--ckpt_path", str(run_dir / "checkpoints" / "final.ckpt"), "--output.dir", str(out),
    )  # fmt: skip
    assert proc.stdout.strip().splitlines()[-1] == f"scores: {out / 'scores.csv'}"
    predicted = _read_scores(out / "scores.csv")
    assert sorted({sample for sample, _ in predicted}) == complete
    assert len(predicted) == 5 * len(complete)
    assert sorted(p.stem for p in (out / "maps").glob("*.png")) == complete
    # vsad-test of the same checkpoint scored the same samples: the same decisions and, view by
    # view, the same scores to 1e-3 of their size (vsad-predict scores through VSADInferencer,
    # in its own batches and threads: float32 sums in another order move a calibrated score by
    # up to 9e-5 of 1.08, measured between OMP_NUM_THREADS=1 and 2 on the same checkpoint, so
    # the bound is ten times that noise, not more). The files hold 6
    # significant digits, so a value's rounding adds up to one unit of its 6th digit.
    reference = _read_scores(tested.parent / "scores.csv")
    for key, row in predicted.items():
        for column in ("view_decision", "sample_decision"):
            assert row[column] == reference[key][column], (key, column, row, reference[key])
        for column in ("view_score", "sample_score"):
            ours, theirs = float(row[column]), float(reference[key][column])
            rounding = 10 ** (math.floor(math.log10(max(abs(theirs), 1e-12))) - 5)
            tolerance = 1e-3 * max(1.0, abs(theirs)) + rounding
            assert abs(ours - theirs) <= tolerance, (key, column, row, reference[key])
        assert float(row["sample_score"]) >= float(row["view_score"])
    # And the anomalous samples score above the normal ones.
    sample_score = {s: float(predicted[s, "C1"]["sample_score"]) for s in keep}
    assert min(sample_score[s] for s in keep[2:]) > max(sample_score[s] for s in keep[:2]), (
        sample_score
    )


@pytest.mark.slow
def test_report_aggregates_runs_into_one_table(fitted, tmp_path):
    proc = run_script("vsad-report", str(fitted["runs"]), "--out", str(tmp_path))
    assert "| brick" in proc.stdout and "| mean" in proc.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["category"] for r in report["rows"]] == ["brick"]
    metrics = json.loads(fitted["metrics_path"].read_text())
    assert report["mean"]["pixel_auroc"] == pytest.approx(metrics["pixel_auroc"])
    assert (tmp_path / "report.csv").read_text().splitlines()[0].startswith("category,")


@pytest.mark.slow
def test_pictures_show_chosen_samples_curves_and_histograms(fitted):
    import cv2

    run_dir = fitted["metrics_path"].parent
    index = json.loads((run_dir / "images" / "index.json").read_text())
    kinds = [p["kind"] for p in index["pictures"]]
    # 8 test samples, 4 anomalous, --pictures.num_samples 2: two of each kind that exists.
    assert kinds.count("false_alarm") == 2 and kinds.count("miss") == 2, kinds
    assert "curves" in kinds and "histograms" in kinds
    normals = [p for p in index["pictures"] if p["kind"] == "false_alarm"]
    assert all(p["sample_truth"] == 0 for p in normals)
    assert normals[0]["sample_score"] >= normals[1]["sample_score"]
    assert index["colour_scale"]["vmax"] > index["colour_scale"]["vmin"]
    for p in index["pictures"]:
        picture = cv2.imread(str(run_dir / "images" / p["file"]))
        assert picture is not None, p
        if p["kind"] in ("false_alarm", "miss", "detection"):
            assert picture.shape[1] >= 5 * 192, picture.shape  # five views, each >= 192 px
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()["images"]
    assert {"test/curves", "test/histograms"} <= set(tags), tags
    assert any(tag.startswith("test/maps/false_alarm/") for tag in tags), tags


def _chromium() -> str | None:
    import shutil

    return next(
        (shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None
    )


@pytest.mark.slow
def test_report_page_renders_in_headless_chromium(fitted, tmp_path):
    """The page in a real browser: table, every image loaded, every link to an existing file.

    The screenshot is a test artefact: ``$VSAD_TEST_ARTEFACTS`` (default ``test-artefacts/``
    in the repository) ``/report.png``. ``.ci/run`` installs Debian's ``chromium``.
    """
    import html.parser
    import shutil

    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium on PATH (apt-get install chromium; .ci/run installs it)")
    run_script("vsad-report", str(fitted["runs"]), "--out", str(tmp_path))
    page = tmp_path / "report.html"
    assert page.is_file()
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run(
        [*flags, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip

    class Page(html.parser.HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.images, self.links, self.cells = {}, [], [], []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "body":
                self.body = attrs
            elif tag == "img":
                self.images.append(attrs.get("src", ""))
            elif tag == "a":
                self.links.append(attrs.get("href", ""))

        def handle_data(self, data):
            if data.strip():
                self.cells.append(data.strip())

    parsed = Page()
    parsed.feed(dom)
    # The page's own script ran after "load" and found every image decoded.
    assert parsed.body.get("data-broken-images") == "0", parsed.body
    assert int(parsed.body.get("data-images", 0)) == len(parsed.images) >= 3, parsed.body
    assert all(src.startswith("data:image/png;base64,") for src in parsed.images)
    assert "brick" in parsed.cells and "mean" in parsed.cells
    files = [href for href in parsed.links if not href.startswith("#")]
    assert files and all((tmp_path / href).is_file() for href in files), files

    shot = tmp_path / "report.png"
    subprocess.run(
        [*flags, "--window-size=1300,1800", f"--screenshot={shot}", page.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    import cv2

    picture = cv2.imread(str(shot))
    assert picture is not None and picture.shape[:2] == (1800, 1300)
    assert picture.std() > 10  # not a blank page
    artefacts = Path(os.environ.get("VSAD_TEST_ARTEFACTS", REPO / "test-artefacts"))
    artefacts.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, artefacts / "report.png")


@pytest.mark.slow
def test_fit_log_shows_progress_and_no_noise(fitted):
    """The fit's stderr (a pipe, as in a SLURM log): plain progress lines for each phase, and
    none of the library messages a user cannot act on (``vsad_lightning/utils/quiet.py``)."""
    err = fitted["stderr"]
    for line in (
        "[progress] epoch 1/2: started (6 batches)",
        "[progress] epoch 2/2: done, 6 batches in ",
        "[progress] memory bank: features of the training normals: done",
        "[progress] test: done, 2 batches in ",
    ):
        assert line in err, (line, err[-3000:])
    assert "\r" not in err  # no carriage-return bars in a log
    for noise in (
        "module(s) in eval mode",
        "transfer_batch_to_device",
        "Tip:",
        "LeafSpec",
        "dirpath has changed",
        "Total length of",
        "weights_only",
        "memory bank level 1:",
    ):
        assert noise not in err, (noise, err[-3000:])
    assert "memory bank level -1 (decoder up block" in err  # named as model.feature_levels
