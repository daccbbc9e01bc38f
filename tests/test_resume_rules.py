"""The resume rules of ``vsad-fit`` (``vsad_lightning/cli/run.py``'s module docstring):

- the newest unfinished ``version_N`` resumes from its checkpoint with the highest
  ``global_step``, its own or one of Lightning's SLURM ``hpc_ckpt_*`` that names its folder;
- another run's ``hpc_ckpt_*`` is ignored; a finished run is never resumed;
- an explicit ``--ckpt_path`` always wins and starts a new version; ``--resume never`` starts a
  new version.

The rule is checked on checkpoint files that carry what it reads (``global_step`` and the
``ModelCheckpoint`` state), and the decision through the real ``VSADCLI`` (parser, model, data
module and logger as ``vsad-fit`` builds them; nothing is trained). The full crash-and-resume
runs are ``tests/test_faults.py``'s and ``tests/test_slurm.py``'s.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vsad_lightning.cli.run import RUN_VERSION_ENV, VSADCLI, find_resume_checkpoint
from vsad_lightning.errors import DataError

NAME = "realiad/brick"


def checkpoint(path: Path, step: int, dirpath: Path | None) -> Path:
    """A checkpoint file with ``global_step`` and a ``ModelCheckpoint`` state naming ``dirpath``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    callbacks = {}
    if dirpath is not None:
        key = "RunCheckpoint{'monitor': None, 'mode': 'min'}"
        callbacks[key] = {"dirpath": str(dirpath), "best_model_path": ""}
    torch.save({"global_step": step, "callbacks": callbacks, "state_dict": {}}, path)
    return path


def version(root: Path, n: int) -> Path:
    folder = root / NAME / f"version_{n}"
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    return folder


def test_newest_unfinished_version_resumes_from_its_highest_step(tmp_path):
    old = version(tmp_path, 0)
    checkpoint(old / "checkpoints" / "last.ckpt", 99, old / "checkpoints")
    new = version(tmp_path, 1)
    last = checkpoint(new / "checkpoints" / "last.ckpt", 20, new / "checkpoints")
    checkpoint(new / "checkpoints" / "epoch=0-step=10.ckpt", 10, new / "checkpoints")
    assert find_resume_checkpoint(tmp_path, NAME) == (1, last)

    # A SLURM preemption checkpoint of this run, further on: it wins.
    hpc = checkpoint(tmp_path / "hpc_ckpt_1.ckpt", 25, new / "checkpoints")
    assert find_resume_checkpoint(tmp_path, NAME) == (1, hpc)
    # On a tie the version folder's own checkpoint wins.
    checkpoint(hpc, 20, new / "checkpoints")
    assert find_resume_checkpoint(tmp_path, NAME) == (1, last)


def test_another_runs_hpc_checkpoint_is_ignored(tmp_path):
    mine = version(tmp_path, 0)
    last = checkpoint(mine / "checkpoints" / "last.ckpt", 5, mine / "checkpoints")
    # Higher steps, but written for another category's run and for none at all.
    checkpoint(tmp_path / "hpc_ckpt_1.ckpt", 500, tmp_path / "realiad/gravel/version_0/checkpoints")
    checkpoint(tmp_path / "hpc_ckpt_2.ckpt", 600, None)
    assert find_resume_checkpoint(tmp_path, NAME) == (0, last)
    # Without a checkpoint of its own, the run has nothing to resume from.
    last.unlink()
    assert find_resume_checkpoint(tmp_path, NAME) is None


def test_finished_or_checkpointless_runs_are_not_resumed_and_tested_ones_only_tested(tmp_path):
    assert find_resume_checkpoint(tmp_path, NAME) is None  # no runs at all
    folder = version(tmp_path, 0)
    assert find_resume_checkpoint(tmp_path, NAME) is None  # no checkpoint yet
    checkpoint(folder / "checkpoints" / "last.ckpt", 7, folder / "checkpoints")
    assert find_resume_checkpoint(tmp_path, NAME) is not None
    (folder / "metrics.json").write_text("{}")  # finished: never resumed
    assert find_resume_checkpoint(tmp_path, NAME) is None
    (folder / "metrics.json").unlink()
    # Bank built, test cut short (final.ckpt, no metrics.json): resumed to test final.ckpt,
    # whatever the step of the other checkpoints.
    final = checkpoint(folder / "checkpoints" / "final.ckpt", 7, folder / "checkpoints")
    checkpoint(folder / "checkpoints" / "last.ckpt", 9, folder / "checkpoints")
    assert find_resume_checkpoint(tmp_path, NAME) == (0, final)
    (folder / "metrics.json").write_text("{}")
    assert find_resume_checkpoint(tmp_path, NAME) is None


def test_an_unreadable_checkpoint_is_skipped(tmp_path):
    folder = version(tmp_path, 0)
    good = checkpoint(folder / "checkpoints" / "epoch=0-step=4.ckpt", 4, folder / "checkpoints")
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"cut by kill -9")
    assert find_resume_checkpoint(tmp_path, NAME) == (0, good)


# ------------------------------------------------------------------ the decision in VSADCLI


@pytest.fixture
def interrupted(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """``(runs, last.ckpt)``: runs/realiad/brick/version_0 unfinished, with a checkpoint."""
    monkeypatch.delenv(RUN_VERSION_ENV, raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    runs = tmp_path / "runs"
    folder = version(runs, 0)
    return runs, checkpoint(folder / "checkpoints" / "last.ckpt", 3, folder / "checkpoints")


def cli(runs: Path, root: Path, tiny_fit_args: list[str], *extra: str) -> VSADCLI:
    args = [*tiny_fit_args, "--data.root", str(root), "--data.category", "brick",
            "--trainer.default_root_dir", str(runs), *extra]  # fmt: skip
    return VSADCLI("fit", args)


def test_the_same_command_resumes_the_interrupted_version(
    interrupted, synthetic_root_cached, tiny_fit_args
):
    runs, last = interrupted
    made = cli(runs, synthetic_root_cached, tiny_fit_args)
    assert made.resume_from == last
    assert made.trainer.logger.version == 0


@pytest.mark.parametrize(
    "extra",
    [["--resume", "never"], ["--ckpt_path", "CKPT"], ["--ckpt_path", "CKPT", "--resume", "auto"]],
)
def test_resume_never_and_an_explicit_checkpoint_start_a_new_version(
    interrupted, synthetic_root_cached, tiny_fit_args, extra, tmp_path
):
    runs, _ = interrupted
    other = checkpoint(tmp_path / "elsewhere.ckpt", 1, None)
    extra = [str(other) if arg == "CKPT" else arg for arg in extra]
    made = cli(runs, synthetic_root_cached, tiny_fit_args, *extra)
    assert made.resume_from is None
    assert made.trainer.logger.version == 1
    if "--ckpt_path" in extra:
        assert made.config["ckpt_path"] == str(other)


def test_resume_never_refuses_slurm_checkpoints_lightning_would_resume(
    interrupted, synthetic_root_cached, tiny_fit_args, monkeypatch
):
    runs, _ = interrupted
    checkpoint(runs / "hpc_ckpt_1.ckpt", 9, runs / NAME / "version_0" / "checkpoints")
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    with pytest.raises(DataError, match=r"--resume never, but .*\(hpc_ckpt_1\.ckpt\)"):
        cli(runs, synthetic_root_cached, tiny_fit_args, "--resume", "never")
