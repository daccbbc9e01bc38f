"""Metric files of a test run (``metrics.json``, ``metrics.csv``) and the summary table.

``write_metrics`` is called by the metrics-file callback at the end of testing;
``collect_metrics`` and ``format_metrics_table`` serve the printed table of the console scripts
and ``vsad-report`` (per category, then the mean over categories: docs/evaluation.md#aggregation).
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vsad_lightning.errors import DataError
from vsad_lightning.utils.io import atomic_write_json, atomic_write_text

# The areas, in the order files and tables show them.
METRIC_KEYS: tuple[str, ...] = (
    "sample_auroc",
    "sample_ap",
    "view_auroc",
    "view_ap",
    "pixel_auroc",
    "pixel_ap",
    "pixel_aupro",
)
COUNT_KEYS: tuple[str, ...] = ("n_samples", "n_views", "n_pixels", "n_regions")
REQUIRED_KEYS: tuple[str, ...] = (*METRIC_KEYS, "n_samples", "n_views")


def _to_number(key: str, value: Any) -> float | int | None:
    """A JSON-ready number: counts as int, areas as float, NaN / infinite as None (``null``)."""
    if hasattr(value, "item"):  # 0-d torch tensor or numpy scalar
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"metric {key!r} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        return None
    if key in COUNT_KEYS and value.is_integer():
        return int(value)
    return value


def write_metrics(
    run_dir: str | os.PathLike, metrics: Mapping[str, Any], category: str
) -> tuple[Path, Path]:
    """Write ``metrics.json`` and ``metrics.csv`` (header and one row) into ``run_dir``.

    Both hold ``category`` then the areas of ``METRIC_KEYS``, then the counts and any other
    entries of ``metrics`` in their order. NaN (an undefined area) is ``null`` in the JSON and
    an empty field in the CSV. Files are written atomically (``utils.io``).

    Returns:
        ``(json_path, csv_path)``.

    Raises:
        ValueError: a required key (``REQUIRED_KEYS``) is missing or a value is not a number.
    """
    missing = [key for key in REQUIRED_KEYS if key not in metrics]
    if missing:
        raise ValueError(f"metrics for category {category!r} lack {missing}")
    record: dict[str, Any] = {"category": str(category)}
    ordered = [*METRIC_KEYS, *(k for k in metrics if k not in METRIC_KEYS and k != "category")]
    for key in ordered:
        record[key] = _to_number(key, metrics[key])

    run_dir = Path(run_dir)
    json_path, csv_path = run_dir / "metrics.json", run_dir / "metrics.csv"
    atomic_write_json(json_path, record)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(list(record))
    writer.writerow(["" if value is None else value for value in record.values()])
    atomic_write_text(csv_path, buffer.getvalue())
    return json_path, csv_path


def collect_metrics(runs_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every ``metrics.json`` below ``runs_dir``, in sorted path order.

    Each row is the file's content with ``null`` areas read back as NaN, plus ``run_dir`` (the
    folder holding the file). Several runs of one category give several rows.

    Raises:
        DataError: ``runs_dir`` is not a folder, or a file is not valid JSON or lacks a category.
    """
    root = Path(runs_dir)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (expected a folder of runs holding metrics.json)")
    rows = []
    for path in sorted(root.rglob("metrics.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
            ) from e
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot be read ({e})") from e
        if not isinstance(data, dict) or "category" not in data:
            raise DataError(f"{path}: expected a JSON object with a 'category' entry")
        row = {
            key: float("nan") if value is None and key in METRIC_KEYS else value
            for key, value in data.items()
        }
        row["run_dir"] = str(path.parent)
        rows.append(row)
    return rows


def _finite(value: Any) -> float | None:
    """``value`` as a float, or None when it is missing, not a number, NaN or infinite."""
    if value is None or isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def format_metrics_table(rows: list[Mapping[str, Any]]) -> str:
    """Markdown table: one row per entry of ``rows`` (a category), then a ``mean`` row.

    Areas are shown in percent with two decimals; a missing or NaN value is ``n/a``. The mean
    of a column is over the rows that have a value; when some rows lack one the cell says how
    many contributed, e.g. ``91.20 (2/3)``. ``n_samples`` is shown per row, not averaged.
    """
    header = ["category", *METRIC_KEYS, "n_samples"]
    body: list[list[str]] = []
    for row in rows:
        cells = [str(row.get("category", "?"))]
        for key in METRIC_KEYS:
            value = _finite(row.get(key))
            cells.append("n/a" if value is None else f"{100 * value:.2f}")
        count = _finite(row.get("n_samples"))
        cells.append("n/a" if count is None else f"{count:.0f}")
        body.append(cells)

    mean_cells = ["mean"]
    for key in METRIC_KEYS:
        values = [v for v in (_finite(row.get(key)) for row in rows) if v is not None]
        if not values:
            mean_cells.append("n/a")
            continue
        cell = f"{100 * sum(values) / len(values):.2f}"
        if len(values) < len(rows):
            cell += f" ({len(values)}/{len(rows)})"
        mean_cells.append(cell)
    mean_cells.append("")
    body.append(mean_cells)

    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [cells[0].ljust(widths[0])]
        padded += [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join(["-" * widths[0]] + ["-" * (w - 1) + ":" for w in widths[1:]]) + " |"
    return "\n".join([line(header), rule, *(line(cells) for cells in body)])
