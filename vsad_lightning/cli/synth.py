"""``vsad-synth``: write a synthetic multi-view dataset in the exact Real-IAD layout.

Per category: ``<out>/realiad_<image-size>/<category>/{OK,NG}/...`` (JPEG quality 95 views,
PNG masks), ``<out>/realiad_jsons/<category>.json`` and the true homographies in
``<out>/synthetic_truth/<category>.json`` (the ``vsad-homography`` JSON format). Defaults are
sized for a CPU demo: 128 px views, 24 normal training samples and 24 test samples (half of
them anomalous) per category, three categories. The same ``--seed`` writes byte-identical
files. See ``vsad_lightning.data.synthetic`` for the scene.
"""

from __future__ import annotations

import argparse

from vsad_lightning.cli._common import report_data_errors
from vsad_lightning.data.synthetic import CATEGORIES, write_synthetic_dataset


@report_data_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vsad-synth", description=__doc__.splitlines()[0].split(": ", 1)[1]
    )
    parser.add_argument("--out", required=True, help="Dataset root to write.")
    parser.add_argument(
        "--categories",
        default="3",
        help=f"How many categories, or comma-separated names from {', '.join(CATEGORIES)}.",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-train", type=int, default=80, help="Normal training samples.")
    parser.add_argument("--samples-test", type=int, default=24, help="Test samples.")
    parser.add_argument(
        "--anomaly-fraction", type=float, default=0.5, help="Fraction of anomalous test samples."
    )
    parser.add_argument(
        "--image-size", type=int, default=128, help="View size in px; the folder is realiad_<N>."
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace categories vsad-synth wrote before."
    )
    args = parser.parse_args(argv)
    names = write_synthetic_dataset(
        args.out,
        args.categories,
        args.seed,
        image_size=args.image_size,
        samples_train=args.samples_train,
        samples_test=args.samples_test,
        anomaly_fraction=args.anomaly_fraction,
        overwrite=args.overwrite,
        progress=lambda line: print(line, flush=True),
    )
    print(f"wrote {len(names)} categories to {args.out} (resolution {args.image_size})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
