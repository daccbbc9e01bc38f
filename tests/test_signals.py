"""SIGINT and SIGTERM stop ``vsad-fit`` at a safe point of each long phase, with one line and a
state the same command resumes from (``vsad_lightning.callbacks.preemption``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vsad_lightning.callbacks.preemption import (
    RunInterrupted,
    deferred_stop_signals,
    raise_if_stop_requested,
    stop_requested,
)
from vsad_lightning.cli.run import _checkpoint_info

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
ENV.pop("VSAD_DEBUG", None)
BANK_STARTS = "memory bank: extracting"
TEST_STARTS = "[progress] test: started"


def test_a_signal_only_raises_the_flag_inside_the_block_and_is_forgotten_after_it():
    before = signal.getsignal(signal.SIGINT)
    with deferred_stop_signals():
        raise_if_stop_requested("nowhere", "nothing")  # no signal yet: no stop
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: a flag
        time.sleep(0.01)
        assert stop_requested() == signal.SIGINT
        with pytest.raises(RunInterrupted, match="^SIGINT while testing: resume") as info:
            raise_if_stop_requested("while testing", "resume")
        assert info.value.signum == signal.SIGINT
    assert stop_requested() is None and signal.getsignal(signal.SIGINT) is before


def _fit_command(root: Path, runs: Path, tiny_fit_args: list[str]) -> list[str]:
    # 8 normals in batches of 2 for 2 epochs: 8 steps. The bank is extracted one sample per
    # batch with 4 inversion steps (5 U-Net passes of 5 views each), so it lasts several
    # batches: the poll between them always has a batch to stop at.
    return [
        str(BIN / "vsad-fit"), *tiny_fit_args, "--data.root", str(root),
        "--data.category", "brick", "--trainer.default_root_dir", str(runs),
        "--data.batch_size", "2", "--trainer.max_epochs", "2", "--checkpoint_every_n_steps", "1",
        "--data.eval_batch_size", "1", "--model.inversion_steps", "4",
    ]  # fmt: skip


def _interrupt(cmd: list[str], signum: int, ready) -> tuple[int, list[str]]:
    """Start ``cmd``, send ``signum`` as soon as ``ready(lines so far)`` holds, and return the
    exit status and the output lines."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(l.rstrip("\n") for l in proc.stdout))
    reader.start()
    deadline = time.monotonic() + 600
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if ready(list(lines)):
                proc.send_signal(signum)
                break
            time.sleep(0.02)
        status = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        proc.kill()
        reader.join()
    return status, lines


@pytest.mark.slow
def test_sigint_in_training_and_sigterm_in_the_bank_build_stop_and_resume(
    synthetic_root_cached, tiny_fit_args, tmp_path
):
    cmd = _fit_command(synthetic_root_cached, tmp_path, tiny_fit_args)
    checkpoints = tmp_path / "realiad" / "brick" / "version_0" / "checkpoints"
    last = checkpoints / "last.ckpt"

    # 1. Ctrl+C during training: the step in progress ends, last.ckpt holds it, exit 130.
    def training(lines):
        try:
            return last.is_file() and _checkpoint_info(last)[0] >= 1
        except Exception:  # noqa: BLE001 - caught mid-write; look again
            return False

    status, lines = _interrupt(cmd, signal.SIGINT, training)
    assert status == 130, lines[-20:]
    assert not any("Traceback" in line for line in lines), lines
    stop = lines[-1]
    assert stop.startswith("stopped: SIGINT during training, at step "), lines[-20:]
    step = int(stop.split("at step ")[1].split(":")[0])
    assert 1 <= step < 8 and f"saved {last}; run the same command again" in stop, stop
    assert _checkpoint_info(last)[0] == step

    # 2. The same command resumes; SIGTERM while the bank is built stops it between batches.
    status, lines = _interrupt(
        cmd, signal.SIGTERM, lambda lines: any(BANK_STARTS in line for line in lines)
    )
    assert status == 143, lines[-20:]
    assert any(line.startswith(f"resuming from {last}") for line in lines), lines[:40]
    assert not any("Traceback" in line for line in lines), lines
    assert lines[-1] == (
        f"stopped: SIGTERM while building the memory bank: training is complete in {last}; run "
        "the same command again to build the bank and test"
    ), lines[-20:]
    assert _checkpoint_info(last)[0] == 8
    assert not (checkpoints / "final.ckpt").exists()
    assert not (checkpoints.parent / "metrics.json").exists()

    # 3. Once more: training is done, so only the bank and the test run, in the same folder;
    # SIGTERM during the test stops it with nothing of the test written.
    final = checkpoints / "final.ckpt"
    status, lines = _interrupt(
        cmd, signal.SIGTERM, lambda lines: any(TEST_STARTS in line for line in lines)
    )
    assert status == 143, lines[-20:]
    assert any(line.startswith(f"resuming from {last}") for line in lines), lines[:40]
    assert lines[-1].startswith(f"stopped: SIGTERM during the test: nothing of it was written; "
                                f"the model is in {final}"), lines[-20:]  # fmt: skip
    assert _checkpoint_info(final)[0] == 8
    assert not (checkpoints.parent / "metrics.json").exists()

    # 4. The same command only tests final.ckpt, in the same folder.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resuming from {final}" in again.stdout
    assert BANK_STARTS not in again.stdout + again.stderr  # the bank is not built again
    assert again.stdout.strip().splitlines()[-1] == f"metrics: {checkpoints.parent}/metrics.json"
    assert _checkpoint_info(final)[0] == 8
