"""``vsad-report RUNS_DIR``: one table of every category's ``metrics.json`` below a folder.

One row per category, then the mean over categories (docs/evaluation.md). When a category
has several runs (re-runs, ``vsad-test`` of a checkpoint, a requeued job), its newest
``metrics.json`` (by modification time) is the one that counts; the others are listed below
the table so nothing is dropped silently. Writes ``report.md``, ``report.csv`` and
``report.json`` into RUNS_DIR (or ``--out``) atomically and prints the markdown, and the page
``report.html`` (``vsad_lightning.visualization.report_page``).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
from pathlib import Path

from vsad_lightning.cli._common import report_data_errors
from vsad_lightning.errors import DataError
from vsad_lightning.metrics.export import METRIC_KEYS, collect_metrics, format_metrics_table
from vsad_lightning.utils.io import atomic_write_json, atomic_write_text
from vsad_lightning.visualization.report_page import write_report_page


def newest_per_category(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """``(kept, superseded)``: the newest row of each category, sorted by category."""
    by_category: dict[str, list[dict]] = {}
    for row in rows:
        by_category.setdefault(str(row["category"]), []).append(row)
    kept, superseded = [], []
    for category in sorted(by_category):
        ordered = sorted(
            by_category[category],
            key=lambda r: (Path(r["run_dir"], "metrics.json").stat().st_mtime, r["run_dir"]),
        )
        kept.append(ordered[-1])
        superseded.extend(ordered[:-1])
    return kept, superseded


def _json_value(value):
    """NaN (an undefined area) is ``null`` in JSON, as in ``metrics.json``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def mean_row(rows: list[dict]) -> dict[str, float | None]:
    mean: dict[str, float | None] = {}
    for key in METRIC_KEYS:
        values = [float(r[key]) for r in rows if r.get(key) is not None]
        values = [v for v in values if math.isfinite(v)]
        mean[key] = sum(values) / len(values) if values else None
    return mean


@report_data_errors
def report_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vsad-report", description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir", help="A folder of runs (searched recursively).")
    parser.add_argument("--out", default=None, help="Where to write report.* (default RUNS_DIR).")
    args = parser.parse_args(argv)

    rows = collect_metrics(args.runs_dir)
    if not rows:
        raise DataError(f"{args.runs_dir}: no metrics.json found below this folder")
    kept, superseded = newest_per_category(rows)
    table = format_metrics_table(kept)

    out = Path(args.out or args.runs_dir)
    columns = ["category", *METRIC_KEYS, "n_samples", "n_views", "run_dir"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in kept:
        writer.writerow(["" if _json_value(row.get(c)) is None else row[c] for c in columns])
    mean = mean_row(kept)
    writer.writerow(["mean", *("" if mean[k] is None else mean[k] for k in METRIC_KEYS)])
    atomic_write_text(out / "report.csv", buffer.getvalue())
    atomic_write_text(out / "report.md", table + "\n")
    atomic_write_json(
        out / "report.json",
        {
            "rows": [{c: _json_value(row.get(c)) for c in columns} for row in kept],
            "mean": mean,
            "superseded": [r["run_dir"] for r in superseded],
        },
    )
    page = write_report_page(out, kept, mean, superseded)
    print(table)
    for row in superseded:
        print(f"(older run not counted: {row['run_dir']})")
    print(f"page:   {page}")
    print(f"report: {out / 'report.md'}")
    return 0


def main() -> int:
    return report_main()
