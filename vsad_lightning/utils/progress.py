"""Progress of long work (homography estimation, epochs, bank building, test) with an ETA.

In a terminal (stderr is a TTY) a ``tqdm`` bar; in a batch log (SLURM, a pipe, a file) plain
lines instead of carriage-return bars, one when the work starts, then at most every
``VSAD_PROGRESS_INTERVAL`` seconds (default 15, so a log shows life at least twice a minute),
and one when it ends::

    [progress] memory bank: features of the training normals: 12/40 batches (30%),
    0:00:31 elapsed, ETA 0:01:12

``VSAD_PROGRESS=0`` turns all of it off (a value of ``1`` forces the plain lines even in a
terminal). Lines go to stderr, so stdout keeps only results (tables, paths).
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from tqdm import tqdm

INTERVAL_ENV = "VSAD_PROGRESS_INTERVAL"
MODE_ENV = "VSAD_PROGRESS"
DEFAULT_INTERVAL_S = 15.0


def progress_interval() -> float:
    """Seconds between two plain progress lines (``VSAD_PROGRESS_INTERVAL``, default 15)."""
    value = os.environ.get(INTERVAL_ENV, "")
    try:
        return max(0.0, float(value)) if value else DEFAULT_INTERVAL_S
    except ValueError:
        return DEFAULT_INTERVAL_S


def progress_enabled() -> bool:
    return os.environ.get(MODE_ENV, "") != "0"


def use_terminal_bar(stream: TextIO | None = None) -> bool:
    """True for a live bar: ``stream`` (stderr) is a terminal and plain lines are not forced."""
    stream = stream or sys.stderr
    if os.environ.get(MODE_ENV, "") == "1":
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Progress of ``total`` steps of one piece of work (module docstring).

    Use as a context manager, or call ``close`` at the end. ``enabled=False`` (e.g. on a DDP
    rank other than 0) makes every call a no-op.
    """

    def __init__(
        self,
        total: int | None,
        description: str,
        *,
        unit: str = "batches",
        enabled: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        self.total = total
        self.description = description
        self.unit = unit
        self.done = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled and progress_enabled()
        self.interval = progress_interval()
        self.start = self.last = time.monotonic()
        self.status = ""
        self._bar = None
        if not self.enabled:
            return
        if use_terminal_bar(self.stream):
            self._bar = tqdm(
                total=total, desc=description, unit=f" {unit}", file=self.stream, leave=True
            )
        else:
            size = f"{total} {unit}" if total is not None else unit
            self._line(f"started ({size})")

    def _line(self, text: str) -> None:
        print(f"[progress] {self.description}: {text}", file=self.stream, flush=True)

    def summary(self) -> str:
        """``12/40 batches (30%), 0:00:31 elapsed, ETA 0:01:12``."""
        elapsed = time.monotonic() - self.start
        if self.total:
            fraction = self.done / self.total
            eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
            text = f"{self.done}/{self.total} {self.unit} ({100 * fraction:.0f}%), "
            text += f"{format_duration(elapsed)} elapsed"
            if eta == eta:  # not NaN
                text += f", ETA {format_duration(eta)}"
        else:
            text = f"{self.done} {self.unit}, {format_duration(elapsed)} elapsed"
        return f"{text}, {self.status}" if self.status else text

    def update(self, n: int = 1, status: str = "") -> None:
        """``n`` more steps done; ``status`` (e.g. ``loss 0.12``) goes with the next line."""
        if not self.enabled:
            return
        self.done += n
        self.status = status or self.status
        if self._bar is not None:
            if status:
                self._bar.set_postfix_str(status, refresh=False)
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.interval and (self.total is None or self.done < self.total):
            self.last = now
            self._line(self.summary())

    def close(self, status: str = "") -> None:
        if not self.enabled:
            return
        self.enabled = False
        self.status = status or self.status
        if self._bar is not None:
            if status:
                self._bar.set_postfix_str(status, refresh=False)
            self._bar.close()
            return
        elapsed = format_duration(time.monotonic() - self.start)
        text = f"done, {self.done} {self.unit} in {elapsed}"
        self._line(f"{text}, {self.status}" if self.status else text)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
