"""Signals that end a run: SLURM's requeue signal, and SIGTERM / SIGINT.

``RequeueAtBatchEnd``: act on SLURM's requeue signal between steps, never inside one.

Lightning's SLURM auto-requeue (``SLURMEnvironment(auto_requeue=True)``) saves
``<default_root_dir>/hpc_ckpt_N.ckpt`` and runs ``scontrol requeue`` from inside the signal
handler, i.e. wherever the main thread happens to be: possibly halfway through the optimiser's
loop over parameters. Such a checkpoint holds half-updated weights, and a run resumed from it
cannot match an uninterrupted one. This callback lets the signal only raise a flag and runs
Lightning's own handler at the next training batch end, where the state is the same as in a
``last.ckpt`` written there (``vsad_lightning.cli.run`` resumes from either).

SIGTERM (SLURM's time limit, ``scancel``, ``kill``) and SIGINT (Ctrl+C) stop a run at the next
safe point of whatever long phase it is in, leave a state the same command resumes from, and
end with one line and exit status ``128 + signal`` (143, 130):

- ``stops_on_signals`` wraps a console script's ``main``: for the whole command, both signals
  only raise a flag (Lightning chains its own SIGTERM handler, which forwards the signal to
  its DDP worker processes, to this one); a second identical signal kills at once.
- ``StopAtSafePoint`` (a callback) polls the flag: at a training batch end it saves
  ``last.ckpt`` (the state an uninterrupted run has there, as ``RequeueAtBatchEnd`` argues) and
  stops; at a test or predict batch end it stops (nothing was written, the checkpoint is
  intact). ``raise_if_stop_requested`` is the same poll for the memory bank's build, between
  batches (``MemoryBankCallback``); a run stopped there resumes from the end-of-training
  ``last.ckpt`` and builds the bank (``MemoryBankCallback.on_fit_end``).

Without the flag, Lightning turned SIGTERM into a message and computed on through the bank
build, and SIGINT raised ``KeyboardInterrupt`` wherever the main thread was (mid-step).
Under DDP every process must get the signal (``srun``/``scancel`` and Ctrl+C do, and
Lightning forwards SIGTERM to the workers it started); the training stop is agreed on over the
ranks, so all of them save the same step.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

STOP_SIGNALS: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)
"""The signals that stop a run at its next safe point."""


class RunInterrupted(BaseException):
    """Raised at a safe point after SIGTERM or SIGINT; ``str()`` is the line to print.

    A ``BaseException``, as ``KeyboardInterrupt``: ``except Exception`` must not swallow it.
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


_received: list[int] = []
"""The stop signals received by this process during the current command, in order."""


def stop_requested() -> int | None:
    """The first stop signal received during the current command, or ``None``."""
    return _received[0] if _received else None


def _signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def raise_if_stop_requested(during: str, then: str) -> None:
    """Raise ``RunInterrupted`` if a stop signal came: ``"<SIG> <during>: <then>"``."""
    signum = stop_requested()
    if signum is not None:
        raise RunInterrupted(signum, f"{_signal_name(signum)} {during}: {then}")


def stop_checked(fn: Callable, during: str, then: str) -> Callable:
    """``fn`` preceded by ``raise_if_stop_requested``: a poll for loops that call ``fn`` once
    per batch (the bank's calibration calls its ``features_of`` per chunk)."""

    @functools.wraps(fn)
    def polled(*args, **kwargs):
        raise_if_stop_requested(during, then)
        return fn(*args, **kwargs)

    return polled


def _flag(signum, frame) -> None:
    if signum in _received:
        # The same signal twice: the user (or the scheduler) insists. Die as the signal would.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _received.append(signum)
    print(
        f"{_signal_name(signum)} received: stopping at the next safe point (send it again to "
        "stop at once, without saving)",
        file=sys.stderr,
        flush=True,
    )


@contextmanager
def deferred_stop_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT only set the flag; the previous handlers (and an
    empty flag) come back on exit. Outside the main thread it does nothing (Python only lets
    the main thread install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    _received.clear()
    for signum in STOP_SIGNALS:
        signal.signal(signum, _flag)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        _received.clear()


F = TypeVar("F", bound=Callable[..., int | None])


def stops_on_signals(main: F) -> F:
    """Wrap a console-script ``main``: SIGTERM / SIGINT stop it at a safe point (see the module
    docstring), print ``stopped: <what happened and how to go on>`` on stderr, and exit with
    ``128 + signal``, without a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        with deferred_stop_signals():
            try:
                return main(*args, **kwargs)
            except RunInterrupted as e:
                print(f"stopped: {e}", file=sys.stderr, flush=True)
                sys.exit(128 + e.signum)
            except SIGTERMException:  # Lightning's own stop, in a loop this module does not poll
                print(
                    "stopped: SIGTERM; run the same command again to resume from the newest "
                    "checkpoint",
                    file=sys.stderr,
                    flush=True,
                )
                sys.exit(128 + signal.SIGTERM)

    return wrapper  # type: ignore[return-value]


def _checkpoint_dir(trainer: L.Trainer) -> Path:
    callback = trainer.checkpoint_callback
    if callback is not None and callback.dirpath:
        return Path(callback.dirpath)
    return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"


class StopAtSafePoint(L.Callback):
    """Stop a run at the next safe point after SIGTERM / SIGINT (module docstring).

    Training: at a batch end, the flag is max-reduced over DDP ranks (every rank stops at the
    same step), ``last.ckpt`` is saved through the run's ``ModelCheckpoint`` (a collective:
    every rank calls it, rank 0 writes), and ``RunInterrupted`` names it. Test and predict: at
    a batch end, ``RunInterrupted`` says how to run them again.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        flag = torch.tensor(float(stop_requested() or 0), device=pl_module.device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="max")
        signum = int(flag.item())
        if not signum:
            return
        callback = trainer.checkpoint_callback
        if callback is not None and getattr(callback, "save_last", False):
            callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
            saved = Path(callback.last_model_path or _checkpoint_dir(trainer) / "last.ckpt")
        else:
            saved = _checkpoint_dir(trainer) / "last.ckpt"
            trainer.save_checkpoint(saved)
        raise RunInterrupted(
            signum,
            f"{_signal_name(signum)} during training, at step {trainer.global_step}: saved "
            f"{saved}; run the same command again to resume from there",
        )

    def _stop_evaluation(self, trainer, what: str) -> None:
        signum = stop_requested()
        if signum is None:
            return
        ckpt = trainer.ckpt_path or _checkpoint_dir(trainer) / "final.ckpt"
        raise RunInterrupted(
            signum,
            f"{_signal_name(signum)} during {what}: nothing of it was written; the model is in "
            f"{ckpt}; run {what} again with the same options and --ckpt_path {ckpt} (vsad-fit: "
            "the same command tests it)",
        )

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._stop_evaluation(trainer, "the test")

    def on_predict_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._stop_evaluation(trainer, "the prediction")


class RequeueAtBatchEnd(L.Callback):
    """Defer the handler Lightning installed for ``signum`` (SIGUSR1) to the next batch end.

    Under DDP the flag is max-reduced over ranks at every batch end, so that all ranks call
    Lightning's handler (whose ``save_checkpoint`` is collective) at the same step even when
    the signal reaches them a few instructions apart.
    """

    def __init__(self, signum: int = signal.SIGUSR1) -> None:
        self.signum = signum
        self._lightning_handler = None
        self._received = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registers its handlers before the fit loop starts, and only when it runs
        # under SLURM with auto-requeue; a default handler means there is nothing to defer.
        handler = signal.getsignal(self.signum)
        if not callable(handler) or threading.current_thread() is not threading.main_thread():
            return
        self._lightning_handler = handler
        self._received = False
        signal.signal(self.signum, self._flag)

    def _flag(self, signum, frame) -> None:
        self._received = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._lightning_handler is None:
            return
        flag = torch.tensor(1.0 if self._received else 0.0, device=pl_module.device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="max")
        if flag > 0:
            handler, self._lightning_handler = self._lightning_handler, None
            signal.signal(self.signum, handler)
            handler(self.signum, None)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._lightning_handler is not None:
            signal.signal(self.signum, self._lightning_handler)
            self._lightning_handler = None
