"""Faults and reproducibility: resume after a crash or ``kill -9``, NaN/inf
losses, an unwritable run folder, atomic writes, identical results from identical runs.

The in-process tests drive a real ``Trainer`` on the session's synthetic set; the end-to-end
ones run the real ``vsad-fit`` console script (helpers shared with ``test_system``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_system import DEMO_CONFIG, SMALL, run_script

from vsad_lightning.cli import _runfolder
from vsad_lightning.cli.run import (
    RunCheckpoint,
    _checkpoint_info,
    find_resume_checkpoint,
    fit_main,
)
from vsad_lightning.data.datamodule import MultiViewDataModule, ResumableShuffleSampler
from vsad_lightning.data.dataset import cache_path_for
from vsad_lightning.errors import DataError
from vsad_lightning.geometry.cache import HomographyCache
from vsad_lightning.metrics.export import REQUIRED_KEYS, write_metrics
from vsad_lightning.system.module import NonFiniteLossError, VSADModule
from vsad_lightning.utils.checkpoint_io import AtomicCheckpointIO
from vsad_lightning.utils.io import write_image

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------ in-process helpers
def small_module(**overrides) -> VSADModule:
    L.seed_everything(0, verbose=False)
    args = dict(
        image_size=64,
        attention_dim=16,
        num_heads=2,
        lr=5e-4,
        warmup_steps=2,
        lr_schedule="cosine",
        inversion_steps=1,
        knn_backend="torch",
    )
    return VSADModule(**{**args, **overrides})


def small_data(root: Path) -> MultiViewDataModule:
    # 8 training normals, batch 3: 3 batches per epoch, the last one partial.
    return MultiViewDataModule(
        str(root), "brick", resolution=64, image_size=64, batch_size=3, seed=0
    )


def trainer(root_dir: Path, max_epochs: int, callbacks=(), **kwargs) -> L.Trainer:
    options = dict(
        default_root_dir=root_dir,
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[RunCheckpoint(every_n_steps=1, dirpath=root_dir / "ckpt"), *callbacks],
    )
    return L.Trainer(**{**options, **kwargs})


class CrashBefore(L.Callback):
    """Raise before the batch that would make global step ``step + 1``: the newest checkpoint
    then holds step ``step``, as after a ``kill -9`` at that moment."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


class PoisonBatches(L.Callback):
    """Set every image of the batches at the given global steps to ``value`` (NaN or inf),
    the way a corrupt decode or an overflow upstream would reach the model."""

    def __init__(self, steps, value: float = float("nan")) -> None:
        self.steps = set(steps)
        self.value = value
        self.seen_ids: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen_ids.append(list(batch.sample_ids))
        if trainer.global_step in self.steps:
            batch.images.fill_(self.value)


def weights(module: VSADModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.unet.state_dict().items()}


@pytest.fixture(scope="module")
def uninterrupted(synthetic_root_cached, tmp_path_factory, one_torch_thread) -> dict:
    """Two epochs (6 optimiser steps) without interruption; the batches each step saw."""
    root = tmp_path_factory.mktemp("uninterrupted")
    module, spy = small_module(), PoisonBatches(steps=())
    t = trainer(root, max_epochs=2, callbacks=[spy])
    t.fit(module, datamodule=small_data(synthetic_root_cached))
    return {"steps": t.global_step, "weights": weights(module), "batches": spy.seen_ids}


# ------------------------------------------------------------------------ determinism, resume
def test_sampler_order_depends_only_on_seed_epoch_and_rank():
    data = list(range(10))
    a = ResumableShuffleSampler(data, seed=3, epoch=1)
    b = ResumableShuffleSampler(data, seed=3)
    list(b)  # history must not matter
    b.set_epoch(1)
    assert list(a) == list(b) and sorted(a) == data
    b.set_epoch(2)
    assert list(b) != list(a)  # a new order every epoch
    shards = [list(ResumableShuffleSampler(data, 2, r, seed=3, epoch=1)) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == data and shards[0] == list(a)[0::2]
    a.skip_batches(2, batch_size=3)
    assert list(a) == list(b.__class__(data, seed=3, epoch=1))[6:]
    assert len(list(a)) == 10 and len(a) == 10  # the skip applies to one pass only


@pytest.mark.slow
@pytest.mark.parametrize("crash_at", [2, 3, 4], ids=["mid-epoch", "epoch-end", "2nd-epoch"])
def test_resume_after_crash_trains_exactly_like_an_uninterrupted_run(
    crash_at, uninterrupted, synthetic_root_cached, tmp_path, one_torch_thread
):
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer(tmp_path, max_epochs=2, callbacks=[CrashBefore(crash_at)]).fit(
            small_module(), datamodule=small_data(synthetic_root_cached)
        )
    last = tmp_path / "ckpt" / "last.ckpt"
    assert _checkpoint_info(last)[0] == crash_at

    # A fresh process would rebuild everything from the config: new objects, other RNG state.
    torch.manual_seed(12345)
    module, spy = small_module(), PoisonBatches(steps=())
    t = trainer(tmp_path, max_epochs=2, callbacks=[spy])
    t.fit(module, datamodule=small_data(synthetic_root_cached), ckpt_path=str(last))
    assert t.global_step == uninterrupted["steps"] == 6
    # The resumed part saw exactly the batches the uninterrupted run saw at those steps...
    assert spy.seen_ids == uninterrupted["batches"][crash_at:]
    # ...with the same noise, so the weights are bit-identical.
    for key, value in uninterrupted["weights"].items():
        assert torch.equal(module.unet.state_dict()[key], value), key


# ------------------------------------------------------------------------ NaN / inf losses
@pytest.mark.slow
def test_non_finite_loss_skips_the_step_logs_and_warns(synthetic_root_cached, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    module, poison = small_module(), PoisonBatches(steps={1, 2})
    poison_inf = PoisonBatches(steps={4}, value=float("inf"))
    logger = TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False)
    t = trainer(
        tmp_path, 2, [poison, poison_inf], logger=logger, log_every_n_steps=1
    )  # every step's scalars reach the event file
    with pytest.warns(UserWarning, match=r"non-finite loss \(nan\) at epoch 0, step 1"):
        t.fit(module, datamodule=small_data(synthetic_root_cached))
    assert module.skipped_steps == 3 and module.bad_steps_in_a_row == 0
    # Skipped steps never reached AdamW: its per-parameter step count is 6 - 3.
    optimizer = t.optimizers[0]
    counts = {int(optimizer.state[p]["step"]) for p in module.unet.trainable_parameters()}
    assert counts == {t.global_step - 3}
    assert all(torch.isfinite(p).all() for p in module.parameters())
    acc = EventAccumulator(str(Path(logger.log_dir)), size_guidance={"scalars": 0})
    acc.Reload()
    skipped = [e.value for e in acc.Scalars("train/skipped_steps")]
    assert skipped[-1] == 3.0 and skipped[0] == 0.0
    assert all(torch.isfinite(torch.tensor([e.value for e in acc.Scalars("train/loss")])))


@pytest.mark.slow
def test_consecutive_non_finite_losses_stop_training(synthetic_root_cached, tmp_path):
    module = small_module(max_bad_steps=3)
    t = trainer(tmp_path, max_epochs=3, callbacks=[PoisonBatches(steps=range(2, 100))])
    with (
        pytest.raises(NonFiniteLossError, match="not finite .* for 3 consecutive steps"),
        pytest.warns(UserWarning, match="non-finite loss"),
    ):
        t.fit(module, datamodule=small_data(synthetic_root_cached))
    assert module.skipped_steps == 3


@pytest.mark.slow
def test_vsad_fit_reports_a_diverging_run_in_one_line(synthetic_root_cached, tmp_path):
    # A real config that diverges: AdamW moves every weight by ~lr on the first step.
    proc = subprocess.run(
        [str(BIN / "vsad-fit"), "--config", str(DEMO_CONFIG),
         "--data.root", str(synthetic_root_cached), "--data.category", "brick",
         "--trainer.default_root_dir", str(tmp_path), *SMALL,
         "--model.lr", "1e30", "--model.warmup_steps", "0", "--model.lr_schedule", "constant",
         "--model.max_bad_steps", "2", "--trainer.max_epochs", "5"],
        capture_output=True, text=True, timeout=600, env=ENV,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: training stopped: the loss was not finite"), lines[-5:]
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("metrics.json"))


# ------------------------------------------------------------------------ unwritable folder
def test_unwritable_run_folder_is_reported_before_training(synthetic_root_cached, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    args = ["--config", str(DEMO_CONFIG), "--data.root", str(synthetic_root_cached),
            "--data.category", "brick", "--trainer.default_root_dir", str(blocker / "runs"),
            *SMALL]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        fit_main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: run folder {blocker / 'runs'} is not writable"), err


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_run_folder_is_reported_before_training(synthetic_root_cached, tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o500)
    try:
        with pytest.raises(SystemExit) as exit_info:
            fit_main(["--config", str(DEMO_CONFIG), "--data.root", str(synthetic_root_cached),
                      "--data.category", "brick", "--trainer.default_root_dir", str(runs),
                      *SMALL])  # fmt: skip
    finally:
        runs.chmod(0o700)
    assert exit_info.value.code == 2
    assert "is not writable" in capsys.readouterr().err
    assert not list(runs.iterdir())


# ------------------------------------------------------------------------ atomic writes
def _fail_at_fsync(monkeypatch):
    """Make the next atomic write die after its bytes went to the temporary file."""

    def boom(fd):
        raise OSError("simulated crash during write")

    monkeypatch.setattr("vsad_lightning.utils.io.os.fsync", boom)


def test_interrupted_cache_write_leaves_the_previous_cache(
    synthetic_root_cached, tmp_path, monkeypatch
):
    src = cache_path_for(synthetic_root_cached, "brick", 64)
    path = tmp_path / src.name
    shutil.copy(src, path)
    before = path.read_bytes()
    cache = HomographyCache.load(path)
    _fail_at_fsync(monkeypatch)
    with pytest.raises(DataError, match=rf"could not write homography cache .*{path.name} .simul"):
        cache.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left


def test_interrupted_metrics_write_leaves_the_previous_files(tmp_path, monkeypatch):
    results = {key: 0.5 for key in REQUIRED_KEYS}
    write_metrics(tmp_path, results, "brick")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"metrics.json", "metrics.csv"}
    _fail_at_fsync(monkeypatch)
    with pytest.raises(DataError, match="simulated crash"):
        write_metrics(tmp_path, {**results, "pixel_auroc": 0.9}, "brick")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_kill_during_atomic_writes_never_leaves_a_torn_file(tmp_path):
    # A writer rewriting a 2 MB JSON in a loop, killed at an arbitrary moment.
    path = tmp_path / "metrics.json"
    code = (
        "import sys, itertools\n"
        "from vsad_lightning.utils.io import atomic_write_json\n"
        "for i in itertools.count():\n"
        "    atomic_write_json(sys.argv[1], {'i': i, 'pad': 'x' * 2_000_000})\n"
        "    print(i, flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True, env=ENV
    )
    try:
        for _ in range(3):  # let a few complete writes happen
            proc.stdout.readline()
        time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    data = json.loads(path.read_text())
    assert data["i"] >= 2 and len(data["pad"]) == 2_000_000


# ------------------------------------------------------------------------ the console script
def _fit_cmd(root: Path, runs: Path) -> list[str]:
    return [
        str(BIN / "vsad-fit"), "--config", str(DEMO_CONFIG), "--data.root", str(root),
        "--data.category", "brick", "--trainer.default_root_dir", str(runs), *SMALL,
        "--data.batch_size", "2", "--trainer.max_epochs", "3",
        "--checkpoint_every_n_steps", "1",
    ]  # fmt: skip


def _metrics(stdout: str) -> Path:
    return Path(stdout.strip().splitlines()[-1].removeprefix("metrics: "))


@pytest.fixture(scope="module")
def fresh_fit(synthetic_root_cached, tmp_path_factory) -> dict:
    runs = tmp_path_factory.mktemp("fresh")
    proc = run_script("vsad-fit", *_fit_cmd(synthetic_root_cached, runs)[1:])
    path = _metrics(proc.stdout)
    return {"metrics": json.loads(path.read_text()), "path": path, "runs": runs}


@pytest.mark.slow
def test_same_seed_and_config_give_identical_metrics(fresh_fit, synthetic_root_cached, tmp_path):
    proc = run_script("vsad-fit", *_fit_cmd(synthetic_root_cached, tmp_path)[1:])
    assert json.loads(_metrics(proc.stdout).read_text()) == fresh_fit["metrics"]


@pytest.mark.slow
def test_kill_9_then_same_command_resumes_and_finishes_identically(
    fresh_fit, synthetic_root_cached, tmp_path
):
    cmd = _fit_cmd(synthetic_root_cached, tmp_path)
    last = tmp_path / "realiad" / "brick" / "version_0" / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    killed_at = None
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if last.is_file():
                try:
                    killed_at = _checkpoint_info(last)[0]
                except Exception:  # noqa: BLE001 - caught mid-write; look again
                    killed_at = None
                if killed_at and killed_at >= 2:
                    break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert killed_at is not None and killed_at >= 2, "never saw a checkpoint before the kill"
    run_dir = last.parent.parent
    assert not (run_dir / "metrics.json").exists(), "the run finished before the kill"

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = [line for line in again.stdout.splitlines() if line.startswith("resuming from ")]
    assert len(resumed) == 1 and Path(resumed[0].removeprefix("resuming from ")).parent == (
        run_dir / "checkpoints"
    ), again.stdout[-2000:]
    assert _metrics(again.stdout) == run_dir / "metrics.json"  # the same version folder
    assert not (tmp_path / "realiad" / "brick" / "version_1").exists()
    # The same number of optimiser steps and the same numbers as the uninterrupted run.
    final_step = _checkpoint_info(run_dir / "checkpoints" / "final.ckpt")[0]
    fresh_step = _checkpoint_info(fresh_fit["path"].parent / "checkpoints" / "final.ckpt")[0]
    assert final_step == fresh_step == 12
    assert json.loads((run_dir / "metrics.json").read_text()) == fresh_fit["metrics"]

    # A finished newest run is never resumed: the third call starts version_1.
    third = run_script("vsad-fit", *cmd[1:], "--trainer.max_epochs", "1")
    assert "resuming from" not in third.stdout
    assert _metrics(third.stdout).parent.name == "version_1"


def test_a_command_run_in_process_does_not_leak_its_run_version(monkeypatch):
    # The demo and the benchmarks call fit_main several times in one process; a leaked
    # VSAD_RUN_VERSION would send a later run into an existing version folder.
    from vsad_lightning.cli.run import RUN_VERSION_ENV, _run_version_scoped

    monkeypatch.delenv(RUN_VERSION_ENV, raising=False)

    @_run_version_scoped
    def command() -> int:
        os.environ[RUN_VERSION_ENV] = "0"
        return 0

    assert command() == 0
    assert RUN_VERSION_ENV not in os.environ
    monkeypatch.setenv(RUN_VERSION_ENV, "7")  # a DDP worker's own value survives
    assert command() == 0 and os.environ[RUN_VERSION_ENV] == "7"


# ------------------------------------------------------------------------ one run, one folder
@pytest.mark.slow
def test_two_runs_started_together_get_two_consistent_folders(
    synthetic_root_cached, tiny_fit_args, tmp_path
):
    runs = tmp_path / "runs"
    cmd = [str(BIN / "vsad-fit"), *tiny_fit_args, "--data.root", str(synthetic_root_cached),
           "--data.category", "brick", "--trainer.default_root_dir", str(runs)]  # fmt: skip
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    folders = sorted(_metrics(out).parent for out, _ in outputs)
    assert [f.name for f in folders] == ["version_0", "version_1"]
    for folder in folders:
        assert (folder / "config.yaml").is_file() and (folder / "metrics.json").is_file()
        # Every checkpoint in the folder was written by this folder's run.
        for ckpt in (folder / "checkpoints").glob("*.ckpt"):
            dirpath = _checkpoint_info(ckpt)[1]
            assert dirpath is None or Path(dirpath).resolve() == (folder / "checkpoints").resolve()
        events = list(folder.glob("events.out.tfevents.*"))
        assert len({e.name.split(".")[4] for e in events}) == 1  # one process (pid) wrote them
    # Same seed, same config: the two runs are the same experiment, so the same numbers.
    metrics = [json.loads((f / "metrics.json").read_text()) for f in folders]
    assert metrics[0] == metrics[1]


def _hold_in_child(folder: Path) -> subprocess.Popen:
    """A live process holding ``folder`` the way a running ``vsad-fit`` does."""
    code = (
        "import sys\n"
        "from vsad_lightning.cli import _runfolder\n"
        "assert _runfolder.hold(sys.argv[1])\n"
        "print('held', flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_live_run_is_never_resumed_by_a_second_one(tmp_path):
    folder = tmp_path / "realiad" / "brick" / "version_0"
    (folder / "checkpoints").mkdir(parents=True)
    ckpt = folder / "checkpoints" / "last.ckpt"
    torch.save({"global_step": 3, "callbacks": {}}, ckpt)
    child = _hold_in_child(folder)
    try:
        assert find_resume_checkpoint(tmp_path, "realiad/brick", claim=True) is None
        # A new run claims the next number instead, atomically.
        assert _runfolder.claim_version(tmp_path / "realiad" / "brick") == 1
        _runfolder.end_command(failed=True, trained=False)  # nothing in it: removed again
        assert not (tmp_path / "realiad" / "brick" / "version_1").exists()
    finally:
        child.communicate("")
    # The holder ended (however it ended): its run can now be resumed.
    assert find_resume_checkpoint(tmp_path, "realiad/brick", claim=True) == (0, ckpt)
    _runfolder.end_command(failed=False, trained=True)


def test_claimed_versions_are_distinct_across_processes(tmp_path):
    code = (
        "import sys, time\n"
        "from vsad_lightning.cli import _runfolder\n"
        "time.sleep(float(sys.argv[2]) - time.time())\n"  # start together
        "print(_runfolder.claim_version(sys.argv[1]))\n"
    )
    start = str(time.time() + 1.5)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path), start],
            stdout=subprocess.PIPE,
            text=True,
            env=ENV,
        )  # fmt: skip
        for _ in range(4)
    ]
    versions = sorted(int(p.communicate(timeout=60)[0]) for p in procs)
    assert versions == [0, 1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"version_{v}" for v in versions]


def test_srun_ranks_follow_rank_zero_or_fail_naming_the_file(tmp_path):
    # The happy path runs in test_slurm (two srun tasks, one folder); here the failures.
    with pytest.raises(DataError, match=r"rank 1 waited 0 s for rank 0 .*\.vsad-step-7\.0\.0"):
        _runfolder.await_choice(tmp_path, "7.0.0", "realiad/brick", rank=1, timeout_s=0.3)
    _runfolder.publish_choice(tmp_path, "7.0.0", "realiad/brick", 3, None)
    assert _runfolder.await_choice(tmp_path, "7.0.0", "realiad/brick", rank=1) == (3, None)
    with pytest.raises(
        DataError, match="rank 2 runs 'realiad/gravel' but rank 0 .* 'realiad/brick'"
    ):
        _runfolder.await_choice(tmp_path, "7.0.0", "realiad/gravel", rank=2)
    _runfolder.end_command(failed=False, trained=True)  # rank 0's command ends: file removed
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ writes that fail
_LIMITED_WRITER = """
import resource, sys
import numpy as np
from vsad_lightning.errors import DataError
from vsad_lightning.utils.io import write_image
from vsad_lightning.utils.checkpoint_io import AtomicCheckpointIO
import torch
folder = sys.argv[1]
noise = np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)  # ~480 KB PNG
io = AtomicCheckpointIO()
io.save_checkpoint({"w": torch.zeros(10)}, folder + "/last.ckpt")  # small: fits
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # `ulimit -f`
for write in (
    lambda: io.save_checkpoint({"w": torch.zeros(100_000)}, folder + "/last.ckpt"),
    lambda: write_image(folder + "/map.png", noise),
):
    try:
        write()
        print("written")
    except DataError as e:
        print("error:", e)
"""


def test_writes_beyond_a_file_size_limit_fail_in_one_line_and_leave_the_old_file(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", _LIMITED_WRITER, str(tmp_path)],
        capture_output=True, text=True, env=ENV, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines == [
        f"error: could not write checkpoint {tmp_path / 'last.ckpt'} (File too large)",
        f"error: could not write picture {tmp_path / 'map.png'} (File too large)",
    ]
    # The previous checkpoint is intact, nothing half-written, no temporary file anywhere.
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["w"].shape == (10,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_checkpoints_are_staged_beside_their_target_not_in_tmpdir(tmp_path, monkeypatch):
    staging = tmp_path / "tmpdir"
    staging.mkdir()
    monkeypatch.setenv("TMPDIR", str(staging))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    seen: list[str] = []
    real_mkstemp = tempfile.mkstemp

    def spy(*args, **kwargs):
        fd, path = real_mkstemp(*args, **kwargs)
        seen.append(path)
        return fd, path

    monkeypatch.setattr(tempfile, "mkstemp", spy)
    target = tmp_path / "run" / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(3)}, target)
    assert [Path(p).parent for p in seen] == [target.parent]
    assert torch.load(target, weights_only=True)["w"].tolist() == [1.0, 1.0, 1.0]
    assert not list(staging.iterdir())


def test_write_image_names_the_file_it_could_not_write(tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    with pytest.raises(DataError, match=r"could not write picture .*blocker/maps/a\.png"):
        write_image(tmp_path / "blocker" / "maps" / "a.png", np.zeros((4, 4, 3), np.uint8))


# ------------------------------------------------------------------------ the user's umask
def _read_as_nobody(path: Path) -> bool:
    """Whether user ``nobody`` can read ``path`` (``setpriv`` switches user; root only)."""
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", str(path)],
        capture_output=True,
    )
    return proc.returncode == 0


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_results_and_caches_follow_the_umask(umask, synthetic_root_cached):
    base = Path(tempfile.mkdtemp(prefix="vsad-umask-"))
    base.chmod(0o755)  # enterable by everyone, so only the files' own modes decide
    previous = os.umask(umask)
    try:
        write_metrics(base, {key: 0.5 for key in REQUIRED_KEYS}, "brick")
        HomographyCache.load(cache_path_for(synthetic_root_cached, "brick", 64)).save(
            base / "vsad_cache" / "homographies_brick_64.json"
        )
        AtomicCheckpointIO().save_checkpoint({"w": torch.ones(1)}, base / "final.ckpt")
        write_image(base / "images" / "a.png", np.zeros((4, 4, 3), np.uint8))
    finally:
        os.umask(previous)
    try:
        files = [p for p in base.rglob("*") if p.is_file()]
        assert len(files) == 5
        for path in files:
            assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
        (base / "vsad_cache").chmod(0o755)
        (base / "images").chmod(0o755)
        if os.geteuid() == 0 and shutil.which("setpriv"):
            assert all(_read_as_nobody(p) == (umask == 0o022) for p in files)
    finally:
        shutil.rmtree(base)
