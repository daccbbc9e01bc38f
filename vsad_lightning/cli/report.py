"""``vsad-report RUNS_DIR``: one table of every category's ``metrics.json`` below a folder.

One row per category, then the mean over categories (docs/evaluation.md). When a category
has several runs (re-runs, ``vsad-test`` of a checkpoint, a requeued job), its newest
``metrics.json`` (by modification time) is the one that counts; the others are listed below
the table so nothing is dropped silently. Writes ``report.md``, ``report.csv`` and
``report.json`` into RUNS_DIR (or ``--out``) atomically and prints the markdown, and the page
``report.html`` (``vsad_lightning.visualization.report_page``).

A category without a value for a metric (missing from its file, or undefined: NaN, ``null``)
is marked in every format, and the mean of that metric is over the categories that have one,
which every format says:

- markdown / console: ``n/a`` in the cell, ``91.20 (2/3)`` in the mean, and a line under the
  table naming the categories each partial mean leaves out;
- CSV: ``n/a`` in the cell, a ``missing`` column listing the category's missing metrics, and a
  ``mean_over`` row with ``k/n`` per metric (the ``mean`` row's ``missing`` cell names the
  categories left out);
- JSON: ``null`` in the row, the row's ``missing`` list, and ``mean_over``: per metric, the
  categories the mean is over.
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


def _value(row: dict, key: str) -> float | None:
    """The row's finite value of ``key``, or None (missing, ``null``, NaN or infinite)."""
    value = row.get(key)
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def missing_metrics(row: dict) -> list[str]:
    """The metrics of ``METRIC_KEYS`` that ``row`` has no value for."""
    return [key for key in METRIC_KEYS if _value(row, key) is None]


def mean_over(rows: list[dict]) -> dict[str, list[str]]:
    """Per metric, the categories with a value: what ``mean_row``'s mean is over."""
    return {
        key: [str(r["category"]) for r in rows if _value(r, key) is not None] for key in METRIC_KEYS
    }


def mean_row(rows: list[dict]) -> dict[str, float | None]:
    """Unweighted mean over the categories that have a value (None if none has)."""
    mean: dict[str, float | None] = {}
    for key in METRIC_KEYS:
        values = [v for v in (_value(r, key) for r in rows) if v is not None]
        mean[key] = sum(values) / len(values) if values else None
    return mean


def mean_note(rows: list[dict]) -> str:
    """One line that says what the mean row is over."""
    over = mean_over(rows)
    partial = [
        f"{key} over {len(cats)} of {len(rows)} (without "
        f"{', '.join(str(r['category']) for r in rows if str(r['category']) not in cats)})"
        for key, cats in over.items()
        if len(cats) < len(rows)
    ]
    line = f"mean: unweighted over the {len(rows)} categories"
    if partial:
        line += "; n/a marks a missing or undefined value, left out of the mean: "
        line += "; ".join(partial)
    return line


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
    table = format_metrics_table(kept) + "\n\n" + mean_note(kept)

    out = Path(args.out or args.runs_dir)
    columns = ["category", *METRIC_KEYS, "n_samples", "n_views", "run_dir"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*columns, "missing"])
    for row in kept:
        cells = ["" if _json_value(row.get(c)) is None else row[c] for c in columns]
        cells[1 : 1 + len(METRIC_KEYS)] = [
            "n/a" if _value(row, k) is None else row[k] for k in METRIC_KEYS
        ]
        writer.writerow([*cells, ";".join(missing_metrics(row))])
    mean, over = mean_row(kept), mean_over(kept)
    left_out = [
        f"{k}: {' '.join(str(r['category']) for r in kept if str(r['category']) not in over[k])}"
        for k in METRIC_KEYS
        if len(over[k]) < len(kept)
    ]
    tail = [""] * (len(columns) - 1 - len(METRIC_KEYS))
    writer.writerow(["mean", *("n/a" if mean[k] is None else mean[k] for k in METRIC_KEYS),
                     *tail, "; ".join(left_out)])  # fmt: skip
    writer.writerow(["mean_over", *(f"{len(over[k])}/{len(kept)}" for k in METRIC_KEYS),
                     *tail, ""])  # fmt: skip
    atomic_write_text(out / "report.csv", buffer.getvalue())
    atomic_write_text(out / "report.md", table + "\n")
    atomic_write_json(
        out / "report.json",
        {
            "rows": [
                {**{c: _json_value(row.get(c)) for c in columns}, "missing": missing_metrics(row)}
                for row in kept
            ],
            "mean": mean,
            "mean_over": over,
            "superseded": [r["run_dir"] for r in superseded],
        },
    )
    page = write_report_page(out, kept, mean, superseded, mean_note(kept))
    print(table)
    for row in superseded:
        print(f"(older run not counted: {row['run_dir']})")
    print(f"page:   {page}")
    print(f"report: {out / 'report.md'}")
    return 0


def main() -> int:
    return report_main()
