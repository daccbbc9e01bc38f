"""``python -m vsad_lightning.cli.demo``: the whole method end to end on synthetic data.

synthetic data (``vsad-synth``) -> homographies (estimated by ``vsad-fit`` on first use) ->
fit -> memory bank -> test, one run per category -> one table (``vsad-report``).
This is what ``make demo`` runs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vsad_lightning.cli._common import report_data_errors
from vsad_lightning.cli.report import report_main
from vsad_lightning.cli.run import fit_main
from vsad_lightning.cli.synth import main as synth_main


@report_data_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="Folder for the data and the runs.")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the synthetic data.")
    parser.add_argument("--categories", default="3", help="How many categories, or names.")
    args, fit_overrides = parser.parse_known_args(argv)

    out = Path(args.out)
    data_root, runs_root = out / "data", out / "runs"
    start = time.perf_counter()
    if not (data_root / "realiad_jsons").is_dir():
        synth_main(
            ["--out", str(data_root), "--categories", args.categories, "--seed", str(args.seed)]
        )
    categories = sorted(p.stem for p in (data_root / "realiad_jsons").glob("*.json"))
    for category in categories:
        print(f"\n=== {category} ===", flush=True)
        fit_main(
            [
                "--config", args.config,
                "--data.root", str(data_root),
                "--data.category", category,
                "--trainer.default_root_dir", str(runs_root),
                *fit_overrides,
            ]
        )  # fmt: skip
    print("\n=== report ===")
    report_main([str(runs_root)])
    minutes = (time.perf_counter() - start) / 60
    print(f"\ndemo finished in {minutes:.1f} min")
    print(f"TensorBoard: tensorboard --logdir {runs_root}")
    print(f"pictures:    {runs_root}/<dataset>/<category>/version_N/images/")
    summary = json.loads((runs_root / "report.json").read_text())
    print(f"mean: {json.dumps(summary['mean'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
