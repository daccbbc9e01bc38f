"""``vsad``: one command with subcommands, as in anomalib and Lightning.

``vsad fit|test|predict|export|homography|synth|report [options]``; ``vsad <sub> --help`` lists
each subcommand's options. The ``vsad-fit``, ``vsad-test``, ... scripts stay as aliases of the
same entry points.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("vsad_lightning.cli.run:fit_main", "fit, build the memory bank, test (--config YAML)"),
    "test": ("vsad_lightning.cli.run:test_main", "test a checkpoint on a category's test split"),
    "predict": (
        "vsad_lightning.cli.predict:predict_main",
        "score a folder of new samples with a checkpoint or bundle: maps, scores.csv with OK/NG",
    ),
    "export": (
        "vsad_lightning.cli.predict:export_main",
        "write a checkpoint as a safetensors + JSON bundle (no pickle)",
    ),
    "homography": (
        "vsad_lightning.cli.homography:main",
        "estimate and cache a category's (or each sample's) view-to-view homographies",
    ),
    "synth": ("vsad_lightning.cli.synth:main", "write a synthetic multi-view dataset"),
    "report": ("vsad_lightning.cli.report:report_main", "one table of every category's metrics"),
}


def usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = [
        "usage: vsad <command> [options]   (vsad <command> --help for its options)",
        "",
        "Multi-view visual anomaly detection (VSAD) as a PyTorch Lightning suite.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``vsad <command> [options]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"{usage()}\n\nerror: unknown command {command!r}", file=sys.stderr)
        return 2
    target, _ = SUBCOMMANDS[command]
    module, name = target.split(":")
    entry = getattr(importlib.import_module(module), name)
    sys.argv = [f"vsad {command}", *rest]  # usage lines and jsonargparse name the subcommand
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
