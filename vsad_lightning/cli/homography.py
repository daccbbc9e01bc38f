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
category cache as prior (loaded, or built first when missing) over the reliable neighbour
pairs of ``--graph``, and writes ``{"image_size": [W, H], "samples": {"<sample id>":
{"C1->C2": {"H": [[...]], "status": "refined" | "matched" | "prior"}, ...}}}`` to ``--out``
(default ``<root>/vsad_cache/homographies_<category>_<resolution>_<split>_samples.json``;
``geometry.per_sample``).
"""

from __future__ import annotations

import argparse
import time

from vsad_lightning.cli._common import report_data_errors
from vsad_lightning.data.homographies import (
    DATASET_KINDS,
    build_sample_homographies,
    default_cache_for,
    default_sample_file_for,
    ensure_homography_cache,
)
from vsad_lightning.geometry.estimation import format_report
from vsad_lightning.geometry.per_sample import SAMPLE_STATUSES
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
    if args.per_sample:
        return _per_sample(args, views)
    path = args.out or default_cache_for(args.dataset, args.root, args.category, args.resolution)
    start = time.perf_counter()
    cache = ensure_homography_cache(
        args.root,
        args.category,
        args.resolution,
        args.samples,
        dataset=args.dataset,
        path=path,
        views=views,
        num_views=args.num_views,
        rebuild=True,
        progress=None if args.quiet else (lambda line: print(line, flush=True)),
    )
    print(format_report(cache))
    print(f"wrote {path} ({time.perf_counter() - start:.1f} s)")
    return 0


def _per_sample(args: argparse.Namespace, views: list[str] | None) -> int:
    """``--per-sample``: the prior (built when missing), then every sample of the split."""
    say = (lambda line: None) if args.quiet else (lambda line: print(line, flush=True))
    start = time.perf_counter()
    prior = ensure_homography_cache(
        args.root,
        args.category,
        args.resolution,
        args.samples,
        dataset=args.dataset,
        views=views,
        num_views=args.num_views,
        progress=say,
    )
    path = args.out or default_sample_file_for(
        args.dataset, args.root, args.category, args.resolution, args.split
    )
    timings: dict[str, float] = {}
    result = build_sample_homographies(
        args.root,
        args.category,
        prior,
        args.resolution,
        args.split,
        dataset=args.dataset,
        views=views,
        num_views=args.num_views,
        graph=args.graph,
        progress=say,
        timings=timings,
    )
    result.save(path)
    counts = dict.fromkeys(SAMPLE_STATUSES, 0)
    for sample in result.samples.values():
        for status in sample.status.values():
            counts[status] += 1
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
