"""``vsad-fit``, ``vsad-test`` and ``vsad-predict``: LightningCLI over one YAML file.

The YAML has the usual LightningCLI sections (``trainer``, ``model``, ``data``,
``seed_everything``) plus ``bank`` (``MemoryBankCallback``) and ``pictures``
(``AnomalyMapPictures``). ``data.image_size`` is linked to ``model.image_size``.

Run folder: ``<trainer.default_root_dir>/<dataset>/<category>/version_N/`` holding
``checkpoints/`` (``last.ckpt`` while training, ``final.ckpt`` with the memory bank),
TensorBoard event files, ``config.yaml``, ``metrics.json``, ``metrics.csv`` and ``images/``.
The logger is set by these commands so that the folder always has this shape.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from vsad_lightning.callbacks.memory_bank import MemoryBankCallback
from vsad_lightning.callbacks.outputs import AnomalyMapPictures, MetricsFileCallback
from vsad_lightning.callbacks.predictions import PredictionWriter
from vsad_lightning.cli._common import report_data_errors
from vsad_lightning.data.datamodule import MultiViewDataModule
from vsad_lightning.errors import DataError
from vsad_lightning.metrics.export import format_metrics_table
from vsad_lightning.system.module import VSADModule

RUN_VERSION_ENV = "VSAD_RUN_VERSION"
"""Set by rank 0 before DDP starts its worker processes, so every rank names the same run."""


class VSADCLI(LightningCLI):
    """LightningCLI with the callbacks every VSAD run needs and the run-folder logger."""

    def __init__(self, command: str, args: list[str] | None = None) -> None:
        self.command = command
        super().__init__(
            VSADModule,
            MultiViewDataModule,
            run=False,
            args=args,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "default_root_dir": "runs",
                "log_every_n_steps": 10,
                "callbacks": [
                    ModelCheckpoint(save_last=True),
                    LearningRateMonitor(logging_interval="step"),
                    MetricsFileCallback(),
                ],
            },
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(MemoryBankCallback, "bank")
        parser.add_lightning_class_args(AnomalyMapPictures, "pictures")
        parser.link_arguments("data.image_size", "model.image_size")
        if self.command == "fit":
            parser.add_argument(
                "--ckpt_path",
                type=str | None,
                default=None,
                help="Resume training from this checkpoint ('last' for the newest).",
            )
        else:
            parser.add_argument(
                "--ckpt_path", type=str, required=True, help="Checkpoint written by vsad-fit."
            )
        if self.command == "predict":
            parser.add_lightning_class_args(PredictionWriter, "output")

    def instantiate_trainer(self, **kwargs: Any):
        config = self._get(self.config_init, "trainer", default={})
        if config.get("logger") in (None, True):
            kwargs["logger"] = self._run_logger(config.get("default_root_dir") or "runs")
        return super().instantiate_trainer(**kwargs)

    def _run_logger(self, root: str) -> TensorBoardLogger:
        data = self.datamodule
        name = f"{data.dataset}/{data.category}"
        if self.command != "fit":
            name = f"{name}/{self.command}"
        version = os.environ.get(RUN_VERSION_ENV)
        logger = TensorBoardLogger(
            save_dir=root,
            name=name,
            version=int(version) if version is not None else None,
            default_hp_metric=False,
        )
        # DDP's worker processes re-run this command; they must write the same version.
        os.environ[RUN_VERSION_ENV] = str(logger.version)
        return logger


def _ensure_writable(root: str | os.PathLike) -> None:
    """Fail before any training when the run folder cannot be written."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".vsad-write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise DataError(f"run folder {root} is not writable ({e.strerror})") from e


def _print_results(cli: VSADCLI) -> None:
    if not cli.trainer.is_global_zero:
        return
    results = cli.model.test_results or {}
    row = {"category": cli.datamodule.category, **results}
    print(format_metrics_table([row]))
    writer = next(c for c in cli.trainer.callbacks if isinstance(c, MetricsFileCallback))
    print(f"metrics: {writer.metrics_path}")


@report_data_errors
def fit_main(args: list[str] | None = None) -> int:
    """``vsad-fit --config CONFIG [overrides]``: fit, build the bank, then test."""
    cli = VSADCLI("fit", args)
    _ensure_writable(cli.trainer.default_root_dir)
    ckpt = cli.config.get("ckpt_path")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    _print_results(cli)
    return 0


@report_data_errors
def test_main(args: list[str] | None = None) -> int:
    """``vsad-test --config CONFIG --ckpt_path CKPT``: test a checkpoint as ``vsad-fit`` does."""
    cli = VSADCLI("test", args)
    _ensure_writable(cli.trainer.default_root_dir)
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config["ckpt_path"])
    _print_results(cli)
    return 0


@report_data_errors
def predict_main(args: list[str] | None = None) -> int:
    """``vsad-predict --config CONFIG --ckpt_path CKPT --data.predict_root DIR``.

    Writes PNG maps and ``scores.csv`` into ``--output.dir`` (default ``predictions``).
    """
    cli = VSADCLI("predict", args)
    cli.trainer.predict(
        cli.model,
        datamodule=cli.datamodule,
        ckpt_path=cli.config["ckpt_path"],
        return_predictions=False,
    )
    writer = next(c for c in cli.trainer.callbacks if isinstance(c, PredictionWriter))
    if cli.trainer.is_global_zero:
        print(f"scores: {writer.csv_path}")
    return 0
