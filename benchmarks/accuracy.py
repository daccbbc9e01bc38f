"""Accuracy ablations side by side: full VSAD vs its parts switched off, on the synthetic rig.

Every variant is one set of ``vsad-fit`` overrides on top of one base config; each variant is
trained and tested on every category with the same seeds, through the same ``fit_main`` users
run. Results: ``<out>/accuracy.md`` (per category and mean) and ``<out>/accuracy.png`` (mean
bars), plus the runs under ``<out>/runs/<variant>/``.

    python benchmarks/accuracy.py                       # the whole table (long on a CPU)
    python benchmarks/accuracy.py --quick               # 64 px, 1 epoch: a smoke-scale table
    python benchmarks/accuracy.py --variants full single_view

Variants:
- ``full``: the base config as it is (the demo's: 64 px, positional bank, latent level).
- ``mvam_off`` / ``frm_off``: ``model.use_mvam`` / ``model.use_frm`` false.
- ``R1`` / ``R3`` / ``R5``: MVAM's candidate window ``model.window``.
- ``levels_last`` / ``levels_last2`` / ``levels_last3``: ``model.feature_levels``.
- ``noise_mode``: ``model.feature_mode noise`` instead of DDIM inversion.
- ``single_view``: the PatchCore-style baseline: the same backbone, features and training
  budget, no MVAM, no FRM, each view scored on its own against one global bank, raw distances.
- ``global_bank`` / ``no_norm`` / ``no_latent``: the scoring choices of the embedded default
  (docs/choices.md), each switched back to the paper's on its own: the whole-bank search,
  no feature normalisation, no latent level (``model.latent_weight 0``).
- ``no_calibration``: raw distances (``model.calibration none``) instead of the demo's scores
  standardised per position and per view on the training normals.

``--reuse`` keeps a (variant, category) run that already has a ``metrics.json`` under
``--work`` instead of training it again (same config and data assumed: use it to resume an
interrupted table, not after changing either). The table is rewritten after every variant, so
an interrupted run still leaves the finished rows. ``benchmarks/accuracy_findings.md`` (what
helped and what did not, measured by hand) is appended to ``accuracy.md`` when present.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import yaml

from vsad_lightning.cli.run import fit_main
from vsad_lightning.data.synthetic import write_synthetic_dataset
from vsad_lightning.metrics.export import collect_metrics

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shared import cpu_model  # noqa: E402

VARIANTS: dict[str, list[str]] = {
    "full": [],
    "mvam_off": ["--model.use_mvam", "false"],
    "frm_off": ["--model.use_frm", "false"],
    "R1": ["--model.window", "1"],
    "R3": ["--model.window", "3"],
    "R5": ["--model.window", "5"],
    "levels_last": ["--model.feature_levels", "[-1]"],
    "levels_last2": ["--model.feature_levels", "[-2, -1]"],
    "levels_last3": ["--model.feature_levels", "[-3, -2, -1]"],
    "noise_mode": ["--model.feature_mode", "noise"],
    "single_view": [
        "--model.use_mvam", "false", "--model.use_frm", "false", "--model.bank_mode", "global",
        "--model.calibration", "none",
    ],
    "global_bank": ["--model.bank_mode", "global"],
    "no_norm": ["--model.feature_norm", "none"],
    "no_latent": ["--model.latent_weight", "0.0"],
    "no_calibration": ["--model.calibration", "none"],
    # Does alignment help where the score rests on the U-Net levels alone?
    "no_latent_mvam_off": ["--model.latent_weight", "0.0", "--model.use_mvam", "false"],
}  # fmt: skip
FINDINGS = Path(__file__).with_name("accuracy_findings.md")
SHOWN = ("sample_auroc", "view_auroc", "pixel_auroc", "pixel_aupro")


def effective_overrides(name: str, config: Path) -> list[str]:
    """The variant's overrides that change something: pairs whose value the config already
    has are dropped (``R3`` is the demo's own window, so it is the ``full`` run)."""
    doc = yaml.safe_load(config.read_text())
    pairs = VARIANTS[name]
    kept = []
    for key, value in zip(pairs[::2], pairs[1::2], strict=True):
        section, option = key.removeprefix("--").split(".", 1)
        if (doc.get(section) or {}).get(option) != yaml.safe_load(value):
            kept += [key, value]
    return kept


def run_variant(
    name: str, base: list[str], data: Path, categories: list[str], runs: Path, reuse: bool
) -> list[dict]:
    """Fit and test one variant on every category; returns the metrics rows."""
    root = runs / name
    done = {row["category"] for row in collect_metrics(root)} if reuse and root.is_dir() else set()
    for category in categories:
        if category in done:
            print(f"{name:>16} {category:>8}: reused", flush=True)
            continue
        args = [
            *base,
            "--data.root", str(data),
            "--data.category", category,
            "--trainer.default_root_dir", str(root),
            *VARIANTS[name],
        ]  # fmt: skip
        start = time.perf_counter()
        # The fit prints its own table; keep the benchmark's output to one line per run.
        with contextlib.redirect_stdout(io.StringIO()):
            code = fit_main(args)
        if code != 0:
            raise SystemExit(f"{name}/{category}: vsad-fit exited with {code}")
        print(f"{name:>16} {category:>8}: {time.perf_counter() - start:6.1f} s", flush=True)
    rows = {row["category"]: row for row in collect_metrics(root)}  # newest wins (sorted)
    return [rows[c] for c in categories]


def markdown(results: dict[str, list[dict]], categories: list[str], header: str) -> str:
    lines = [header, ""]
    lines.append("| variant | " + " | ".join(f"{k} (mean)" for k in SHOWN) + " |")
    lines.append("|---|" + "---|" * len(SHOWN))
    for name, rows in results.items():
        means = [np.mean([r[k] for r in rows]) for k in SHOWN]
        lines.append(f"| {name} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    lines += ["", "Per category (sample / view / pixel AUROC / AUPRO):", ""]
    lines.append("| variant | " + " | ".join(categories) + " |")
    lines.append("|---|" + "---|" * len(categories))
    for name, rows in results.items():
        cells = [" / ".join(f"{r[k]:.3f}" for k in SHOWN) for r in rows]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(results: dict[str, list[dict]], path: Path) -> None:
    """Grouped bars of the mean metrics per variant, drawn with OpenCV (already a dependency)."""
    colours = [(180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214)]  # BGR
    names = list(results)
    group, bar, left, top, height = 18 + 14 * len(SHOWN), 14, 70, 40, 300
    # Wide enough for the bars and for the legend (150 px per metric).
    width = max(left + group * len(names) + 20, left + 150 * len(SHOWN))
    # Room below the axis for the rotated 120 px labels that start 12 px under it.
    image = np.full((top + height + 12 + 120 + 8, width, 3), 255, np.uint8)
    for tick in np.linspace(0, 1, 6):
        y = int(top + height * (1 - tick))
        cv2.line(image, (left - 5, y), (width - 10, y), (220, 220, 220), 1)
        cv2.putText(image, f"{tick:.1f}", (20, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 0, 1)
    for i, name in enumerate(names):
        x0 = left + i * group + 9
        for j, key in enumerate(SHOWN):
            value = float(np.mean([r[key] for r in results[name]]))
            y = int(top + height * (1 - value))
            x = x0 + j * bar
            cv2.rectangle(image, (x, y), (x + bar - 2, top + height), colours[j], -1)
        label_origin = (x0, top + height + 12)
        # Variant names are written downwards so long names fit under narrow groups.
        text = np.full((16, 120, 3), 255, np.uint8)
        cv2.putText(text, name, (2, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
        text = cv2.rotate(text, cv2.ROTATE_90_CLOCKWISE)
        h, w = text.shape[:2]
        image[label_origin[1] : label_origin[1] + h, label_origin[0] : label_origin[0] + w] = text
    for j, key in enumerate(SHOWN):
        x = left + j * 150
        cv2.rectangle(image, (x, 10), (x + 12, 22), colours[j], -1)
        cv2.putText(image, key, (x + 16, 21), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 0, 1)
    cv2.imwrite(str(path), image)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--out", default="benchmarks/results", type=Path)
    parser.add_argument("--work", default="runs/accuracy", type=Path, help="Data and runs.")
    parser.add_argument("--categories", default="brick,gravel,coffee")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the synthetic data.")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--quick", action="store_true", help="1 epoch on 16 training samples: a smoke table."
    )
    parser.add_argument("--reuse", action="store_true", help="Keep finished runs in --work.")
    args, extra = parser.parse_known_args(argv)

    # The demo's data: 128 px renders (the config's data.resolution), the generator's default
    # number of training samples; --quick shrinks both the data and the training.
    size, train = (64, 16) if args.quick else (128, None)
    scale = "quick" if args.quick else "full"
    data = args.work / f"data_{scale}"
    categories = args.categories.split(",")
    if not (data / "realiad_jsons").is_dir():
        sizes = {"samples_train": train} if train else {}
        write_synthetic_dataset(
            data, categories, args.seed, image_size=size, progress=print, **sizes
        )
    base = ["--config", args.config, "--data.resolution", str(size)]
    base += ["--seed_everything", str(args.seed), "--pictures.num_samples", "0"]
    if args.quick:
        base += ["--trainer.max_epochs", "1"]
    base += extra

    start = time.perf_counter()
    results: dict[str, list[dict]] = {}
    args.out.mkdir(parents=True, exist_ok=True)
    runs = args.work / f"runs_{scale}"
    command = " ".join(["python benchmarks/accuracy.py", *(sys.argv[1:] if argv is None else argv)])
    same_as: dict[tuple[str, ...], str] = {}  # effective overrides -> the variant that ran them
    for name in args.variants:
        key = tuple(effective_overrides(name, Path(args.config)))
        if key in same_as:
            # Identical to a variant already run (same config, same seeds): its rows.
            print(f"{name:>16}: the same run as {same_as[key]}", flush=True)
            results[f"{name} (= {same_as[key]})"] = results[same_as[key]]
        else:
            same_as[key] = name
            results[name] = run_variant(name, base, data, categories, runs, args.reuse)
        minutes = (time.perf_counter() - start) / 60
        header = (
            f"# Accuracy ablations\n\n`{command}` on {cpu_model()}, {scale} scale "
            f"({size} px renders), config `{args.config}` + `{' '.join(extra)}`, categories "
            f"{categories}, data seed {args.seed}; this invocation took {minutes:.1f} min "
            f"({len(results)} of {len(args.variants)} variants; runs kept by --reuse cost "
            f"nothing here, about 8 min per variant on a quiet machine)."
        )
        table = markdown(results, categories, header)
        if FINDINGS.is_file():
            table += "\n" + FINDINGS.read_text()
        (args.out / "accuracy.md").write_text(table)
        bar_chart(results, args.out / "accuracy.png")
        (args.out / "accuracy.json").write_text(json.dumps({"header": header, "results": results}))
    print(markdown(results, categories, header))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
