"""``vsad predict`` (alias ``vsad-predict``) and ``vsad export``: a checkpoint or a bundle is all
they need.

``vsad predict --ckpt_path CKPT --data.predict_root DIR --output.dir OUT`` scores every sample
folder of ``DIR`` (``<DIR>/<sample_id>/<view>.<ext>``) with ``VSADInferencer``: the model
carries its rig, bank and calibration, so no config and no training data root are read, and
nothing is written outside ``OUT`` (``maps/<sample_id>.png`` and ``scores.csv`` with OK/NG).
Options of the training config that earlier versions needed here (``--config``,
``--data.root``, ``--trainer.*``, ...) are accepted and ignored; ``--model.<setting>`` changes
a scoring setting (``calibration``, ``fusion_strength``, ``threshold_quantile``, ...).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import yaml

from vsad_lightning.cli._common import report_data_errors
from vsad_lightning.errors import DataError
from vsad_lightning.models.model import SCORING_FIELDS

IGNORED_PREFIXES = (
    "--config",
    "--data.",
    "--trainer.",
    "--seed_everything",
    "--pictures.",
    "--bank.",
)
"""Options of the training config: the checkpoint holds the model and its rig."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vsad predict",
        description="Score a folder of new samples with a checkpoint or an exported bundle: PNG "
        "maps and scores.csv (scores and OK/NG per view and per sample). Needs no config and no "
        "training data; --model.<setting> changes a scoring setting.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt_path", help="final.ckpt written by vsad fit")
    source.add_argument("--bundle", help="a folder written by vsad export")
    parser.add_argument(
        "--data.predict_root", dest="predict_root", required=True,
        help="folder with one sub-folder per sample, one image per view (C1.jpg, ...)",
    )  # fmt: skip
    parser.add_argument("--output.dir", dest="out", default="predictions", help="output folder")
    parser.add_argument(
        "--output.vmax", dest="vmax", type=float, default=None,
        help="fixed top of the pictures' colour scale (default: each sample's largest score)",
    )  # fmt: skip
    parser.add_argument("--batch_size", type=int, default=1, help="samples scored at once")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    return parser


def _split_overrides(rest: Sequence[str]) -> tuple[dict, list[str]]:
    """``--model.X VALUE`` pairs (YAML values) and the ignored training options."""
    settings, ignored, unknown = {}, [], []
    i = 0
    while i < len(rest):
        arg = rest[i]
        key, value, step = arg, None, 1
        if "=" in arg:
            key, value = arg.split("=", 1)
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            value, step = rest[i + 1], 2
        if key.startswith("--model."):
            name = key[len("--model.") :]
            if name in SCORING_FIELDS:
                settings[name] = yaml.safe_load(value) if value is not None else None
            else:
                ignored.append(key)  # architecture and training options: the checkpoint's
        elif key.startswith(IGNORED_PREFIXES):
            ignored.append(key)
        else:
            unknown.append(arg)
        i += step
    if unknown:
        raise DataError(f"vsad predict: unrecognized arguments {unknown} (see vsad predict --help)")
    return settings, ignored


@report_data_errors
def predict_main(args: list[str] | None = None) -> int:
    """``vsad predict --ckpt_path CKPT --data.predict_root DIR [--output.dir OUT]``."""
    from vsad_lightning.callbacks.predictions import PredictionWriter
    from vsad_lightning.inference import VSADInferencer

    parsed, rest = _parser().parse_known_args(args)
    settings, ignored = _split_overrides(rest)
    if ignored:
        print(
            f"ignored (the checkpoint holds the model and its rig): {' '.join(ignored)}",
            file=sys.stderr,
        )
    if parsed.ckpt_path is not None:
        inferencer = VSADInferencer.from_checkpoint(parsed.ckpt_path, parsed.device, **settings)
    else:
        inferencer = VSADInferencer.from_bundle(parsed.bundle, parsed.device, **settings)
    writer = PredictionWriter(dir=parsed.out, vmax=parsed.vmax)
    writer.start(inferencer.model)
    for batch, prediction in inferencer.predict_batches(parsed.predict_root, parsed.batch_size):
        writer.write(batch, prediction)
    print(f"scores: {writer.finish()}")
    return 0


@report_data_errors
def export_main(args: list[str] | None = None) -> int:
    """``vsad export --ckpt_path CKPT --out DIR``: a safetensors + JSON bundle."""
    from vsad_lightning.inference.export import checkpoint_to_bundle

    parser = argparse.ArgumentParser(
        prog="vsad export",
        description="Write a checkpoint's model (weights, memory bank, calibration, rig) as a "
        "bundle: model.safetensors + config.json, loadable without unpickling "
        "(VSADInferencer.from_bundle, vsad predict --bundle).",
    )
    parser.add_argument("--ckpt_path", required=True, help="final.ckpt written by vsad fit")
    parser.add_argument("--out", required=True, help="the bundle folder (created)")
    parsed = parser.parse_args(args)
    folder = checkpoint_to_bundle(parsed.ckpt_path, parsed.out)
    print(f"bundle: {folder}")
    return 0
