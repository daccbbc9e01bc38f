"""A real one-node SLURM cluster for the tests: ``munged``, ``slurmctld`` and ``slurmd``.

``SlurmCluster(folder).start()`` writes a ``slurm.conf`` for this host (CPUs from ``nproc``,
every state, spool, log and socket file under ``folder``), starts the three daemons in the
foreground as child processes and waits until the node is idle; ``stop()`` ends exactly
those processes, by the PIDs it started. Client commands find the cluster through
``SLURM_CONF`` in ``cluster.env``, which jobs inherit (Lightning's ``scontrol requeue`` too).

``ensure_slurm_installed()`` installs Debian's ``slurm-wlm`` and ``munge`` with apt-get when
they are missing (root only). Run this file to start a cluster by hand for debugging:
``python tests/slurm_cluster.py /tmp/cluster`` (Ctrl-C stops it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "sacct")


def slurm_missing() -> list[str]:
    """The SLURM and munge programs that are not on PATH (or in /usr/sbin)."""
    return [p for p in (*DAEMONS, *CLIENTS[:4]) if _which(p) is None]


def _which(program: str) -> str | None:
    return shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin")


def ensure_slurm_installed(timeout: float = 900) -> None:
    """``apt-get install slurm-wlm munge`` when a program is missing; raise if impossible."""
    if not slurm_missing():
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"SLURM is not installed ({slurm_missing()}) and this is not root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr}")
    if slurm_missing():
        raise RuntimeError(f"still missing after apt-get: {slurm_missing()}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """One controller and one compute node on this host (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.host = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.conf = self.folder / "slurm.conf"
        self.munge_socket = self.folder / "munge" / "munge.socket"
        self.processes: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.env["PATH"] = f"{self.env.get('PATH', '')}:/usr/sbin:/sbin"

    # ---------------------------------------------------------------- configuration
    def write_config(self) -> None:
        f = self.folder
        for sub in ("state", "spool", "munge", "log"):
            (f / sub).mkdir(parents=True, exist_ok=True)
        (f / "munge").chmod(0o700)
        ctld_port, slurmd_port = _free_port(), _free_port()
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=vsadtest",
                    f"SlurmctldHost={self.host}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    f"SlurmctldPort={ctld_port}",
                    f"SlurmdPort={slurmd_port}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={self.munge_socket}",
                    f"StateSaveLocation={f / 'state'}",
                    f"SlurmdSpoolDir={f / 'spool'}",
                    f"SlurmctldPidFile={f / 'slurmctld.pid'}",
                    f"SlurmdPidFile={f / 'slurmd.pid'}",
                    f"SlurmctldLogFile={f / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={f / 'log' / 'slurmd.log'}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "MpiDefault=none",
                    "SwitchType=switch/none",
                    "SchedulerType=sched/backfill",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "ReturnToService=2",
                    "JobCompType=jobcomp/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    # A quick test cluster: schedule often, kill fast, requeue without delay.
                    "SchedulerParameters=sched_interval=2",
                    "MessageTimeout=30",
                    "KillWait=10",
                    "MinJobAge=600",
                    "SlurmdTimeout=60",
                    f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
                    "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )

    # ---------------------------------------------------------------- processes
    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.folder / "log" / f"{name}.stdout", "w")  # noqa: SIM115 - kept open
        self.processes[name] = subprocess.Popen(
            [_which(name) or name, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )

    def start(self, timeout: float = 120) -> SlurmCluster:
        self.write_config()
        m = self.folder / "munge"
        self._spawn(
            "munged",
            [
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--pid-file={m / 'munged.pid'}",
                f"--log-file={m / 'munged.log'}",
                f"--seed-file={m / 'munged.seed'}",
                "--key-file=/etc/munge/munge.key",
            ],
        )
        self._wait(lambda: self.munge_socket.exists(), 30, "munged socket")
        self._spawn("slurmctld", ["-D", "-c", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", ["-D", "-N", self.host, "-f", str(self.conf)])
        self._wait(self._node_idle, timeout, "an idle node")
        return self

    def _node_idle(self) -> bool:
        proc = self.run("sinfo", "-h", "-o", "%t", check=False)
        return proc.returncode == 0 and proc.stdout.strip().startswith("idle")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.processes.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited while waiting for {what}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out waiting for {what}:\n{self.logs()}")

    def stop(self) -> None:
        """Cancel this cluster's jobs, then SIGTERM each daemon this object started (reverse
        order), SIGKILL if it lingers.

        Jobs go first: a job step's ``slurmstepd`` outlives a stopped ``slurmd`` (a failed
        test must not leave training processes behind).
        """
        if all(self.processes.get(d) and self.processes[d].poll() is None for d in DAEMONS):
            jobs = self.run("squeue", "-h", "-o", "%A", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
            # Until slurmd reports no process of any job step on this node.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self._job_pids():
                time.sleep(1)
        for name in reversed(list(self.processes)):
            proc = self.processes.pop(name)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def _job_pids(self) -> list[str]:
        proc = self.run("scontrol", "listpids", check=False)
        rows = proc.stdout.strip().splitlines()[1:]  # header: PID JOBID STEPID ...
        return [r.split()[0] for r in rows if r.split()]

    def logs(self) -> str:
        parts = []
        for path in sorted((self.folder / "log").glob("*")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    # ---------------------------------------------------------------- clients
    def run(
        self, *cmd: str, check: bool = True, env: dict | None = None, timeout: float = 60, cwd=None
    ):
        proc = subprocess.run(
            [_which(cmd[0]) or cmd[0], *cmd[1:]],
            capture_output=True,
            text=True,
            env={**self.env, **(env or {})},
            timeout=timeout,
            cwd=cwd,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def job_states(self, job: str) -> dict[str, str]:
        """``{job_id: state}`` of a job or of every task of an array job (``scontrol``)."""
        proc = self.run("scontrol", "-o", "show", "job", job, check=False)
        states = {}
        for line in proc.stdout.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            key = fields.get("JobId", "?")
            if fields.get("ArrayTaskId"):
                key = f"{fields.get('ArrayJobId')}_{fields['ArrayTaskId']}"
            states[key] = fields.get("JobState", "?")
        return states

    def wait_job(self, job: str, timeout: float) -> dict[str, str]:
        """Wait until no task of ``job`` is pending or running; return the final states."""
        deadline = time.monotonic() + timeout
        active = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED"}
        while time.monotonic() < deadline:
            states = self.job_states(job)
            if states and not set(states.values()) & active:
                return states
            time.sleep(2)
        raise TimeoutError(f"job {job} still active after {timeout} s: {self.job_states(job)}")


if __name__ == "__main__":
    ensure_slurm_installed()
    cluster = SlurmCluster(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/vsad-slurm")).start()
    print(f"export SLURM_CONF={cluster.conf}", flush=True)
    try:
        signal.pause()
    finally:
        cluster.stop()
