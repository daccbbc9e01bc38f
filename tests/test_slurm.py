"""The slurm/ scripts on a real one-node SLURM cluster.

``tests/slurm_cluster.py`` installs ``slurm-wlm`` and ``munge`` when they are missing (root),
starts ``munged``, ``slurmctld`` and ``slurmd`` for this module and stops them afterwards.
Without SLURM and without root these tests FAIL; skip them on purpose with
``-m 'not slurm'`` (``make test PYTEST_ARGS="-m 'not slurm'"``).

Jobs ask for no GPU (``VSAD_SBATCH_ARGS=--gres=none``) and one CPU each, and train the demo
config shrunk to 64 px through ``VSAD_ARGS``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from slurm_cluster import SlurmCluster, ensure_slurm_installed

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
CATEGORIES = ["brick", "gravel"]
SBATCH_ARGS = "--gres=none --cpus-per-task=1 --time=30"
JOB_TIMEOUT = 900


def small_args(root: Path, *extra: str) -> str:
    return " ".join(
        [
            "--data.root", str(root), "--data.image_size", "64", "--data.resolution", "64",
            "--data.batch_size", "4", "--trainer.max_epochs", "1",
            "--model.inversion_steps", "2", "--pictures.num_samples", "1", *extra,
        ]
    )  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ensure_slurm_installed()
    started = time.monotonic()
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    print(f"slurm cluster up in {time.monotonic() - started:.1f} s")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slurm_data")
    subprocess.run(
        [str(BIN / "vsad-synth"), "--out", str(root), "--categories", ",".join(CATEGORIES),
         "--seed", "3", "--image-size", "64", "--samples-train", "8", "--samples-test", "6"],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    return root


def job_env(run_root: Path, args: str, **extra: str) -> dict[str, str]:
    return {
        "VSAD_VENV": str(Path(sys.executable).parent.parent),
        "VSAD_RUN_ROOT": str(run_root),
        "VSAD_ARGS": args,
        "VSAD_SBATCH_ARGS": SBATCH_ARGS,
        # Same thread count in every job and process: identical numbers run to run.
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def sbatch(cluster: SlurmCluster, script: str, env: dict, *options: str) -> str:
    proc = cluster.run(
        "sbatch", "--parsable", "--export=ALL", f"--chdir={REPO}", *SBATCH_ARGS.split(),
        *options, str(REPO / "slurm" / script), env=env, cwd=REPO,
    )  # fmt: skip
    return proc.stdout.strip().split(";")[0]


def run_dir(run_root: Path, category: str) -> Path:
    (folder,) = (run_root / category / "realiad" / category).glob("version_*")
    return folder


def ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_array_job_trains_every_category_and_the_chained_report_aggregates(
    cluster, data_root, tmp_path
):
    run_root = tmp_path / "runs"
    categories = tmp_path / "categories.txt"
    categories.write_text("# synthetic\n" + "\n".join(CATEGORIES) + "\n\n")
    env = job_env(run_root, small_args(data_root))
    proc = cluster.run(
        str(REPO / "slurm" / "submit.sh"), str(DEMO_CONFIG), str(categories),
        "--", "--trainer.log_every_n_steps", "1", env=env,
    )  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    fit_job = lines[0].split()[3]
    report_job = lines[1].split()[2]
    assert lines[0].startswith("fit array job: ") and "(2 tasks" in lines[0], lines

    states = cluster.wait_job(fit_job, JOB_TIMEOUT)
    logs = sorted((run_root / "logs").glob("fit_*.log"))
    assert states == {f"{fit_job}_0": "COMPLETED", f"{fit_job}_1": "COMPLETED"}, (
        states,
        [p.read_text()[-3000:] for p in logs],
    )
    assert [p.name for p in logs] == [f"fit_{fit_job}_0.log", f"fit_{fit_job}_1.log"]
    for category in CATEGORIES:
        metrics = json.loads((run_dir(run_root, category) / "metrics.json").read_text())
        assert metrics["category"] == category

    assert cluster.wait_job(report_job, 300) == {report_job: "COMPLETED"}
    report = json.loads((run_root / "report" / "report.json").read_text())
    assert sorted(r["category"] for r in report["rows"]) == CATEGORIES


def test_submit_refuses_an_array_no_node_can_start_and_says_which_request(cluster, tmp_path):
    # The test node has nproc CPUs; asking for more per task leaves the array pending forever
    # (reason PartitionConfig) unless submit.sh looks.
    categories = tmp_path / "categories.txt"
    categories.write_text("brick\n")
    too_many = cluster.cpus + 6
    env = job_env(tmp_path / "runs", "--data.root /nowhere")
    env["VSAD_SBATCH_ARGS"] = f"--gres=none --cpus-per-task={too_many} --time=30"
    proc = cluster.run(
        str(REPO / "slurm" / "submit.sh"), str(DEMO_CONFIG), str(categories), env=env, check=False
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "can never start (pending, reason PartitionConfig)" in line, line
    assert f"asks for {too_many} CPUs on one node (--cpus-per-task={too_many})" in line, line
    assert f"largest node of partition test has {cluster.cpus}" in line, line
    fit_job = line.split("fit array job ")[1].split()[0]
    report_job = line.split("report job ")[1].split()[0]
    assert cluster.run("squeue", "-h", "-j", f"{fit_job},{report_job}", check=False).stdout == ""


def test_two_task_srun_job_trains_with_ddp_world_size_two(cluster, data_root, tmp_path):
    run_root = tmp_path / "runs"
    env = job_env(
        run_root, small_args(data_root), VSAD_CONFIG=str(DEMO_CONFIG), VSAD_CATEGORY="brick"
    )
    job = sbatch(
        cluster, "multinode.sbatch", env, "--nodes=1", "--ntasks=2", "--ntasks-per-node=2",
        f"--output={tmp_path / 'ddp.log'}",
    )  # fmt: skip
    states = cluster.wait_job(job, JOB_TIMEOUT)
    log = (tmp_path / "ddp.log").read_text()
    assert states == {job: "COMPLETED"}, log[-4000:]
    final = ckpt(run_dir(run_root, "brick") / "checkpoints" / "final.ckpt")
    bank = final["memory_bank_build"]  # final.ckpt: weights only, the build info kept apart
    assert bank["world_size"] == 2, bank
    assert "1 node(s) x 2 task(s)" in log
    # Rank 0 chose the one run folder (run_dir found exactly one); its hand-off file is gone.
    assert not list((run_root / "brick").glob(".vsad-step-*")), log[-2000:]


def test_preempted_job_resumes_and_finishes_like_an_uninterrupted_one(cluster, data_root, tmp_path):
    # 2 epochs of 4 batches; last.ckpt only at epoch ends, so a resume mid-epoch must come
    # from Lightning's hpc checkpoint.
    args = small_args(
        data_root, "--data.batch_size", "2", "--trainer.max_epochs", "2",
        "--checkpoint_every_n_steps", "0", "--trainer.log_every_n_steps", "1",
    )  # fmt: skip
    categories = tmp_path / "one.txt"
    categories.write_text("brick\n")
    jobs = {}
    for name in ("plain", "preempted"):
        env = job_env(
            tmp_path / name, args, VSAD_CONFIG=str(DEMO_CONFIG), VSAD_CATEGORIES=str(categories)
        )
        jobs[name] = sbatch(
            cluster, "array.sbatch", env, "--array=0", f"--output={tmp_path / name}.log"
        )
    preempted = f"{jobs['preempted']}_0"

    # Wait for the end of the first epoch (its checkpoint), then preempt.
    first_epoch = tmp_path / "preempted" / "brick" / "realiad" / "brick"
    deadline = time.monotonic() + JOB_TIMEOUT
    while not list(first_epoch.glob("version_0/checkpoints/last.ckpt")):
        assert time.monotonic() < deadline, (tmp_path / "preempted.log").read_text()[-3000:]
        time.sleep(0.5)
    cluster.run("scancel", "--signal=USR1", preempted)
    # Lightning requeues the task; SLURM holds a requeued job back (BeginTime) for a couple
    # of minutes, which this test does not need to wait for.
    deadline = time.monotonic() + 300
    while True:
        state = cluster.job_states(preempted).get(preempted)
        restarted = cluster.run("scontrol", "-o", "show", "job", preempted).stdout
        if state == "PENDING" and "Restarts=1" in restarted:
            # (If this scontrol cannot, the wait below just lasts those minutes longer.)
            cluster.run("scontrol", "update", f"JobId={preempted}", "StartTime=now", check=False)
            break
        assert state in ("RUNNING", "COMPLETING", "PENDING", "REQUEUED"), (
            state,
            (tmp_path / "preempted.log").read_text()[-3000:],
        )
        assert time.monotonic() < deadline, "the job was never requeued"
        time.sleep(0.5)

    for name, job in jobs.items():
        states = cluster.wait_job(job, JOB_TIMEOUT)
        assert set(states.values()) == {"COMPLETED"}, (name, states)
    log = (tmp_path / "preempted.log").read_text()
    assert "restart 1" in log, log[-3000:]
    resumed = [line for line in log.splitlines() if line.startswith("resuming from ")]
    assert "Handling auto-requeue signal" in log, log[-3000:]
    # SIGUSR1 came after step 4 (epoch 0's checkpoint): Lightning wrote hpc_ckpt_1 and
    # requeued, and the requeue sent SIGTERM. Where that lands is up to the scheduler; each
    # place has its own stop and resume, and every one must end like the uninterrupted run:
    (stopped,) = [line for line in log.splitlines() if line.startswith("stopped: SIGTERM")]
    if "during training, at step " in stopped:
        # inside a training batch: the task stopped at its end, saving last.ckpt there
        # (callbacks/preemption.py), one step or more after the hpc checkpoint, and resumed
        # from that newest checkpoint;
        step = int(stopped.split("at step ")[1].split(":")[0])
        assert 4 < step < 8 and stopped.endswith("run the same command again to resume from there")
        saved = stopped.split("saved ")[1].split(";")[0]
        assert saved.endswith("/version_0/checkpoints/last.ckpt"), stopped
        assert resumed == [f"resuming from {saved}"], log[-3000:]
    elif "during the test" in stopped:
        # after the bank was built: the rerun only tests final.ckpt, in the same folder;
        final = stopped.split("the model is in ")[1].split(";")[0]
        assert final.endswith("/version_0/checkpoints/final.ckpt"), stopped
        assert resumed == [f"resuming from {final}"], log[-3000:]
    elif "while building the memory bank" in stopped:
        # during the bank build: training is complete in last.ckpt, the rerun builds and tests;
        assert resumed and resumed[0].endswith("/version_0/checkpoints/last.ckpt"), log[-3000:]
    else:
        # at epoch 0's end, where Lightning stops the task itself (no batch to finish): nothing
        # is newer than the step-4 checkpoints, and the task resumed from one of them.
        assert stopped.endswith("to resume from the newest checkpoint"), stopped
        restored = re.search(r"Restored all states from the checkpoint at \S*\.ckpt", log)
        assert restored and len(resumed) <= 1, log[-3000:]
    # The consumed preemption checkpoint is gone once the run finished.
    assert not list((tmp_path / "preempted" / "brick").glob("hpc_ckpt_*.ckpt"))

    plain, again = run_dir(tmp_path / "plain", "brick"), run_dir(tmp_path / "preempted", "brick")
    assert again.name == "version_0"  # the same run folder, continued
    steps = {ckpt(d / "checkpoints" / "final.ckpt")["global_step"] for d in (plain, again)}
    assert steps == {8}
    assert json.loads((again / "metrics.json").read_text()) == json.loads(
        (plain / "metrics.json").read_text()
    )
    assert os.environ.get("SLURM_JOB_ID") is None  # nothing leaked into this process
