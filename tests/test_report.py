"""``vsad-report``: a category without a metric is marked in every format, and every format
says what the mean is over."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from vsad_lightning.cli.report import report_main
from vsad_lightning.metrics.export import METRIC_KEYS, write_metrics


def _metrics(base: float) -> dict[str, float]:
    values = {key: base + 0.01 * i for i, key in enumerate(METRIC_KEYS)}
    return {**values, "n_samples": 8, "n_views": 40}


def _run(root: Path, category: str, version: int, metrics: dict, mtime: float) -> Path:
    folder = root / "realiad" / category / f"version_{version}"
    folder.mkdir(parents=True)
    write_metrics(folder, metrics, category)
    os.utime(folder / "metrics.json", (mtime, mtime))
    return folder


def test_missing_metrics_are_marked_in_every_format(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "out"
    old_brick = _run(runs, "brick", 0, _metrics(0.5), 1000)  # complete, but superseded
    _run(runs, "brick", 1, {**_metrics(0.9), "pixel_aupro": float("nan")}, 2000)
    _run(runs, "gravel", 0, _metrics(0.8), 1000)
    coffee = _run(runs, "coffee", 0, _metrics(0.7), 1000)
    record = json.loads((coffee / "metrics.json").read_text())
    del record["view_ap"]  # a file without the key at all (an older writer)
    (coffee / "metrics.json").write_text(json.dumps(record))

    assert report_main([str(runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    expected_aupro = (_metrics(0.8)["pixel_aupro"] + _metrics(0.7)["pixel_aupro"]) / 2

    # Markdown and console: n/a in the cell, (2/3) in the mean, a line naming who is left out.
    markdown = (out / "report.md").read_text()
    assert markdown.strip() in printed
    brick_line = next(line for line in markdown.splitlines() if line.startswith("| brick"))
    assert brick_line.rstrip(" |").split("|")[METRIC_KEYS.index("pixel_aupro") + 2].strip() == "n/a"
    mean_line = next(line for line in markdown.splitlines() if line.startswith("| mean"))
    assert f"{100 * expected_aupro:.2f} (2/3)" in mean_line
    assert "pixel_aupro over 2 of 3 (without brick)" in markdown
    assert "view_ap over 2 of 3 (without coffee)" in markdown
    assert "unweighted over the 3 categories" in markdown
    assert f"older run not counted: {old_brick}" in printed

    # CSV: n/a cells, the missing column, and a mean_over row.
    with open(out / "report.csv", newline="") as f:
        rows = {row["category"]: row for row in csv.DictReader(f)}
    assert list(rows) == ["brick", "coffee", "gravel", "mean", "mean_over"]
    assert rows["brick"]["pixel_aupro"] == "n/a" and rows["brick"]["missing"] == "pixel_aupro"
    assert rows["coffee"]["view_ap"] == "n/a" and rows["coffee"]["missing"] == "view_ap"
    assert rows["gravel"]["missing"] == ""
    assert float(rows["mean"]["pixel_aupro"]) == pytest.approx(expected_aupro)
    assert rows["mean"]["missing"] == "view_ap: coffee; pixel_aupro: brick"
    assert rows["mean_over"]["pixel_aupro"] == "2/3" and rows["mean_over"]["sample_auroc"] == "3/3"

    # JSON: null, the row's missing list, and the categories each mean is over.
    report = json.loads((out / "report.json").read_text())
    by_category = {row["category"]: row for row in report["rows"]}
    assert by_category["brick"]["pixel_aupro"] is None
    assert by_category["brick"]["missing"] == ["pixel_aupro"]
    assert by_category["coffee"]["view_ap"] is None and by_category["gravel"]["missing"] == []
    assert report["mean_over"]["pixel_aupro"] == ["coffee", "gravel"]
    assert report["mean_over"]["sample_auroc"] == ["brick", "coffee", "gravel"]
    assert report["mean"]["pixel_aupro"] == pytest.approx(expected_aupro)
    assert report["superseded"] == [str(old_brick)]
