"""A model users can deploy: plain ``Trainer.fit``, then scoring with the checkpoint alone.

One tiny fit (64 px, one epoch of 2 steps) with a plain ``Trainer.fit(VSADModule(...), dm)``
(no CLI, no explicit bank callback) is shared by every test here. ``vsad test`` scores the
test split from its ``final.ckpt``; then, with the training data folder renamed away, a fresh
process scores copies of test samples from the checkpoint, from an exported bundle, and with
``vsad predict``, and must give ``vsad test``'s numbers.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from vsad_lightning.cli.main import main as vsad_main
from vsad_lightning.data.datamodule import MultiViewDataModule
from vsad_lightning.system.module import VSADModule

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow  # one tiny fit, vsad test and one scoring process

SAMPLES = ("brick_0009_OK", "brick_0013_NG")  # a normal and an anomalous test sample


def _demo_model_args() -> dict:
    """The demo's model at 64 px, its U-Net at half the views' size as in the demo (32 here):
    checkpoint, bundle and exported graph must all carry ``unet_image_size``."""
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    return {**config["model"], "image_size": 64, "unet_image_size": 32, "inversion_steps": 2}


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=_env(), cwd=cwd)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _scores(path: Path) -> dict[tuple[str, str], dict]:
    return {(r["sample_id"], r["view"]): r for r in csv.DictReader(path.open())}


@pytest.fixture(scope="module")
def deployed(synthetic_root_cached, copy_dataset, tiny_fit_args, tmp_path_factory):
    work = tmp_path_factory.mktemp("deploy")
    root = copy_dataset(synthetic_root_cached, work / "data")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        L.seed_everything(0, verbose=False)
        data = MultiViewDataModule(
            str(root), "brick", resolution=64, image_size=64, batch_size=4, eval_batch_size=4
        )
        trainer = L.Trainer(
            accelerator="cpu", max_epochs=1, logger=False, default_root_dir=str(work / "fit"),
            enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(VSADModule(**_demo_model_args()), datamodule=data)
    finally:
        torch.set_num_threads(threads)
    final = work / "fit" / "checkpoints" / "final.ckpt"
    assert final.is_file(), "a plain Trainer.fit must build the bank and write final.ckpt"

    # A config that describes another model than the checkpoint's is refused, by name.
    wrong = subprocess.run(
        [str(BIN / "vsad"), "test", *tiny_fit_args, "--model.window", "5",
         "--data.root", str(root), "--data.category", "brick",
         "--trainer.default_root_dir", str(work / "wrong"), "--ckpt_path", str(final)],
        capture_output=True, text=True, timeout=600, env=_env(),
    )  # fmt: skip
    assert wrong.returncode == 2, wrong.stderr[-2000:]
    line = wrong.stderr.strip().splitlines()[-1]
    assert "was fitted with another model than the config describes" in line, line
    assert "model.unet_image_size 64 (checkpoint: 32)" in line, line
    assert "model.window 5 (checkpoint: 3)" in line, line
    assert not list((work / "wrong").rglob("version_*"))  # nothing left behind
    test = _run(
        [str(BIN / "vsad"), "test", *tiny_fit_args, "--model.unet_image_size", "32",
         "--data.root", str(root),
         "--data.category", "brick", "--trainer.default_root_dir", str(work / "test"),
         "--ckpt_path", str(final)],
    )  # fmt: skip
    metrics = Path(test.stdout.strip().splitlines()[-1].removeprefix("metrics: "))
    expected = _scores(metrics.parent / "scores.csv")

    # New samples: copies of two test samples in the folder layout, outside the dataset.
    new = work / "elsewhere" / "new_parts"
    for key, row in expected.items():
        if key[0] in SAMPLES:
            (new / key[0]).mkdir(parents=True, exist_ok=True)
            shutil.copy(row["image_path"], new / key[0] / f"{key[1]}.jpg")
    ckpt = work / "elsewhere" / "final.ckpt"
    shutil.copy(final, ckpt)
    hidden = root.with_name("data_hidden")
    root.rename(hidden)  # from here on, no process can read the training data
    yield {"ckpt": ckpt, "new": new, "expected": expected, "elsewhere": work / "elsewhere"}
    hidden.rename(root)


SCRIPT = """
import json, sys
import torch
from vsad_lightning import VSADInferencer
from vsad_lightning.inference.export import export_bundle, ScoringGraph

ckpt, new, bundle = sys.argv[1:4]
out = {}
inferencer = VSADInferencer.from_checkpoint(ckpt)
out["ckpt"] = {r.sample_id: [r.view_scores.tolist(), r.sample_score, r.decision,
               r.view_decisions] for r in inferencer.predict_folder(new)}
export_bundle(inferencer.model, bundle)
bundled = VSADInferencer.from_bundle(bundle)
out["bundle"] = {r.sample_id: [r.view_scores.tolist(), r.sample_score, r.decision,
                 r.view_decisions] for r in bundled.predict_folder(new, batch_size=2)}
# The compiled scoring graph (torch.export) against eager, on one sample's features.
batch = inferencer.collate([inferencer.make_sample(
    {v: f"{new}/brick_0013_NG/{v}.jpg" for v in inferencer.view_names})])
model = inferencer.model
features = model.extract_features(batch.images, batch.homographies, model.rig.neighbour_mask)
eager = model.score_extracted(features, batch.image_size, batch.homographies,
                              model.rig.neighbour_mask)
graph = ScoringGraph.export(model, features, batch.homographies)
compiled = graph(features, batch.homographies)
out["compiled_error"] = max(
    float((compiled[0] - eager.normalised_maps).abs().max()),
    float((compiled[1] - eager.view_scores).abs().max()),
    float((compiled[2] - eager.sample_scores).abs().max()))
out["compiled_labels_equal"] = bool(torch.equal(compiled[3], eager.pred_view_labels))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def scored(deployed):
    """One fresh process: checkpoint, bundle and compiled graph, without the training data."""
    elsewhere = deployed["elsewhere"]
    proc = _run(
        [sys.executable, "-c", SCRIPT, str(deployed["ckpt"]), str(deployed["new"]),
         str(elsewhere / "bundle")],
        cwd=elsewhere,
    )  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_matches_vsad_test(found: dict, expected: dict) -> None:
    assert sorted(found) == sorted(SAMPLES)
    for sample, (view_scores, sample_score, decision, view_decisions) in found.items():
        views = [v for (s, v) in expected if s == sample]
        for v, score in zip(views, view_scores, strict=True):
            row = expected[sample, v]
            # scores.csv holds 6 significant digits
            assert score == pytest.approx(float(row["view_score"]), rel=1e-5, abs=1e-5)
            assert view_decisions[v] == row["view_decision"]
        row = expected[sample, views[0]]
        assert sample_score == pytest.approx(float(row["sample_score"]), rel=1e-5, abs=1e-5)
        assert decision == row["sample_decision"] in ("OK", "NG")


def test_checkpoint_alone_scores_as_vsad_test(deployed, scored):
    _assert_matches_vsad_test(scored["ckpt"], deployed["expected"])


def test_bundle_round_trips_to_the_same_scores(deployed, scored):
    _assert_matches_vsad_test(scored["bundle"], deployed["expected"])
    for sample, (view_scores, sample_score, *_) in scored["ckpt"].items():
        again = scored["bundle"][sample]
        assert torch.allclose(torch.tensor(view_scores), torch.tensor(again[0]), atol=1e-5)
        assert abs(sample_score - again[1]) <= 1e-5


def test_compiled_scoring_graph_matches_eager(scored):
    assert scored["compiled_error"] <= 1e-4
    assert scored["compiled_labels_equal"]


def test_vsad_predict_needs_only_the_checkpoint_and_writes_only_its_output(
    deployed, monkeypatch, capsys
):
    # In this process (the training data is renamed away; a subprocess would only add the
    # import time): the `vsad` entry point itself, run from the samples' folder.
    elsewhere = deployed["elsewhere"]
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # vsad names the subcommand in argv
    before = sorted(p for p in elsewhere.rglob("*") if "out" not in p.relative_to(elsewhere).parts)
    out = elsewhere / "out"
    code = vsad_main(
        ["predict", "--ckpt_path", str(deployed["ckpt"]),
         "--data.predict_root", str(deployed["new"]), "--output.dir", str(out)]
    )  # fmt: skip
    assert code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"scores: {out / 'scores.csv'}"
    after = sorted(p for p in elsewhere.rglob("*") if "out" not in p.relative_to(elsewhere).parts)
    assert after == before, "vsad predict wrote outside its output folder"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        *(f"maps/{s}.png" for s in sorted(SAMPLES)),
        "scores.csv",
    ]
    rows = _scores(out / "scores.csv")
    expected = deployed["expected"]
    assert sorted(rows) == sorted(k for k in expected if k[0] in SAMPLES)
    for key, row in rows.items():
        for column in ("view_score", "sample_score"):
            assert float(row[column]) == pytest.approx(
                float(expected[key][column]), rel=1e-5, abs=1e-5
            )
        assert row["view_decision"] == expected[key]["view_decision"]
        assert row["sample_decision"] == expected[key]["sample_decision"]


def test_vsad_export_writes_a_bundle_without_pickles(deployed, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # vsad names the subcommand in argv
    code = vsad_main(
        ["export", "--ckpt_path", str(deployed["ckpt"]), "--out", str(tmp_path / "bundle")]
    )
    assert code == 0
    assert capsys.readouterr().out.strip() == f"bundle: {tmp_path / 'bundle'}"
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    config = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert config["rig"]["view_names"] == ["C1", "C2", "C3", "C4", "C5"]
    assert config["hyperparameters"]["calibration"] == "position"


def test_final_checkpoint_is_deployable_and_weights_only(deployed):
    checkpoint = torch.load(deployed["ckpt"], map_location="cpu", weights_only=True)
    assert "optimizer_states" not in checkpoint and "lr_schedulers" not in checkpoint
    state = checkpoint["state_dict"]
    for part in ("model.rig.homographies", "model.rig.neighbour_mask", "model.rig._extra_state",
                 "model.calibration.view_threshold", "model.memory_bank.bank_-1"):  # fmt: skip
        assert part in state, part


def test_readme_python_api_runs_as_written(deployed, monkeypatch, capsys):
    text = (REPO / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    elsewhere = deployed["elsewhere"]
    # The names the snippet uses: final.ckpt and new_parts/part_01/ in the working directory.
    parts = elsewhere / "readme" / "new_parts"
    shutil.copytree(deployed["new"] / SAMPLES[1], parts / "part_01")
    shutil.copytree(deployed["new"] / SAMPLES[0], parts / "part_02")
    shutil.copy(deployed["ckpt"], elsewhere / "readme" / "final.ckpt")
    monkeypatch.chdir(elsewhere / "readme")
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["part_01", "part_02"]
    assert lines[1].split()[2] in ("OK", "NG")
