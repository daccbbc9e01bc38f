"""``report.html``: the run report as one self-contained page (``vsad-report`` writes it).

The page holds the per-category table with its mean row (the numbers of ``report.json``, in
percent; ``n/a`` where a metric is undefined), a bar chart of the metrics per category, and for
each category its threshold curves and score histograms (``<run>/images/curves.png`` and
``histograms.png``, written by ``AnomalyMapPictures``) with links to every picture of the run.
Charts and images are embedded as ``data:`` URIs, so the page shows everything on its own; only
the links to the individual pictures point at the run folders (relative paths, so the page
keeps working when RUNS_DIR is copied as a whole). No scripts from elsewhere, no fonts, no
network. A one-line script marks the ``<body>`` with how many images failed to load
(``data-broken-images``), which the test in a real browser reads.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path

from vsad_lightning.metrics.export import METRIC_KEYS
from vsad_lightning.utils.io import atomic_write_text

PAGE_NAME = "report.html"

_STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1300px; }
table { border-collapse: collapse; margin: 12px 0; }
th, td { border: 1px solid #bbb; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #eee; }
tr.mean td { font-weight: bold; background: #f6f6f6; }
td.na { color: #999; }
img.chart { max-width: 100%; border: 1px solid #ddd; margin: 6px 0; }
section { margin-top: 28px; }
ul.pictures { columns: 2; }
.note { color: #555; font-size: 90%; }
"""

_CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var broken = Array.prototype.filter.call(document.images, function (img) {
    return !img.complete || img.naturalWidth === 0;
  });
  document.body.setAttribute('data-broken-images', String(broken.length));
  document.body.setAttribute('data-images', String(document.images.length));
});
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return '<td class="na" title="undefined (no positives or no negatives)">n/a</td>'
    return f"<td>{100 * float(value):.2f}</td>"


def _bar_chart(rows: list[dict], mean: dict) -> bytes:
    """Grouped bars, one group per metric, one bar per category (and the mean), as PNG."""
    from vsad_lightning.visualization.figures import plt

    labels = [str(r["category"]) for r in rows] + ["mean"]
    values = [[r.get(k) for k in METRIC_KEYS] for r in rows] + [[mean.get(k) for k in METRIC_KEYS]]
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(12, 4), dpi=100)
    for i, (label, row) in enumerate(zip(labels, values, strict=True)):
        heights = [
            100 * float(v) if v is not None and math.isfinite(float(v)) else 0.0 for v in row
        ]
        xs = [k + (i - (len(labels) - 1) / 2) * width for k in range(len(METRIC_KEYS))]
        ax.bar(xs, heights, width, label=label, color="black" if label == "mean" else None)
    ax.set_xticks(range(len(METRIC_KEYS)), METRIC_KEYS)
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=min(len(labels), 6), loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _category_section(row: dict, out: Path) -> str:
    category = html.escape(str(row["category"]))
    run = Path(row["run_dir"])
    images = run / "images"
    parts = [f'<section id="cat-{category}"><h2>{category}</h2>']
    parts.append(f'<p class="note">run: <code>{html.escape(str(run))}</code></p>')
    for name, alt in (("curves", "threshold curves"), ("histograms", "score histograms")):
        path = images / f"{name}.png"
        if path.is_file():
            uri = _data_uri(path.read_bytes())
            parts.append(f'<img class="chart" src="{uri}" alt="{category}: {alt}">')
    index_path = images / "index.json"
    pictures = []
    if index_path.is_file():
        try:
            pictures = json.loads(index_path.read_text(encoding="utf-8")).get("pictures", [])
        except (OSError, json.JSONDecodeError):
            pictures = []
    samples = [p for p in pictures if p.get("sample_id")]
    if samples:
        parts.append('<ul class="pictures">')
        for p in samples:
            link = Path(os.path.relpath(images / p["file"], out)).as_posix()
            decision = {0: "OK", 1: "NG"}.get(p.get("sample_decision"), "")
            truth = {0: "OK", 1: "NG"}.get(p.get("sample_truth"), "")
            text = (
                f"{p['kind'].replace('_', ' ')} #{p['rank']}: {p['sample_id']} "
                f"(score {float(p['sample_score']):.2f}, {decision}, truth {truth})"
            )
            parts.append(f'<li><a href="{html.escape(link)}">{html.escape(text)}</a></li>')
        parts.append("</ul>")
    elif not pictures:
        parts.append('<p class="note">no pictures in this run</p>')
    parts.append("</section>")
    return "\n".join(parts)


def write_report_page(
    out: Path,
    rows: list[dict],
    mean: dict,
    superseded: list[dict] | None = None,
    mean_note: str = "",
) -> Path:
    """Write ``out/report.html`` (atomically) for the kept ``rows`` and their ``mean``.

    ``mean_note`` says what the mean row is over (``vsad-report`` names the categories a
    partial mean leaves out, as in its other formats).
    """
    out = Path(out)
    header = "".join(f"<th>{html.escape(k)}</th>" for k in ("category", *METRIC_KEYS))
    body = []
    for row in rows:
        category = html.escape(str(row["category"]))
        cells = "".join(_cell(row.get(k)) for k in METRIC_KEYS)
        count = row.get("n_samples")
        body.append(
            f'<tr><td><a href="#cat-{category}">{category}</a></td>{cells}'
            f"<td>{'' if count is None else int(count)}</td></tr>"
        )
    mean_cells = "".join(_cell(mean.get(k)) for k in METRIC_KEYS)
    body.append(f'<tr class="mean"><td>mean</td>{mean_cells}<td></td></tr>')
    chart = _data_uri(_bar_chart(rows, mean))
    older = ""
    if superseded:
        items = "".join(
            f"<li><code>{html.escape(str(r['run_dir']))}</code></li>" for r in superseded
        )
        older = f'<p class="note">older runs not counted:</p><ul>{items}</ul>'
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>VSAD report</title>
<style>{_STYLE}</style>
<script>{_CHECK_SCRIPT}</script>
</head>
<body>
<h1>VSAD report</h1>
<p class="note">{len(rows)} categories; metrics in percent, the newest run of each category;
mean over categories. Pixel metrics are binned, view and sample metrics exact.</p>
<table id="metrics">
<thead><tr>{header}<th>n_samples</th></tr></thead>
<tbody>
{chr(10).join(body)}
</tbody>
</table>
<p class="note">{html.escape(mean_note)}</p>
{older}
<img class="chart" src="{chart}" alt="metrics per category">
{chr(10).join(_category_section(row, out) for row in rows)}
</body>
</html>
"""
    path = out / PAGE_NAME
    atomic_write_text(path, page)
    return path
