"""Accuracy ablations side by side: full VSAD against its parts switched off, per category.

Two kinds of variant:

- **fit variants** (``FIT_VARIANTS``): one set of ``vsad-fit`` overrides on top of one base
  config; each is trained and tested on every category and seed through the same ``fit_main``
  users run (``--fits``).
- **scoring variants** (``SCORING_VARIANTS``): scoring options that need no new training
  (calibration, cross-view fusion, which levels are scored, the paper's scoring). They are
  evaluated on each fit's ``final.ckpt`` in this process: the test features are extracted once
  (the U-Net passes are the expensive part) and scored under every variant with the model's
  own ``VSADModule.score_extracted``; where a variant changes what the normals' leave-one-out
  maps depend on (levels, bank mode), the calibration is refitted from the bank, on normals
  only. The variant ``as_fitted`` must reproduce ``vsad-fit``'s own ``metrics.json``; the script
  checks that it does.

    python benchmarks/accuracy.py                                  # realistic rig, all categories
    python benchmarks/accuracy.py --rig simple --categories brick,gravel,coffee --seeds 0
    python benchmarks/accuracy.py --quick                          # smoke scale

Every category is reported, with the mean and the spread over seeds. A seed sets both the
synthetic data (``vsad-synth --seed``) and the training (``seed_everything``). Results:
``<out>/accuracy_<rig>.md`` / ``.json`` / ``.png``; runs under ``<work>/runs_<rig>/``.

Fit variants:
- ``full``: the base config as it is.
- ``mvam_off`` / ``frm_off``: ``model.use_mvam`` / ``model.use_frm`` false. FRM off also
  drops L_r, FRM's loss (``VSADModule``), here and in every variant without FRM; results
  measured before that change were rerun (README, ``results/accuracy_simple.md``).
- ``single_view``: the PatchCore-style baseline: the same backbone, features and training
  budget, no MVAM, no FRM, each view scored on its own against one global bank of a 1 %
  greedy coreset (PatchCore-1 %) with the raw distances (no calibration, no fusion). The
  coreset also keeps its test-time search affordable: the whole global bank of the realistic
  rig's latent level at 256 px (819,200 rows) costs ~1.6 TFLOP per test sample on 2 cores.
- ``per_sample_h_off``: the category's homographies for every sample
  (``data.per_sample_homographies false``) in training, MVAM and fusion.
- ``registered`` (and ``registered_mvam_off``, ``registered_per_sample_h_off``,
  ``registered_single_view``): every sample's views registered to the category's reference
  pose first (``data.register_views true``).
- ``R1`` / ``R5``, ``levels_*``, ``noise_mode``: MVAM's window, the feature levels, the
  feature mode.

``--reuse`` keeps a (variant, category, seed) run that already has a ``metrics.json``.

Per defect type: for every fit's runs, the sample AUROC of the anomalous test samples of one
defect type (the Real-IAD folder ``NG/<code>/``: scratch HS, stain ZW, hole QS, pasted patch YW)
against all normal test samples, from the run's ``scores.csv``.

``--merge A.json B.json ...`` writes one report from earlier invocations' tables (later files
add to and replace cells of earlier ones) without fitting anything, e.g. seeds or fit variants
run separately; the per-defect-type table is read from the run folders under ``--work``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml

from vsad_lightning.cli.run import fit_main
from vsad_lightning.data.datamodule import MultiViewDataModule, resolved_image_size
from vsad_lightning.data.realistic_rig import REALISTIC_DEFECT_CODES
from vsad_lightning.data.synthetic import resolve_categories, write_synthetic_dataset
from vsad_lightning.metrics import AnomalyMetrics
from vsad_lightning.metrics.curves import exact_auroc
from vsad_lightning.system.module import VSADModule, update_metrics

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shared import cpu_model  # noqa: E402

FIT_VARIANTS: dict[str, list[str]] = {
    "full": [],
    "mvam_off": ["--model.use_mvam", "false"],
    "frm_off": ["--model.use_frm", "false"],
    "single_view": [
        "--model.use_mvam", "false", "--model.use_frm", "false", "--model.bank_mode", "global",
        "--model.calibration", "none", "--model.fusion_strength", "0.0",
        "--bank.coreset_ratio", "0.01",
    ],
    "per_sample_h_off": ["--data.per_sample_homographies", "false"],
    "registered": ["--data.register_views", "true"],
    "registered_mvam_off": ["--data.register_views", "true", "--model.use_mvam", "false"],
    "registered_per_sample_h_off": [
        "--data.register_views", "true", "--data.per_sample_homographies", "false",
    ],
    "registered_single_view": [
        "--data.register_views", "true", "--model.use_mvam", "false", "--model.use_frm", "false",
        "--model.bank_mode", "global", "--model.calibration", "none",
        "--model.fusion_strength", "0.0", "--bank.coreset_ratio", "0.01",
    ],
    "R1": ["--model.window", "1"],
    "R5": ["--model.window", "5"],
    "levels_last": ["--model.feature_levels", "[-1]"],
    "levels_last3": ["--model.feature_levels", "[-3, -2, -1]"],
    "noise_mode": ["--model.feature_mode", "noise"],
}  # fmt: skip

SCORING_VARIANTS: dict[str, dict] = {
    "as_fitted": {},
    "fusion_off": {"fusion_strength": 0.0},
    "fusion_0.5": {"fusion_strength": 0.5},
    "fusion_1.0": {"fusion_strength": 1.0},
    "calibration_off": {"calibration": "none"},
    "view_calibration": {"calibration": "view"},
    "latent_only": {"unet_weight": 0.0},
    "unet_only": {"latent_weight": 0.0},
    "latent_weight_4": {"latent_weight": 4.0},
    "latent_weight_8": {"latent_weight": 8.0},
    "latent_weight_16": {"latent_weight": 16.0},
    "sigma_1": {"sigma": 1.0},
    "sigma_4": {"sigma": 4.0},
    "radius_1": {"positional_radius": 1},
    "radius_3": {"positional_radius": 3},
    "radius_4": {"positional_radius": 4},
    "radius_6": {"positional_radius": 6},
    # The paper's scoring: U-Net levels only, one global bank, raw distances, no fusion.
    "paper_scoring": {
        "latent_weight": 0.0, "bank_mode": "global", "calibration": "none", "fusion_strength": 0.0,
    },
}  # fmt: skip
"""Scoring options evaluated on a fitted model; ``unet_weight`` sets every decoder level's
``w_l``. Variants that do not apply to a fit (fusion on an uncalibrated one) are skipped.
Names joined by ``+`` compose, later ones winning (``fusion_1.0+latent_only``)."""


def scoring_options(name: str) -> dict:
    """The options of a scoring variant name, composed across ``+`` (``SCORING_VARIANTS``)."""
    options: dict = {}
    for part in name.split("+"):
        if part not in SCORING_VARIANTS:
            known = ", ".join(SCORING_VARIANTS)
            raise ValueError(f"unknown scoring variant {part!r} in {name!r}; known: {known}")
        options.update(SCORING_VARIANTS[part])
    return options


def _scoring_name(name: str) -> str:
    """argparse type: a valid (possibly composed) scoring variant name."""
    try:
        scoring_options(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return name


SHOWN = ("sample_auroc", "view_auroc", "pixel_auroc", "pixel_aupro")
DECISIONS = ("sample_f1", "sample_fpr", "sample_fnr")
FINDINGS = str(Path(__file__).with_name("accuracy_findings_{rig}.md"))
"""The hand-written reading of a rig's results, appended to its report (kept next to the script
so that a regenerated report keeps it)."""


def run_fit(name: str, base: list[str], data: Path, category: str, root: Path, reuse: bool) -> Path:
    """Fit and test one variant on one category; returns its run folder."""
    folder = root / "realiad" / category
    done = sorted(folder.glob("version_*/metrics.json")) if reuse else []
    if done:
        print(f"  {name:>16} {category:>9}: reused", flush=True)
        return done[-1].parent
    args = [
        *base, "--data.root", str(data), "--data.category", category,
        "--trainer.default_root_dir", str(root), *FIT_VARIANTS[name],
    ]  # fmt: skip
    start = time.perf_counter()
    # The fit prints its own table; keep the benchmark's output to one line per run.
    with contextlib.redirect_stdout(io.StringIO()):
        code = fit_main(args)
    if code != 0:
        raise SystemExit(f"{name}/{category}: vsad-fit exited with {code}")
    print(f"  {name:>16} {category:>9}: {time.perf_counter() - start:6.1f} s", flush=True)
    return sorted(folder.glob("version_*/metrics.json"))[-1].parent


def _load(run: Path) -> tuple[VSADModule, MultiViewDataModule]:
    """The fitted model (weights-only) and its test data, from the run folder's config."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    # data.image_size is linked to model.image_size, so config.yaml keeps it under data only.
    size = resolved_image_size(config["data"]["image_size"], config["data"]["resolution"])
    module = VSADModule(**{"image_size": size, **config["model"]})
    state = torch.load(run / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=True)
    module.load_state_dict(state["state_dict"])
    data = MultiViewDataModule(**config["data"])
    data.prepare_data()
    data.setup("test")
    return module.eval(), data


def _refit_calibration(module: VSADModule) -> None:
    """Leave-one-out maps of the normals under the module's current scoring settings (the
    bank's own features, normals only) and the calibration fitted from them."""
    bank, calibration = module.memory_bank, module.calibration
    levels = [level for level in bank.levels if level in module.level_weights]
    n = bank.num_samples(levels[0])

    def features_of(ids):
        return {level: bank.sample_features(level, ids) for level in levels}

    size = tuple(calibration.position_center.shape[1:][::-1])
    maps = module.leave_one_out_maps(torch.arange(n), features_of, size)
    module.fit_calibration(maps, calibration.normal_homographies, calibration.neighbour_mask.bool())


def evaluate_scoring(run: Path, names: list[str]) -> dict[str, dict]:
    """Metrics of each scoring variant on one fitted run (module docstring)."""
    expected = json.loads((run / "metrics.json").read_text())
    if names == ["as_fitted"]:
        # Nothing to rescore: vsad-fit's own numbers are the row (the U-Net passes of a
        # re-extraction would only repeat them; the check below runs whenever a variant does).
        return {"as_fitted": {k: float(v) for k, v in expected.items() if k != "category"}}
    module, data = _load(run)
    fitted = dict(module.hparams)
    calibrated = module.calibration.is_fitted()
    with torch.no_grad():
        batches = [(b, module.extract_features(b)) for b in data.test_dataloader()]
    results = {}
    for name in names:
        options = scoring_options(name)
        module.hparams.update(fitted)
        unet_weight = options.pop("unet_weight", None)
        if unet_weight is not None:
            options["level_weights"] = [unet_weight] * len(module.feature_levels)
        module.hparams.update(options)
        needs_calibration = (
            module.hparams.calibration != "none" or module.hparams.fusion_strength > 0
        )
        if needs_calibration and not calibrated:
            continue
        relevant = ("level_weights", "latent_weight", "bank_mode", "sigma", "positional_radius")
        if calibrated and any(module.hparams[k] != fitted[k] for k in relevant):
            _refit_calibration(module)
        metrics = AnomalyMetrics()
        for batch, features in batches:
            used = {level: f for level, f in features.items() if level in module.level_weights}
            update_metrics(metrics, batch, module.score_extracted(batch, used))
        results[name] = {k: float(v) for k, v in metrics.compute().items()}
        if calibrated and any(module.hparams[k] != fitted[k] for k in relevant):
            module.hparams.update(fitted)
            _refit_calibration(module)  # back to the fitted statistics for the next variant
    for key in SHOWN:
        got, want = results["as_fitted"][key], expected[key]
        if abs(got - want) > 1e-4:
            raise SystemExit(f"{run}: as_fitted {key} {got:.6f} != vsad-fit's {want:.6f}")
    return results


# ----------------------------------------------------------------------------- the report

Table = dict[str, dict[str, dict[int, dict]]]
"""row -> category -> seed -> metrics."""


def _cell(values: list[float]) -> str:
    """``mean ± spread`` over seeds (spread: half the range, the honest number for 2 seeds)."""
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {(max(values) - min(values)) / 2:.3f}"


def markdown(table: Table, categories: list[str], seeds: list[int], header: str) -> str:
    keys = (*SHOWN, *DECISIONS)
    lines = [header, "", "Mean over the categories a row has run on (± half the range over seeds):"]
    lines += ["", "| row | categories | " + " | ".join(keys) + " |"]
    lines.append("|---|---|" + "---|" * len(keys))
    for row, per_cat in table.items():
        done = [c for c in categories if all(s in per_cat.get(c, {}) for s in seeds)]
        cells = []
        for key in keys:
            per_seed = [np.mean([per_cat[c][s].get(key, np.nan) for c in done]) for s in seeds]
            cells.append(_cell(per_seed) if done else "-")
        lines.append(f"| {row} | {len(done)} of {len(categories)} | " + " | ".join(cells) + " |")
    for key in ("sample_auroc", "view_auroc", "pixel_auroc", "pixel_aupro"):
        lines += ["", f"Per category, {key} (mean ± half the range over seeds):", ""]
        lines.append("| row | " + " | ".join(categories) + " |")
        lines.append("|---|" + "---|" * len(categories))
        for row, per_cat in table.items():
            cells = [
                _cell([per_cat.get(c, {}).get(s, {}).get(key, np.nan) for s in seeds])
                for c in categories
            ]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


DEFECT_NAMES = {code: name for name, code in REALISTIC_DEFECT_CODES.items()}


def defect_type_aurocs(run: Path) -> dict[str, float]:
    """Sample AUROC of each defect type's anomalous samples against all normal samples, from
    the run's ``scores.csv`` (the type is the Real-IAD folder ``NG/<code>/``)."""
    scores: dict[str, tuple[float, str]] = {}
    with (run / "scores.csv").open() as f:
        for row in csv.DictReader(f):
            code = Path(row["image_path"]).parts[-3] if row["sample_truth"] == "NG" else "OK"
            scores[row["sample_id"]] = (float(row["sample_score"]), code)
    normal = [score for score, code in scores.values() if code == "OK"]
    out = {}
    for code in sorted({code for _, code in scores.values()} - {"OK"}):
        anomalous = [score for score, c in scores.values() if c == code]
        # exact_auroc ranks the raw scores; torchmetrics' binary_auroc would squash scores
        # outside [0, 1] with a sigmoid, which saturates raw distances (ties: 0.5).
        labels = [1] * len(anomalous) + [0] * len(normal)
        out[DEFECT_NAMES.get(code, code)] = exact_auroc(anomalous + normal, labels)
    return out


def defect_type_markdown(work: Path, rig: str, scale: str, categories, seeds) -> str:
    """The per-defect-type section (module docstring) of every fit found under ``work``."""
    lines = []
    for folder in sorted((work / f"runs_{rig}_{scale}").glob("*_seed*")):
        fit, _, seed = folder.name.rpartition("_seed")
        if int(seed) not in seeds:
            continue
        for category in categories:
            done = sorted((folder / "realiad" / category).glob("version_*/scores.csv"))
            if done:
                for kind, auroc in defect_type_aurocs(done[-1].parent).items():
                    lines.append((fit, kind, category, int(seed), auroc))
    if not lines:
        return ""
    kinds = sorted({kind for _, kind, *_ in lines})
    per_category: dict[tuple[str, str, int], list[float]] = {}
    for fit, kind, _, seed, auroc in lines:
        per_category.setdefault((fit, kind, seed), []).append(auroc)
    text = [
        "",
        "Per defect type, sample AUROC of the as-fitted runs (that type's anomalous test samples "
        "against all normal test samples; mean over the categories ± half the range over seeds):",
        "",
        "| fit | " + " | ".join(kinds) + " |",
        "|---|" + "---|" * len(kinds),
    ]
    for fit in dict.fromkeys(fit for fit, *_ in lines):
        cells = []
        for kind in kinds:
            found = [per_category.get((fit, kind, seed)) for seed in seeds]
            cells.append(_cell([float(np.mean(v)) for v in found if v]))
        text.append(f"| {fit} | " + " | ".join(cells) + " |")
    return "\n".join(text) + "\n"


MERGED = "Merged from these invocations:"


def merge(files: list[Path], out: Path, work: Path, rig: str, categories, seeds) -> int:
    """``--merge``: one report from earlier invocations' JSON tables (module docstring)."""
    table: Table = {}
    headers = []
    for path in files:
        saved = json.loads(path.read_text())
        header = saved["header"].split("\n\n", 1)[-1]
        if header.startswith(MERGED):  # an earlier merge: keep its invocations, flat
            headers += [line[2:] for line in header.splitlines() if line.startswith("- ")]
        else:
            headers.append(header)
        for row, per_cat in saved["table"].items():
            for category, per_seed in per_cat.items():
                for seed, metrics in per_seed.items():
                    table.setdefault(row, {}).setdefault(category, {})[int(seed)] = metrics
    header = f"# Accuracy ablations ({rig} rig)\n\n{MERGED}\n\n" + "\n".join(
        f"- {h}" for h in headers
    )
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"accuracy_{rig}"
    print(write_report(stem, table, header, work, rig, "full", categories, seeds))
    return 0


def write_report(
    stem: Path, table: Table, header: str, work: Path, rig: str, scale: str, categories, seeds
) -> str:
    """``<stem>.md`` / ``.json`` / ``.png`` of ``table``; returns the markdown."""
    text = markdown(table, categories, seeds, header)
    text += defect_type_markdown(work, rig, scale, categories, seeds)
    findings = Path(FINDINGS.format(rig=rig))
    if findings.is_file():
        text += "\n" + findings.read_text()
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({"header": header, "table": table}))
    bar_chart(table, stem.with_suffix(".png"))
    return text


def bar_chart(table: Table, path: Path) -> None:
    """Grouped bars of the mean metrics per row, drawn with OpenCV (already a dependency)."""
    colours = [(180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214)]  # BGR
    names = list(table)
    group, bar, left, top, height = 18 + 14 * len(SHOWN), 14, 70, 40, 300
    width = max(left + group * len(names) + 20, left + 150 * len(SHOWN))
    image = np.full((top + height + 12 + 160 + 8, width, 3), 255, np.uint8)
    for tick in np.linspace(0, 1, 6):
        y = int(top + height * (1 - tick))
        cv2.line(image, (left - 5, y), (width - 10, y), (220, 220, 220), 1)
        cv2.putText(image, f"{tick:.1f}", (20, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 0, 1)
    for i, name in enumerate(names):
        x0 = left + i * group + 9
        for j, key in enumerate(SHOWN):
            values = [m[key] for per_seed in table[name].values() for m in per_seed.values()]
            value = float(np.nanmean(values))
            y = int(top + height * (1 - value))
            x = x0 + j * bar
            cv2.rectangle(image, (x, y), (x + bar - 2, top + height), colours[j], -1)
        # Row names are written downwards so long names fit under narrow groups.
        text = np.full((16, 160, 3), 255, np.uint8)
        cv2.putText(text, name, (2, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
        text = cv2.rotate(text, cv2.ROTATE_90_CLOCKWISE)
        h, w = text.shape[:2]
        image[top + height + 12 : top + height + 12 + h, x0 : x0 + w] = text
    for j, key in enumerate(SHOWN):
        x = left + j * 150
        cv2.rectangle(image, (x, 10), (x + 12, 22), colours[j], -1)
        cv2.putText(image, key, (x + 16, 21), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 0, 1)
    cv2.imwrite(str(path), image)


def row_name(fit: str, scoring: str) -> str:
    """``full`` for the base fit as fitted, ``full / fusion_off`` for a scoring variant of it."""
    return fit if scoring == "as_fitted" else f"{fit} / {scoring}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--rig", choices=("realistic", "simple"), default="realistic")
    parser.add_argument("--out", default="benchmarks/results", type=Path)
    parser.add_argument("--work", default="runs/accuracy", type=Path, help="Data and runs.")
    parser.add_argument("--categories", default="all", help="'all' or comma-separated names.")
    parser.add_argument("--seeds", default="0,1", help="Data and training seeds.")
    parser.add_argument(
        "--fits", nargs="*", default=["full", "mvam_off", "single_view"],
        choices=list(FIT_VARIANTS),
    )  # fmt: skip
    parser.add_argument(
        "--scoring",
        nargs="*",
        default=list(SCORING_VARIANTS),
        type=_scoring_name,
        help="Scoring variants evaluated on the first of --fits (the others: as fitted and "
        "--every-fit); names joined by '+' compose.",
    )
    parser.add_argument(
        "--every-fit", nargs="*", default=[], type=_scoring_name,
        help="Scoring variants evaluated on every fit, not only the first.",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="Tiny data and 1 epoch: a smoke run.")
    parser.add_argument("--reuse", action="store_true", help="Keep finished runs in --work.")
    parser.add_argument(
        "--merge", nargs="+", type=Path, metavar="JSON",
        help="Write one report from these earlier results (.json) instead of fitting.",
    )  # fmt: skip
    args, extra = parser.parse_known_args(argv)

    categories = resolve_categories(args.categories, args.rig)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.merge:
        return merge(args.merge, args.out, args.work, args.rig, categories, seeds)
    sizes = {"samples_train": 8, "samples_test": 8, "image_size": 128} if args.quick else {}
    resolution = sizes.get("image_size") or (256 if args.rig == "realistic" else 128)
    base = ["--config", args.config, "--data.resolution", str(resolution)]
    base += ["--pictures.num_samples", "0"]
    if args.quick:
        base += ["--trainer.max_epochs", "1"]
    base += extra
    scoring = list(dict.fromkeys(["as_fitted", *args.scoring]))
    scale = "quick" if args.quick else "full"
    command = " ".join(["python benchmarks/accuracy.py", *(sys.argv[1:] if argv is None else argv)])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"accuracy_{args.rig}"

    start = time.perf_counter()
    table: Table = {}
    for seed in seeds:
        data = args.work / f"data_{args.rig}_{scale}_seed{seed}"
        if not (data / "realiad_jsons").is_dir():
            write_synthetic_dataset(data, categories, seed, rig=args.rig, progress=print, **sizes)
        for fit in args.fits:
            runs = args.work / f"runs_{args.rig}_{scale}" / f"{fit}_seed{seed}"
            for category in categories:
                run = run_fit(
                    fit, [*base, "--seed_everything", str(seed)], data, category, runs, args.reuse
                )
                names = scoring if fit == args.fits[0] else ["as_fitted"]
                names = list(dict.fromkeys([*names, *args.every_fit]))
                for name, metrics in evaluate_scoring(run, names).items():
                    row = table.setdefault(row_name(fit, name), {})
                    row.setdefault(category, {})[seed] = metrics
                # Rewritten after every run, so an interrupted table keeps what finished.
                minutes = (time.perf_counter() - start) / 60
                header = (
                    f"# Accuracy ablations ({args.rig} rig)\n\n`{command}` on {cpu_model()}, "
                    f"config `{args.config}` + `{' '.join(extra)}`, {scale} scale, categories "
                    f"{categories}, seeds {seeds}; this invocation took {minutes:.1f} min so far."
                )
                write_report(stem, table, header, args.work, args.rig, scale, categories, seeds)
    print(markdown(table, categories, seeds, header))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
