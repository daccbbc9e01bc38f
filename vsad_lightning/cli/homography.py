"""``vsad-homography``: estimate a category's homographies and write the cache JSON.

Contract: ``--root`` is a dataset root (Real-IAD layout by default); every ordered pair of the
category's views gets a homography mapping pixel-centre coordinates of the source view to the
target view at the dataset's stored image size, estimated from ``--samples`` normal training
samples (SIFT, ratio test, pooled matches, one MAGSAC++ fit per pair;
docs/datasets.md#homography-estimation). The per-pair table is printed; the JSON goes to
``<root>/vsad_cache/homographies_<category>_<resolution>.json`` unless ``--out`` says
otherwise. The file is (re)built every time this command runs.

``--per-sample`` estimates every sample of ``--split`` on its own instead (parts are placed by
hand, so each sample's homographies differ from the category's by a few pixels), with the
category cache as prior (loaded, or built first when missing) over the neighbour pairs of
``--graph`` (reliable ones, and unreliable ones a bridge view can compose), and writes
``{"image_size": [W, H], "samples": {"<sample id>": {"C1->C2": {"H": [[...]], "status":
"refined" | ...}, ...}}}`` (plus the ``prior`` and ``sources`` fingerprints) to ``--out``,
default ``<root>/vsad_cache/homographies_<category>_<resolution>_samples_<split>.json``: the
file the DataModule reads, so a later ``vsad-fit`` reuses it (``data.sample_homographies``,
``geometry.per_sample``). Every sample is re-estimated each time this command runs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from vsad_lightning.cli._common import report_data_errors
from vsad_lightning.data.homographies import (
    DATASET_KINDS,
    default_cache_for,
    ensure_homography_cache,
    index_split,
)
from vsad_lightning.data.sample_homographies import ensure_sample_homographies, sample_cache_path
from vsad_lightning.geometry.cache import HomographyCache
from vsad_lightning.geometry.estimation import format_report
from vsad_lightning.geometry.per_sample import SAMPLE_STATUSES, graph_pairs
from vsad_lightning.geometry.projection import NEIGHBOUR_GRAPHS


@report_data_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vsad-homography", description=__doc__.splitlines()[0].split(": ", 1)[1]
    )
    parser.add_argument("--root", required=True, help="Dataset root.")
    parser.add_argument("--category", required=True, help="Category (MANTA: domain/class).")
    parser.add_argument(
        "--resolution", default="256", help="Real-IAD folder realiad_<resolution> (int or raw)."
    )
    parser.add_argument("--out", default=None, help="Cache file (default inside ROOT/vsad_cache).")
    parser.add_argument("--samples", type=int, default=8, help="Normal samples pooled (K).")
    parser.add_argument("--dataset", choices=DATASET_KINDS, default="realiad")
    parser.add_argument("--views", default=None, help="Comma-separated subset, e.g. C1,C2,C3.")
    parser.add_argument("--num-views", type=int, default=5, help="Views per MANTA strip.")
    parser.add_argument("--quiet", action="store_true", help="Only the table, no progress.")
    parser.add_argument(
        "--per-sample",
        action="store_true",
        help="Estimate each sample of --split on its own, with the category cache as prior.",
    )
    parser.add_argument("--split", choices=("train", "test"), default="test")
    parser.add_argument(
        "--graph",
        choices=NEIGHBOUR_GRAPHS,
        default="top_and_ring",
        help="Neighbour pairs estimated per sample (top_and_ring: the first view is the top).",
    )
    args = parser.parse_args(argv)

    views = [v.strip() for v in args.views.split(",") if v.strip()] if args.views else None
    say = (lambda line: None) if args.quiet else (lambda line: print(line, flush=True))
    start = time.perf_counter()
    category_cache = default_cache_for(args.dataset, args.root, args.category, args.resolution)
    # The category cache is rebuilt, or with --per-sample loaded as the prior (built if missing).
    path = category_cache if args.per_sample else (args.out or category_cache)
    cache = ensure_homography_cache(
        args.root,
        args.category,
        args.resolution,
        args.samples,
        dataset=args.dataset,
        path=path,
        views=views,
        num_views=args.num_views,
        rebuild=not args.per_sample,
        progress=say,
    )
    if args.per_sample:
        default = sample_cache_path(category_cache, args.split)
        return _per_sample(args, views, cache, args.out or default, say, start)
    print(format_report(cache))
    print(f"wrote {path} ({time.perf_counter() - start:.1f} s)")
    return 0


def _per_sample(
    args: argparse.Namespace,
    views: list[str] | None,
    prior: HomographyCache,
    path: Path,
    say: Callable[[str], None],
    start: float,
) -> int:
    """``--per-sample``: every sample of the split, with the category cache ``prior``; writes
    ``path``. ``start``: when the command started (the printed seconds include the prior)."""
    records, view_order = index_split(
        args.dataset, args.root, args.category, args.split, args.resolution, views, args.num_views
    )
    timings: dict[str, float] = {}
    result = ensure_sample_homographies(
        records,
        prior,
        graph_pairs(prior, view_order, args.graph, bridged=True),
        path,
        split=args.split,
        write=True,
        rebuild=True,
        progress=say,
        timings=timings,
    )
    counts = {**dict.fromkeys(SAMPLE_STATUSES, 0), **result.status_counts()}
    n = len(result.samples)
    stages = ", ".join(f"{k} {v / n:.0f}" for k, v in timings.items())
    W, H = result.image_size
    print(
        f"per-sample homographies of {args.category!r} {args.split}: {n} samples at {W}x{H} px, "
        f"pairs by status: " + ", ".join(f"{k} {v}" for k, v in counts.items())
    )
    print(f"CPU ms per sample: {stages}")
    print(f"wrote {path} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
