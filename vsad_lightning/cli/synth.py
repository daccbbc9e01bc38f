"""``vsad-synth``: write a synthetic multi-view dataset in the exact Real-IAD layout.

Per category: ``<out>/realiad_<image-size>/<category>/{OK,NG}/...`` (JPEG quality 95 views,
PNG masks), ``<out>/realiad_jsons/<category>.json`` and the true homographies in
``<out>/synthetic_truth/<category>.json`` (the ``vsad-homography`` JSON format).

``--rig simple`` (default; ``vsad_lightning.data.synthetic``): one plane, fixed exact
homographies; 128 px views, 80 normal training samples and 24 test samples (half of them
anomalous) per category. ``--rig realistic`` (``vsad_lightning.data.realistic_rig``): tilted,
rolled cameras, a table, moving highlights and a per-sample placement of the part, whose own
true homographies go to ``<out>/synthetic_truth/<category>_samples.json``; 256 px views, 40
training and 44 test samples (22 anomalous). The size flags override either. Three categories
by default (``--categories all`` for every one of the rig). The same ``--seed`` writes
byte-identical files.
"""

from __future__ import annotations

import argparse

from vsad_lightning.cli._common import report_data_errors
from vsad_lightning.data.synthetic import (
    RIG_DEFAULTS,
    RIGS,
    rig_categories,
    write_synthetic_dataset,
)


@report_data_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vsad-synth", description=__doc__.splitlines()[0].split(": ", 1)[1]
    )
    parser.add_argument("--out", required=True, help="Dataset root to write.")
    parser.add_argument(
        "--rig", choices=RIGS, default="simple", help="Scene: simple or realistic (see above)."
    )
    names = {rig: ", ".join(rig_categories(rig)) for rig in RIGS}
    parser.add_argument(
        "--categories",
        default="3",
        help="How many categories, 'all', or comma-separated names; simple rig: "
        f"{names['simple']}; realistic rig: {names['realistic']}.",
    )
    parser.add_argument("--seed", type=int, default=0)

    def default(key: str) -> str:
        return "rig default: " + ", ".join(f"{r} {RIG_DEFAULTS[r][key]}" for r in RIGS)

    parser.add_argument(
        "--samples-train",
        type=int,
        default=None,
        help=f"Normal training samples ({default('samples_train')}).",
    )
    parser.add_argument(
        "--samples-test", type=int, default=None, help=f"Test samples ({default('samples_test')})."
    )
    parser.add_argument(
        "--anomaly-fraction", type=float, default=0.5, help="Fraction of anomalous test samples."
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help=f"View size in px; the folder is realiad_<N> ({default('image_size')}).",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace categories vsad-synth wrote before."
    )
    args = parser.parse_args(argv)
    written = write_synthetic_dataset(
        args.out,
        args.categories,
        args.seed,
        image_size=args.image_size,
        samples_train=args.samples_train,
        samples_test=args.samples_test,
        anomaly_fraction=args.anomaly_fraction,
        overwrite=args.overwrite,
        progress=lambda line: print(line, flush=True),
        rig=args.rig,
    )
    size = args.image_size or RIG_DEFAULTS[args.rig]["image_size"]
    print(f"wrote {len(written)} categories to {args.out} ({args.rig} rig, resolution {size})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
