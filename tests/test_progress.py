"""Progress lines for batch logs (``vsad_lightning.utils.progress``)."""

from __future__ import annotations

import io

from vsad_lightning.utils.progress import Progress, format_duration


def test_plain_lines_with_eta_in_a_log(monkeypatch):
    monkeypatch.setenv("VSAD_PROGRESS_INTERVAL", "0")  # a line at every step
    monkeypatch.delenv("VSAD_PROGRESS", raising=False)
    log = io.StringIO()  # not a terminal: plain lines, no carriage returns
    with Progress(4, "memory bank", stream=log) as meter:
        for _ in range(4):
            meter.update(1, status="loss 0.5")
    lines = log.getvalue().splitlines()
    assert lines[0] == "[progress] memory bank: started (4 batches)"
    assert lines[1].startswith("[progress] memory bank: 1/4 batches (25%), 0:00:00 elapsed, ETA ")
    assert lines[1].endswith(", loss 0.5")
    assert len(lines) == 5  # start, steps 1-3, done (the last step is reported by "done")
    assert lines[-1].startswith("[progress] memory bank: done, 4 batches in 0:00:0")
    assert "\r" not in log.getvalue()


def test_a_long_interval_keeps_the_log_short_and_zero_turns_it_off(monkeypatch):
    monkeypatch.setenv("VSAD_PROGRESS_INTERVAL", "3600")
    log = io.StringIO()
    with Progress(100, "test", stream=log) as meter:
        for _ in range(100):
            meter.update()
    assert len(log.getvalue().splitlines()) == 2  # started, done
    monkeypatch.setenv("VSAD_PROGRESS", "0")
    quiet = io.StringIO()
    with Progress(3, "test", stream=quiet) as meter:
        meter.update(3)
    assert quiet.getvalue() == ""
    assert format_duration(3725) == "1:02:05"
