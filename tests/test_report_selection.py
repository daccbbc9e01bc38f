"""``vsad-report`` over several categories and runs: the newest run of each category counts,
and the mean row averages the categories, older runs are listed."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from vsad_lightning.metrics.export import METRIC_KEYS, write_metrics


def _metrics(base: float, **overrides: float) -> dict[str, float]:
    """Areas ``base``, ``base + 0.01``, ... per key, so that every column differs."""
    values = {key: base + 0.01 * i for i, key in enumerate(METRIC_KEYS)}
    return {**values, "n_samples": 8, "n_views": 40, **overrides}


def _run(
    runs: Path, category: str, version: int, metrics: dict, mtime: float, command: str = ""
) -> Path:
    """One finished run folder, as the console scripts lay it out (``vsad-test`` adds a
    ``test/`` level), with the given modification time."""
    run_dir = runs / "realiad" / category / command / f"version_{version}"
    run_dir.mkdir(parents=True)
    json_path, _ = write_metrics(run_dir, metrics, category)
    os.utime(json_path, (mtime, mtime))
    return run_dir


@pytest.fixture
def runs(tmp_path) -> dict[str, Path]:
    runs = tmp_path / "runs"
    t = 1_700_000_000.0
    return {
        "root": runs,
        # brick: three runs; the newest by time is version_1, not the highest number.
        "brick_old": _run(runs, "brick", 0, _metrics(0.50), t),
        "brick_new": _run(runs, "brick", 1, _metrics(0.90), t + 300),
        "brick_mid": _run(runs, "brick", 2, _metrics(0.70), t + 100),
        # A vsad-test of a checkpoint lands under <category>/test/version_N: it is a run too.
        "gravel_fit": _run(runs, "gravel", 0, _metrics(0.60), t),
        "gravel_test": _run(runs, "gravel", 0, _metrics(0.80), t + 50, "test"),
        # coffee: no AUPRO (NaN is null in metrics.json); the mean of that column skips it.
        "coffee": _run(runs, "coffee", 0, _metrics(0.40, pixel_aupro=math.nan), t),
    }


def test_report_keeps_the_newest_run_per_category_and_averages_categories(
    runs, console_script, tmp_path
):
    out = tmp_path / "report"
    proc = console_script("vsad-report", str(runs["root"]), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())

    rows = {row["category"]: row for row in report["rows"]}
    assert list(rows) == ["brick", "coffee", "gravel"]  # one row per category, sorted
    assert Path(rows["brick"]["run_dir"]) == runs["brick_new"]
    assert Path(rows["gravel"]["run_dir"]) == runs["gravel_test"]
    assert Path(rows["coffee"]["run_dir"]) == runs["coffee"]
    assert sorted(Path(p) for p in report["superseded"]) == sorted(
        [runs["brick_old"], runs["brick_mid"], runs["gravel_fit"]]
    )
    for older in ("brick_old", "brick_mid", "gravel_fit"):
        assert f"(older run not counted: {runs[older]})" in proc.stdout

    # The mean row: over the kept runs, one per category (0.90, 0.40, 0.80 plus 0.01 per column).
    for i, key in enumerate(METRIC_KEYS):
        kept = [0.90, 0.40, 0.80] if key != "pixel_aupro" else [0.90, 0.80]
        expected = sum(kept) / len(kept) + 0.01 * i
        assert report["mean"][key] == pytest.approx(expected, abs=1e-12), key
    assert rows["coffee"]["pixel_aupro"] is None

    # The printed table and report.md: the same mean, and how many categories had an AUPRO.
    mean_line = next(line for line in proc.stdout.splitlines() if line.startswith("| mean"))
    assert f"{100 * report['mean']['sample_auroc']:.2f}" in mean_line
    assert f"{100 * report['mean']['pixel_aupro']:.2f} (2/3)" in mean_line
    assert mean_line in (out / "report.md").read_text()
    csv_lines = (out / "report.csv").read_text().splitlines()
    assert csv_lines[0].startswith("category,")
    assert [line.split(",")[0] for line in csv_lines[-2:]] == ["mean", "mean_over"]
    assert len(csv_lines) == 1 + 3 + 2  # header, 3 categories, mean and mean_over


def test_report_of_a_folder_without_runs_is_one_error_line(console_script, tmp_path):
    proc = console_script("vsad-report", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path}: no metrics.json found below this folder"
    ]
