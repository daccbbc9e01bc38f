"""Test metrics under DDP: two gloo processes give one process's ``metrics.json``.

Lightning's default sampler under DDP pads the last shard with a repeated sample, which the
metrics would count twice; ``data.datamodule.ShardSampler`` shards without padding. The test
split here has an odd number of samples and the evaluation batch size leaves the ranks with
different numbers of batches, the two cases padding and per-step collectives would break.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import socket
from pathlib import Path

import pytest

from vsad_lightning.data.datamodule import ShardSampler

# lr = 0: the weights stay the seeded initial ones, so one and two processes build the same
# bank and calibration (tests/test_system.py checks the banks) and score the same test set.
FROZEN = ["--model.lr", "0.0", "--model.weight_decay", "0.0", "--model.warmup_steps", "0",
          "--data.eval_batch_size", "3"]  # fmt: skip


def test_shard_sampler_covers_every_index_once_without_padding() -> None:
    data = list(range(7))
    shards = [list(ShardSampler(data, 3, rank)) for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(ShardSampler(data, 3, rank)) for rank in range(3)] == [3, 2, 2]
    assert list(ShardSampler(data)) == data


def _odd_test_split(root: Path) -> int:
    """Drop the last test sample of the split JSON; return how many test samples remain."""
    (spec_path,) = (root / "realiad_jsons").glob("*.json")
    spec = json.loads(spec_path.read_text())
    samples = sorted({Path(entry["image_path"]).parent.as_posix() for entry in spec["test"]})
    spec["test"] = [
        e for e in spec["test"] if Path(e["image_path"]).parent.as_posix() != samples[-1]
    ]
    spec_path.write_text(json.dumps(spec))
    return len(samples) - 1


def _run_ddp_safe(console_script, name: str, *args: str, devices: int, last: str = "metrics: "):
    """Run a console script; under DDP with a ``MASTER_PORT`` the OS just gave out, and once
    more with another if the rendezvous lost that port to another process meanwhile."""
    extra = ["--trainer.devices", str(devices), "--trainer.strategy"]
    extra.append("ddp" if devices > 1 else "auto")
    for _ in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        proc = console_script(name, *args, *extra, env=env)
        if proc.returncode == 0 or "EADDRINUSE" not in proc.stdout + proc.stderr:
            break
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return Path(proc.stdout.strip().splitlines()[-1].removeprefix(last))


def _numbers(path: Path) -> dict[str, float]:
    found = json.loads(path.read_text())
    return {k: float(v) for k, v in found.items() if isinstance(v, (int, float))}


def _scores(run: Path) -> list[list[str]]:
    with open(run / "scores.csv", newline="") as f:
        return list(csv.reader(f))


@pytest.mark.slow
def test_two_process_fit_and_test_give_one_process_metrics(
    synthetic_root_cached, copy_dataset, console_script, tiny_fit_args, tmp_path
):
    root = copy_dataset(synthetic_root_cached, tmp_path / "root")
    n_test = _odd_test_split(root)
    assert n_test % 2 == 1
    common = [*tiny_fit_args, *FROZEN, "--data.root", str(root), "--data.category", "brick"]
    one = _run_ddp_safe(
        console_script, "vsad-fit", *common, "--trainer.default_root_dir", str(tmp_path / "fit1"),
        devices=1,
    )  # fmt: skip
    two = _run_ddp_safe(
        console_script, "vsad-fit", *common, "--trainer.default_root_dir", str(tmp_path / "fit2"),
        devices=2,
    )  # fmt: skip
    tested = _run_ddp_safe(
        console_script, "vsad-test", *common, "--trainer.default_root_dir", str(tmp_path / "test2"),
        "--ckpt_path", str(one.parent / "checkpoints" / "final.ckpt"), devices=2,
    )  # fmt: skip
    reference = _numbers(one)
    assert reference["n_samples"] == n_test and reference["n_views"] == 5 * n_test, reference
    for label, path in (("vsad-fit", two), ("vsad-test", tested)):
        got = _numbers(path)
        assert got.keys() == reference.keys(), label
        for key, value in reference.items():
            same = math.isnan(value) and math.isnan(got[key])
            assert same or got[key] == pytest.approx(value, rel=0, abs=1e-6), (label, key)
        # Every sample scored once, by one rank or the other.
        assert len(_scores(path.parent)) == 1 + 5 * n_test, label

    # vsad-predict on 2 processes: 3 samples, every one mapped and in scores.csv once.
    folder = tmp_path / "new_parts"
    for sample in sorted((root / "realiad_64" / "brick" / "OK").iterdir())[:3]:
        (folder / sample.name).mkdir(parents=True)
        for image in sample.glob("*.jpg"):  # brick_0001_OK_C3_<stamp>.jpg -> C3.jpg
            shutil.copy(image, folder / sample.name / f"{image.stem.split('_')[3]}.jpg")
    out = tmp_path / "predictions"
    _run_ddp_safe(
        console_script, "vsad-predict", *common, "--trainer.default_root_dir", str(tmp_path / "p2"),
        "--ckpt_path", str(one.parent / "checkpoints" / "final.ckpt"),
        "--data.predict_root", str(folder), "--output.dir", str(out), devices=2, last="scores: ",
    )  # fmt: skip
    rows = _scores(out)[1:]
    samples = sorted(sample.name for sample in folder.iterdir())
    assert [row[:2] for row in rows] == [[s, f"C{v}"] for s in samples for v in range(1, 6)]
    assert sorted(p.stem for p in (out / "maps").glob("*.png")) == samples


def test_fewer_samples_than_processes_is_refused_in_one_line(synthetic_root_cached):
    """A process without a test sample would leave the others waiting for its metric states."""
    from types import SimpleNamespace

    from vsad_lightning.data.datamodule import MultiViewDataModule
    from vsad_lightning.errors import DataError

    data = MultiViewDataModule(str(synthetic_root_cached), "brick", resolution=64, image_size=64)
    data.setup("test")
    data.trainer = SimpleNamespace(world_size=len(data.test_set) + 1, global_rank=0)
    with pytest.raises(DataError, match="8 samples to score on 9 processes"):
        data.test_dataloader()
