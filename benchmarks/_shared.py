"""Helpers the benchmark scripts share: worker subprocesses and the machine's description.

Each benchmark measures peak memory in a fresh worker process (so one measurement's
allocations cannot hide another's); the worker prints one ``RESULT <json>`` line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence


def spawn_worker(script: str, args: Sequence[object]) -> dict:
    """Run ``python script *args`` and return the JSON of its ``RESULT`` line."""
    cmd = [sys.executable, os.path.abspath(script), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(
        f"{' '.join(map(str, args))} failed (rc={proc.returncode}):\n{proc.stderr[-2000:]}"
    )


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``CPU`` where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return "CPU"


def status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
