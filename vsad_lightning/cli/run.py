"""``vsad-fit`` and ``vsad-test``: LightningCLI over one YAML file (``vsad-predict`` scores with
the checkpoint alone: ``vsad_lightning.cli.predict``).

The YAML has the usual LightningCLI sections (``trainer``, ``model``, ``data``,
``seed_everything``) plus ``bank`` (``MemoryBankCallback``) and ``pictures``
(``AnomalyMapPictures``). ``data.image_size`` is linked to ``model.image_size``.

Run folder: ``<trainer.default_root_dir>/<dataset>/<category>/version_N/`` holding
``checkpoints/`` (``last.ckpt`` while training, ``final.ckpt`` with the memory bank),
TensorBoard event files, ``config.yaml``, ``metrics.json``, ``metrics.csv``, ``scores.csv``
(per view: scores, OK/NG decisions and the truth) and ``images/``.
The logger is set by these commands so that the folder always has this shape.

Resume (``vsad-fit --resume auto``, the default): running the same command again after a
crash, ``kill -9`` or a SLURM preemption continues the interrupted run instead of starting
over. If the newest ``version_N`` is unfinished (no ``metrics.json``, no ``final.ckpt``) and a
checkpoint of it exists, the run reuses ``version_N`` and fits from the checkpoint with the
highest ``global_step`` among ``version_N/checkpoints/*.ckpt`` and Lightning's SLURM
``<default_root_dir>/hpc_ckpt_*.ckpt`` that belong to it (their ``ModelCheckpoint`` state
names ``version_N/checkpoints``). If it holds ``final.ckpt`` but no ``metrics.json`` (stopped
during its test), the run reuses ``version_N`` and only tests ``final.ckpt``. Otherwise (a
``metrics.json``, or nothing to resume from) a new ``version_N+1`` starts. An explicit
``--ckpt_path`` always wins (and starts a new version); ``--resume never`` forces a fresh run.
``last.ckpt`` is refreshed every ``--checkpoint_every_n_steps`` optimiser steps and at each
epoch end, so a crash costs at most that many steps.
"""

from __future__ import annotations

import functools
import os
import pickle
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vsad_lightning.callbacks.memory_bank import FINAL_CHECKPOINT, MemoryBankCallback
from vsad_lightning.callbacks.outputs import AnomalyMapPictures, MetricsFileCallback
from vsad_lightning.callbacks.predictions import TestScoresWriter
from vsad_lightning.callbacks.preemption import (
    RequeueAtBatchEnd,
    StopAtSafePoint,
    stops_on_signals,
)
from vsad_lightning.callbacks.progress import LogProgressBar
from vsad_lightning.cli import _runfolder
from vsad_lightning.cli._common import one_line, report_data_errors
from vsad_lightning.cli._validate import validate_model_options, validate_run
from vsad_lightning.data.datamodule import MultiViewDataModule, resolved_image_size
from vsad_lightning.errors import DataError
from vsad_lightning.metrics.export import format_metrics_table
from vsad_lightning.models.model import ARCHITECTURE_FIELDS
from vsad_lightning.system.module import VSADModule
from vsad_lightning.utils.checkpoint_io import AtomicCheckpointIO
from vsad_lightning.utils.progress import use_terminal_bar
from vsad_lightning.utils.quiet import quiet_known_noise

RUN_VERSION_ENV = "VSAD_RUN_VERSION"
"""Set by rank 0 before DDP starts its worker processes, so every rank names the same run."""

FINISHED_MARKER = "metrics.json"
"""A version folder holding this was tested: it is never resumed."""

HPC_PATTERN = "hpc_ckpt_*.ckpt"
"""Lightning's SLURM preemption checkpoints, written into ``trainer.default_root_dir``."""


COMMAND_HELP = {
    "fit": "vsad-fit: fit VSAD on one category, build the memory bank, test. Every option can "
    "also be set in the --config YAML; --config FILE --print_config prints the merged config.",
    "test": "vsad-test: test a checkpoint written by vsad-fit (--ckpt_path) as vsad-fit does.",
}
"""The first line of each command's ``--help``."""


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint(save_last=True, save_top_k=0)``: ``last.ckpt`` at each epoch end, also
    refreshed every ``every_n_steps`` optimiser steps.

    Only ``last.ckpt`` (for resuming: weights, optimiser, loops) and, once the bank exists,
    ``final.ckpt`` (weights, bank, rig and calibration, no optimiser state) are written: a
    top-1 epoch checkpoint would be a byte copy of ``last.ckpt`` (no metric is monitored).

    Lightning's own ``every_n_train_steps`` excludes the epoch trigger; long epochs need the
    step trigger (a crash then costs minutes), short runs need the epoch one.
    """

    def __init__(self, every_n_steps: int = 50, **kwargs: Any) -> None:
        kwargs.setdefault("save_top_k", 0)
        super().__init__(save_last=True, **kwargs)
        if every_n_steps < 0:
            raise ValueError(f"checkpoint_every_n_steps must be >= 0, got {every_n_steps}")
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if (
            self.every_n_steps
            and step % self.every_n_steps == 0
            and not self._should_skip_saving_checkpoint(trainer)
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def _checkpoint_info(path: Path) -> tuple[int, str | None]:
    """``(global_step, ModelCheckpoint dirpath)`` of a checkpoint, reading tensors lazily."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    dirpath = next(
        (
            state.get("dirpath")
            for key, state in ckpt.get("callbacks", {}).items()
            if "Checkpoint" in key and isinstance(state, dict)
        ),
        None,
    )
    return int(ckpt.get("global_step", -1)), dirpath


def _same_path(a: str | os.PathLike | None, b: str | os.PathLike) -> bool:
    return a is not None and Path(a).resolve() == Path(b).resolve()


def find_resume_checkpoint(
    root: str | os.PathLike, name: str, claim: bool = False
) -> tuple[int, Path] | None:
    """``(version, checkpoint)`` to resume ``<root>/<name>/version_N`` from, or ``None``.

    See the module docstring for the rule. A checkpoint that cannot be read (a write cut by
    ``kill -9`` is the usual cause) is skipped. With ``claim``, a folder that another live run
    holds (``cli._runfolder``) is never resumed, and the one chosen is held by this process.
    """
    runs = Path(root) / name
    versions = sorted(
        (int(d.name.split("_", 1)[1]), d)
        for d in (runs.glob("version_*") if runs.is_dir() else [])
        if d.is_dir() and d.name.split("_", 1)[1].isdigit()
    )
    if not versions:
        return None
    version, folder = versions[-1]
    if (folder / FINISHED_MARKER).exists():
        return None
    final = folder / "checkpoints" / FINAL_CHECKPOINT
    if final.is_file():
        # Trained, bank built, the test cut short: resuming means testing final.ckpt.
        if claim and not _runfolder.hold(folder):
            return None
        return version, final
    own = sorted((folder / "checkpoints").glob("*.ckpt"))
    hpc = sorted(Path(root).glob(HPC_PATTERN))
    best: tuple[int, Path] | None = None
    for path in [*own, *hpc]:
        try:
            step, dirpath = _checkpoint_info(path)
        except Exception:  # noqa: BLE001 - an unreadable checkpoint is simply not a candidate
            continue
        if path in hpc and not _same_path(dirpath, folder / "checkpoints"):
            continue  # another run's preemption checkpoint
        # Strictly greater: on a tie the version folder's own checkpoint (listed first) wins.
        if best is None or step > best[0]:
            best = (step, path)
    if best is None:
        return None
    if claim and not _runfolder.hold(folder):
        return None  # another live run is still writing it: start a new version
    return version, best[1]


class VSADCLI(LightningCLI):
    """LightningCLI with the callbacks every VSAD run needs and the run-folder logger."""

    def __init__(self, command: str, args: list[str] | None = None) -> None:
        self.command = command
        self.resume_from: Path | None = None
        quiet_known_noise()
        super().__init__(
            VSADModule,
            MultiViewDataModule,
            run=False,
            args=args,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": COMMAND_HELP.get(command, "")},
            trainer_defaults={
                "default_root_dir": "runs",
                "log_every_n_steps": 10,
                "callbacks": [
                    LearningRateMonitor(logging_interval="step"),
                    MetricsFileCallback(),
                    TestScoresWriter(),
                    RequeueAtBatchEnd(),
                    StopAtSafePoint(),  # SIGTERM / SIGINT: stop between batches
                ],
            },
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(MemoryBankCallback, "bank")
        parser.add_lightning_class_args(AnomalyMapPictures, "pictures")
        # data.image_size null: the stored resolution (resolved_image_size).
        parser.link_arguments(
            ("data.image_size", "data.resolution"),
            "model.image_size",
            compute_fn=resolved_image_size,
        )
        if self.command == "fit":
            parser.add_argument(
                "--ckpt_path",
                type=str | None,
                default=None,
                help="Resume training from this checkpoint ('last' for the newest); "
                "overrides --resume.",
            )
            parser.add_argument(
                "--resume",
                type=Literal["auto", "never"],
                default="auto",
                help="auto: continue the newest unfinished run of this category from its newest "
                "checkpoint (same version folder); never: always start a new version.",
            )
            parser.add_argument(
                "--checkpoint_every_n_steps",
                type=int,
                default=50,
                help="Also refresh checkpoints/last.ckpt every N optimiser steps (0: only at "
                "epoch ends), so that a crash or preemption loses at most N steps.",
            )
        else:
            parser.add_argument(
                "--ckpt_path", type=str, required=True, help="Checkpoint written by vsad-fit."
            )

    def instantiate_classes(self) -> None:
        """The constructors refuse bad values with a ``ValueError``: report it as one line
        (``DataError``), before any run folder exists."""
        validate_model_options(self._get(self.config, "model", default=None))
        try:
            super().instantiate_classes()
        except DataError:
            raise
        except ValueError as e:
            raise DataError(f"invalid configuration: {one_line(str(e))}") from e

    def instantiate_trainer(self, **kwargs: Any):
        # Every value that can be checked without data, before the run folder is claimed.
        validate_run(self.model, self.datamodule, self._get(self.config_init, "bank"))
        config = self._get(self.config_init, "trainer", default={})
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, TorchCheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        if config.get("logger") in (None, True):
            kwargs["logger"] = self._run_logger(config.get("default_root_dir") or "runs")
        every = self._get(self.config_init, "checkpoint_every_n_steps", default=0) or 0
        kwargs["callbacks"] = [*(config.get("callbacks") or []), RunCheckpoint(every)]
        if config.get("enable_progress_bar") is not False and not use_terminal_bar():
            kwargs["callbacks"].append(LogProgressBar())  # plain lines in a batch log
        if getattr(self.datamodule, "val_fraction", None) == 0:
            kwargs["limit_val_batches"] = 0  # no held-out normals: no validation loop at all
        trainer = super().instantiate_trainer(**kwargs)
        _runfolder_trainer[:] = [trainer]
        return trainer

    def _run_logger(self, root: str) -> TensorBoardLogger:
        data = self.datamodule
        name = f"{data.dataset}/{data.category}"
        if self.command != "fit":
            name = f"{name}/{self.command}"
        version = os.environ.get(RUN_VERSION_ENV)
        # srun's ranks are separate commands: rank 0 chooses, the others follow (_runfolder).
        rank, step = _runfolder.srun_step() if version is None else (None, None)
        if rank:
            chosen, resume = _runfolder.await_choice(root, step, name, rank)
            version, self.resume_from = str(chosen), Path(resume) if resume else None
        elif self.command == "fit":
            version = self._resume_version(root, name, version)
        if version is None:  # rank 0 of a new run: claim the folder atomically
            _ensure_writable(root)
            version = str(_runfolder.claim_version(Path(root) / name))
        if rank == 0:
            resume = str(self.resume_from) if self.resume_from is not None else None
            _runfolder.publish_choice(root, step, name, int(version), resume)
        logger = TensorBoardLogger(
            save_dir=root,
            name=name,
            version=int(version) if version is not None else None,
            default_hp_metric=False,
        )
        # DDP's worker processes re-run this command; they must write the same version.
        os.environ[RUN_VERSION_ENV] = str(logger.version)
        return logger

    def _resume_version(self, root: str, name: str, version: str | None) -> str | None:
        """Decide ``resume_from``; return the version to reuse (or ``version`` unchanged)."""
        if self._get(self.config_init, "ckpt_path") is not None:
            return version  # an explicit checkpoint wins
        if self._get(self.config_init, "resume", default="auto") == "never":
            stale = sorted(Path(root).glob(HPC_PATTERN))
            if stale and os.environ.get("SLURM_JOB_ID"):
                # Lightning itself resumes from these under SLURM whenever ckpt_path is None.
                raise DataError(
                    f"--resume never, but {root} holds SLURM preemption checkpoints "
                    f"({', '.join(p.name for p in stale)}) that Lightning would resume from; "
                    "delete them to start afresh"
                )
            return version
        found = find_resume_checkpoint(root, name, claim=version is None)
        if found is None:
            return version
        found_version, self.resume_from = found
        if version is not None and int(version) != found_version:
            self.resume_from = None  # a DDP worker of a run rank 0 did not resume
            return version
        return str(found_version)


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


def _drop_consumed_hpc_checkpoints(trainer) -> None:
    """Delete this run's SLURM preemption checkpoints once its ``final.ckpt`` exists.

    Lightning resumes from ``<default_root_dir>/hpc_ckpt_*.ckpt`` on its own under SLURM
    whenever no ``ckpt_path`` is given, so a stale one would hijack the next fresh run.
    """
    if not trainer.is_global_zero or trainer.checkpoint_callback is None:
        return
    folder = Path(trainer.checkpoint_callback.dirpath or "")
    if not (folder / "final.ckpt").is_file():
        return
    for path in Path(trainer.default_root_dir).glob(HPC_PATTERN):
        try:
            _, dirpath = _checkpoint_info(path)
        except Exception:  # noqa: BLE001 - not ours to judge; leave it
            continue
        if _same_path(dirpath, folder):
            path.unlink(missing_ok=True)


def _print_results(cli: VSADCLI) -> None:
    if not cli.trainer.is_global_zero:
        return
    results = cli.model.test_results or {}
    row = {"category": cli.datamodule.category, **results}
    print(format_metrics_table([row]))
    writer = next(c for c in cli.trainer.callbacks if isinstance(c, MetricsFileCallback))
    print(f"metrics: {writer.metrics_path}")


def _one_run_folder(main):
    """Release the run folder a command holds when it returns, and remove it when the command
    failed before training without leaving a checkpoint or a result (``cli._runfolder``)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        failed = True
        try:
            result = main(*args, **kwargs)
            failed = False
            return result
        finally:
            trainer = _runfolder_trainer[0] if _runfolder_trainer else None
            _runfolder_trainer.clear()
            trained = trainer is not None and trainer.global_step > 0
            _runfolder.end_command(failed, trained)

    return wrapper


_runfolder_trainer: list = []
"""The running command's Trainer (set by ``VSADCLI.instantiate_trainer``)."""


def _run_version_scoped(main):
    """Forget ``VSAD_RUN_VERSION`` when a command returns, as it was before the command.

    The variable is for the DDP worker processes one command starts; a later command in the
    same process (the demo, the accuracy benchmark, tests) must choose its own version, or it
    would write into an existing run folder.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        previous = os.environ.get(RUN_VERSION_ENV)
        try:
            return main(*args, **kwargs)
        finally:
            if previous is None:
                os.environ.pop(RUN_VERSION_ENV, None)
            else:
                os.environ[RUN_VERSION_ENV] = previous

    return wrapper


@report_data_errors
@stops_on_signals
@_run_version_scoped
@_one_run_folder
def fit_main(args: list[str] | None = None) -> int:
    """``vsad-fit --config CONFIG [overrides]``: fit, build the bank, then test."""
    cli = VSADCLI("fit", args)
    _ensure_writable(cli.trainer.default_root_dir)
    ckpt = cli.config.get("ckpt_path")
    if ckpt is None and cli.resume_from is not None:
        ckpt = str(cli.resume_from)
        if cli.trainer.is_global_zero:
            print(f"resuming from {ckpt}", flush=True)
    if ckpt is not None and ckpt not in ("last", "hpc"):  # Lightning's named checkpoints
        _require_checkpoint(ckpt)
    if cli.resume_from is not None and cli.resume_from.name == FINAL_CHECKPOINT:
        # The run stopped during its test: the model, bank and calibration are in final.ckpt.
        cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt, weights_only=True)
        _drop_consumed_hpc_checkpoints(cli.trainer)
        _print_results(cli)
        return 0
    # weights_only: checkpoints never need arbitrary unpickling (loading safety).
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt, weights_only=True)
    _drop_consumed_hpc_checkpoints(cli.trainer)
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    _print_results(cli)
    return 0


def _require_checkpoint(path: str) -> dict[str, Any]:
    """The checkpoint, memory-mapped, or a one-line error naming it when it is not a readable
    checkpoint file (missing, a folder, truncated, not a torch file).

    Reading it with ``mmap`` costs its index only, not its tensors. A file holding arbitrary
    Python objects still raises ``pickle.UnpicklingError`` (reported by ``report_data_errors``).
    """
    if not Path(path).is_file():
        raise DataError(f"checkpoint {path} does not exist (expected a .ckpt written by vsad-fit)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise DataError(
            f"checkpoint {path} cannot be read ({one_line(str(e))[:200]}); it is truncated or "
            "not a checkpoint written by vsad-fit"
        ) from e


_ARCHITECTURE_CHECKED = tuple(
    k
    for k in ARCHITECTURE_FIELDS
    if k not in ("backbone_path", "train_unet", "gradient_checkpointing")
)
"""What must match between ``vsad-test``'s config and the checkpoint: the fields that change
what the loaded weights compute (the backbone folder may move; training-only switches may
differ)."""


def _architecture(hparams: Any) -> dict[str, Any]:
    out = {k: hparams[k] for k in _ARCHITECTURE_CHECKED if k in hparams}
    if "feature_levels" in out:
        out["feature_levels"] = [int(x) for x in out["feature_levels"]]
    if out.get("unet_image_size") is None and "image_size" in out:
        out["unet_image_size"] = out["image_size"]  # None means the views' own size
    return out


def _require_same_architecture(path: str, checkpoint: dict, module: VSADModule) -> None:
    """``vsad-test`` builds the model from its config and loads the checkpoint's weights into
    it: a config whose architecture differs (another ``image_size`` or ``unet_image_size``,
    MVAM window, heads, levels) would run those weights differently without any load error.
    Checkpoints that predate a field are not checked on it."""
    saved = _architecture(checkpoint.get("hyper_parameters") or {})
    config = _architecture(module.hparams)
    differ = [
        f"model.{k} {config[k]!r} (checkpoint: {saved[k]!r})"
        for k in _ARCHITECTURE_CHECKED
        if k in saved and saved[k] != config.get(k)
    ]
    if differ:
        raise DataError(
            f"checkpoint {path} was fitted with another model than the config describes: "
            f"{', '.join(differ)}; set these to the checkpoint's values"
        )


@report_data_errors
@stops_on_signals
@_run_version_scoped
@_one_run_folder
def test_main(args: list[str] | None = None) -> int:
    """``vsad-test --config CONFIG --ckpt_path CKPT``: test a checkpoint as ``vsad-fit`` does."""
    cli = VSADCLI("test", args)
    _ensure_writable(cli.trainer.default_root_dir)
    ckpt = cli.config["ckpt_path"]
    _require_same_architecture(ckpt, _require_checkpoint(ckpt), cli.model)
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt, weights_only=True)
    _print_results(cli)
    return 0


def predict_main(args: list[str] | None = None) -> int:
    """``vsad-predict``: ``vsad_lightning.cli.predict.predict_main`` (checkpoint alone, no
    config or training data; the training options of earlier versions are ignored)."""
    from vsad_lightning.cli.predict import predict_main as predict

    return predict(args)
