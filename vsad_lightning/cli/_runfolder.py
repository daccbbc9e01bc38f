"""One run, one folder: claiming ``version_N`` atomically and keeping it while the run lives.

Lightning's logger picks ``max(existing versions) + 1`` by listing the folder, so two runs
started together on one ``default_root_dir`` both chose ``version_0`` and wrote into it.
Here a run *claims* its version with ``mkdir``, which exactly one process can win; the loser
takes the next number. The claimed folder is then held with an advisory ``flock`` on its
directory for the life of the process, so that ``vsad-fit --resume auto`` started while
another run is still training does not resume (and write into) that live run: it starts a
new version instead. The kernel drops the lock when the process ends, however it ends
(crash, ``kill -9``, preemption), so resuming an interrupted run still works.

A folder claimed by a command that then fails before it produced anything (bad input found
by the data checks, an unreadable checkpoint given to ``vsad-test``) is removed again, so a
failed command leaves no empty ``version_N`` behind.

Under ``srun`` every DDP rank is a separate ``vsad-fit`` that SLURM started itself (Lightning
spawns nothing), so no rank inherits rank 0's choice through the environment, and the process
group that could broadcast it does not exist yet when the run folder is chosen. Rank 0 of such
a step therefore writes its choice (version and checkpoint to resume) to
``<default_root_dir>/.vsad-step-<job>.<restart>.<step>.json`` (``publish_choice``), and the
other ranks read it (``await_choice``) instead of choosing themselves: one folder per run,
however the tasks' start-up interleaves. Rank 0 removes the file when its command ends; by
then every rank has read it (none can pass DDP's rendezvous before reading it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from pathlib import Path

from vsad_lightning.errors import DataError

_HELD: dict[Path, int] = {}
"""Run folders this process holds (path -> open directory descriptor carrying the flock)."""

_CLAIMED: list[Path] = []
"""Folders this process created for the running command (candidates for ``discard_empty``)."""

_CREATED: list[Path] = []
"""Parent folders ``claim_version`` created (deepest first), removed again when left empty."""

_PUBLISHED: list[Path] = []
"""Choice files this process wrote as rank 0 of an ``srun`` step (removed by ``end_command``)."""

CHOICE_TIMEOUT_S = 300.0
"""How long a rank > 0 of an ``srun`` step waits for rank 0's choice before failing."""

RESULT_FILES = ("metrics.json", "scores.csv")
"""A run folder holding one of these (or any ``*.ckpt``) produced something worth keeping."""


def hold(folder: str | os.PathLike) -> bool:
    """Take this process's lock on ``folder``; ``False`` when another process holds it.

    File systems without ``flock`` support (some network mounts) count as not held by anyone.
    """
    folder = Path(folder).resolve()
    if folder in _HELD:
        return True
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    except OSError:  # ENOLCK and friends: no locking here; do not block the run
        pass
    _HELD[folder] = fd
    return True


def in_use(folder: str | os.PathLike) -> bool:
    """Whether another live process holds ``folder`` (see ``hold``)."""
    folder = Path(folder).resolve()
    if folder in _HELD:
        return False
    if not hold(folder):
        return True
    release(folder)
    return False


def release(folder: str | os.PathLike) -> None:
    fd = _HELD.pop(Path(folder).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the last descriptor drops the flock


def next_version(parent: Path) -> int:
    """``max(N) + 1`` over ``parent/version_N`` folders, 0 when there are none."""
    found = [
        int(d.name.split("_", 1)[1])
        for d in (parent.glob("version_*") if parent.is_dir() else [])
        if d.is_dir() and d.name.split("_", 1)[1].isdigit()
    ]
    return max(found) + 1 if found else 0


def claim_version(parent: str | os.PathLike) -> int:
    """Create and hold ``parent/version_N`` for the smallest free ``N >= next_version``."""
    parent = Path(parent)
    new = [p for p in (parent, *parent.parents) if not p.exists()]
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"run folder {parent} cannot be created ({e.strerror})") from e
    version = next_version(parent)
    while True:
        folder = parent / f"version_{version}"
        try:
            folder.mkdir()
        except FileExistsError:
            version += 1  # another run won this number between our listing and mkdir
            continue
        except OSError as e:
            raise DataError(f"run folder {folder} cannot be created ({e.strerror})") from e
        _CLAIMED.append(folder)
        _CREATED.extend(new)  # deepest first
        hold(folder)
        return version


def srun_step() -> tuple[int | None, str | None]:
    """``(rank, step key)`` when ``srun`` started this process as one of several tasks of one
    job step, else ``(None, None)`` (a single task, or no SLURM).

    The key names the step uniquely on its controller: job id (array tasks have their own),
    restart count (a requeued job reuses its id) and step id.
    """
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1") or 1) < 2 or "SLURM_PROCID" not in env:
        return None, None
    if env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None, None  # an interactive allocation: Lightning itself ignores SLURM there
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    if step is None or "SLURM_JOB_ID" not in env:
        return None, None  # inside sbatch but not under srun: a single process
    key = f"{env['SLURM_JOB_ID']}.{env.get('SLURM_RESTART_COUNT', '0')}.{step}"
    return int(env["SLURM_PROCID"]), key


def _choice_path(root: str | os.PathLike, key: str) -> Path:
    return Path(root) / f".vsad-step-{key}.json"


def publish_choice(root: str | os.PathLike, key: str, name: str, version: int,
                   resume_from: str | None) -> None:  # fmt: skip
    """Rank 0: write the run folder choice for the other ranks of the step (atomically)."""
    path = _choice_path(root, key)
    staged = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    staged.write_text(json.dumps({"name": name, "version": version, "resume_from": resume_from}))
    os.replace(staged, path)
    _PUBLISHED.append(path)


def await_choice(
    root: str | os.PathLike, key: str, name: str, rank: int, timeout_s: float = CHOICE_TIMEOUT_S
) -> tuple[int, str | None]:
    """Rank > 0: ``(version, resume_from)`` as rank 0 of the same step chose them."""
    path = _choice_path(root, key)
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise DataError(
                f"rank {rank} waited {timeout_s:.0f} s for rank 0 to choose the run folder "
                f"({path} never appeared): rank 0 failed before it chose, or "
                f"{Path(root)} is not a file system every node of the job shares"
            )
        time.sleep(0.2)
    choice = json.loads(path.read_text())
    if choice["name"] != name:
        raise DataError(
            f"rank {rank} runs {name!r} but rank 0 of the same job step chose a folder for "
            f"{choice['name']!r} ({path}): every task of one srun must run the same command"
        )
    return int(choice["version"]), choice["resume_from"]


def _produced_something(folder: Path) -> bool:
    if any(folder.rglob("*.ckpt")):
        return True
    return any((folder / name).exists() for name in RESULT_FILES)


def end_command(failed: bool, trained: bool) -> None:
    """At the end of a console command: when it ``failed`` before ``trained`` and left no
    checkpoint or result in a folder it claimed, remove that folder; release every lock."""
    for folder in _CLAIMED:
        if failed and not trained and folder.is_dir() and not _produced_something(folder):
            shutil.rmtree(folder, ignore_errors=True)
    for parent in _CREATED:  # the category folders it created, when nothing else is in them
        with contextlib.suppress(OSError):
            parent.rmdir()
    _CLAIMED.clear()
    _CREATED.clear()
    for folder in list(_HELD):
        release(folder)
    for path in _PUBLISHED:
        path.unlink(missing_ok=True)
    _PUBLISHED.clear()
