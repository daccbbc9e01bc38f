"""``RequeueAtBatchEnd``: act on SLURM's requeue signal between steps, never inside one.

Lightning's SLURM auto-requeue (``SLURMEnvironment(auto_requeue=True)``) saves
``<default_root_dir>/hpc_ckpt_N.ckpt`` and runs ``scontrol requeue`` from inside the signal
handler, i.e. wherever the main thread happens to be: possibly halfway through the optimiser's
loop over parameters. Such a checkpoint holds half-updated weights, and a run resumed from it
cannot match an uninterrupted one. This callback lets the signal only raise a flag and runs
Lightning's own handler at the next training batch end, where the state is the same as in a
``last.ckpt`` written there (``vsad_lightning.cli.run`` resumes from either).
"""

from __future__ import annotations

import signal
import threading

import lightning as L
import torch


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
