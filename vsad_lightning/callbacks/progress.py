"""``LogProgressBar``: Lightning's progress bar for batch logs (SLURM, pipes, files).

Lightning's own ``TQDMProgressBar`` redraws one line with carriage returns, which a log file
keeps as one endless line (or thousands). When stderr is not a terminal, ``vsad-fit``,
``vsad-test`` and ``vsad-predict`` install this bar instead (``cli/run.py``): plain lines with
an ETA from ``vsad_lightning.utils.progress.Progress`` for each training epoch (with the
loss), the test and prediction.
"""

from __future__ import annotations

import math

from lightning.pytorch.callbacks.progress import ProgressBar

from vsad_lightning.utils.progress import Progress


def _count(total: float) -> int | None:
    return int(total) if isinstance(total, int | float) and math.isfinite(total) else None


class LogProgressBar(ProgressBar):
    """Plain progress lines with an ETA, rank 0 only (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._meter: Progress | None = None
        self._paused: Progress | None = None  # the epoch's meter while validation runs

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _start(self, trainer, total: float, description: str) -> None:
        self._finish()
        self._meter = Progress(
            _count(total), description, enabled=self._enabled and trainer.is_global_zero
        )

    def _step(self, status: str = "") -> None:
        if self._meter is not None:
            self._meter.update(1, status)

    def _finish(self, status: str = "") -> None:
        if self._meter is not None:
            self._meter.close(status)
            self._meter = None

    def _loss(self, trainer, pl_module) -> str:
        metrics = self.get_metrics(trainer, pl_module)
        parts = [f"{k} {v:.4g}" for k, v in metrics.items() if "loss" in k and isinstance(v, float)]
        return ", ".join(parts[:2])

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        self._start(trainer, self.total_train_batches, f"epoch {trainer.current_epoch + 1}{epochs}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._step(self._loss(trainer, pl_module))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._finish(self._loss(trainer, pl_module))

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._paused = self._meter
            self._meter = None
            self._meter = Progress(
                _count(self.total_val_batches),
                "validation",
                enabled=self._enabled and trainer.is_global_zero,
            )

    def on_validation_batch_end(self, trainer, pl_module, *args, **kwargs) -> None:
        if not trainer.sanity_checking:
            self._step()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._finish()
            self._meter, self._paused = self._paused, None

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        total = sum(_count(t) or 0 for t in trainer.num_test_batches)
        self._start(trainer, total, "test")

    def on_test_batch_end(self, trainer, pl_module, *args, **kwargs) -> None:
        self._step()

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._finish()

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        total = sum(_count(t) or 0 for t in trainer.num_predict_batches)
        self._start(trainer, total, "predict")

    def on_predict_batch_end(self, trainer, pl_module, *args, **kwargs) -> None:
        self._step()

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self._finish()
