"""``vsad-homography``: estimate a category's homographies and write the cache JSON.

Contract: ``--root`` is a dataset root (Real-IAD layout by default); every ordered pair of the
category's views gets a homography mapping pixel-centre coordinates of the source view to the
target view at the dataset's stored image size, estimated from ``--samples`` normal training
samples (SIFT, ratio test, pooled matches, one MAGSAC++ fit per pair;
docs/datasets.md#homography-estimation). The per-pair table is printed; the JSON goes to
``<root>/vsad_cache/homographies_<category>_<resolution>.json`` unless ``--out`` says
otherwise. The file is (re)built every time this command runs.
"""

from __future__ import annotations

import argparse
import time

from vsad_lightning.cli._common import report_data_errors
from vsad_lightning.data.homographies import (
    DATASET_KINDS,
    default_cache_for,
    ensure_homography_cache,
)
from vsad_lightning.geometry.estimation import format_report


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
    args = parser.parse_args(argv)

    path = args.out or default_cache_for(args.dataset, args.root, args.category, args.resolution)
    views = [v.strip() for v in args.views.split(",") if v.strip()] if args.views else None
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


if __name__ == "__main__":
    raise SystemExit(main())
