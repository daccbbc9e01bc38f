"""``MemoryBankCallback``: build the memory bank of normal features when training ends, then
calibrate the scores on those normals, by driving ``VSADModel.fit_memory_bank``.

docs/method.md#memory-bank: features of all training views, or a greedy k-center
coreset, per level; stored as module buffers so the bank travels in the checkpoint; under DDP
every rank's features reach the bank (the pitfall of anomalib#2673). The calibration
(``vsad_lightning.models.calibration``) scores every training normal against the bank without
its own rows, from the features the bank was built from (never extracted twice), and stores
normal-only statistics and OK/NG thresholds as module buffers too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Subset

from vsad_lightning.callbacks.preemption import raise_if_stop_requested
from vsad_lightning.utils.progress import Progress

BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16}
"""``bank.dtype`` -> the storage dtype of the memory bank."""

FINAL_CHECKPOINT = "final.ckpt"
"""Written after the bank is built: the checkpoint ``vsad-test`` and ``vsad-predict`` take."""


class MemoryBankCallback(L.Callback):
    """At the end of training, extract features of every training normal and fill the bank
    (``VSADModel.fit_memory_bank``; this callback gives it the loader shard and collectives).

    ``VSADModule.configure_callbacks`` adds one with the defaults when the Trainer has none,
    so a plain ``Trainer.fit`` ends with a model that scores.

    The features come from the DataModule's ``train_feature_dataloader()``: the training
    normals in a fixed order, without augmentation or shuffling. Each rank extracts a strided
    shard (``rank::world_size``), the shards are gathered, so every rank holds the same bank,
    then an optional coreset is selected with a fixed seed (identical on every rank).

    Then the calibration: each rank scores a strided share of the training samples against the
    bank without their own rows (``VSADModule.leave_one_out_maps``: the features are the bank's
    own rows, or for a coreset the rows it was selected from), the maps are gathered in sample
    order and every rank fits the same ``VSADModule.calibration`` from the same maps. It costs
    about one scoring pass over the training set.

    Args:
        coreset_ratio: fraction of rows kept per level by greedy k-center selection; 1.0 keeps
            every feature (the paper's choice).
        projection_dim: random-projection width used for the coreset's distances.
        seed: the coreset's random projection seed.
        save_checkpoint: write ``checkpoints/final.ckpt`` (model + bank) once the bank exists.
        streaming: build with ``StreamingBankBuilder``: feature rows are spilled to a temporary
            file per level as they are extracted and only their random projections stay in RAM,
            so the full feature set is never held at once (for banks larger than RAM; see
            ``benchmarks/bank_scale.py``). Rows are then in the unsharded loader's order on any
            number of processes (the in-memory path concatenates rank shards), so the coreset
            does not depend on the number of processes.
        spill_dir: directory of the streaming build's spill files (``None``: the system temp
            directory); it needs ``4 N D`` bytes per level for this process's rows.
        dtype: the bank's storage dtype. ``"float16"`` halves the bank in memory, in the
            checkpoint and in the streaming build's peak (``bank_scale.py``: what a full
            Real-IAD category needs on a 24 GB machine); the search still computes in float32,
            so only the stored rows are rounded (relative error about 5e-4).
    """

    def __init__(
        self,
        coreset_ratio: float = 1.0,
        projection_dim: int = 128,
        seed: int = 0,
        save_checkpoint: bool = True,
        streaming: bool = False,
        spill_dir: str | None = None,
        dtype: Literal["float32", "float16"] = "float32",
    ) -> None:
        if dtype not in BANK_DTYPES:
            raise ValueError(f"bank.dtype must be one of {sorted(BANK_DTYPES)}, got {dtype!r}")
        if not 0.0 < coreset_ratio <= 1.0:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.seed = seed
        self.save_checkpoint = save_checkpoint
        self.streaming = streaming
        self.spill_dir = spill_dir
        self.dtype = dtype
        # How the bank was built; saved in the checkpoint (callbacks section) for audits.
        self.build_info: dict = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        # Fail before training, not after it, when the bank cannot serve the scoring.
        if getattr(pl_module.hparams, "bank_mode", "global") == "positional" and (
            self.coreset_ratio < 1.0
        ):
            raise ValueError(
                "model.bank_mode 'positional' compares features in place and needs every "
                f"training feature: set bank.coreset_ratio to 1.0 (got {self.coreset_ratio})"
            )

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        # A run resumed from a checkpoint written at the end of training (stopped or killed
        # while the bank was built) skips the fit loop, and with it on_train_end: build here.
        if not pl_module.memory_bank.is_built():
            self.on_train_end(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        """Drive ``VSADModel.fit_memory_bank`` over this rank's shard of the training normals,
        then write ``final.ckpt``."""
        rank_zero_info("memory bank: extracting the training normals' features")
        loader = _shard(
            trainer.datamodule.train_feature_dataloader(), trainer.global_rank, trainer.world_size
        )
        model = pl_module._sync_model() if hasattr(pl_module, "_sync_model") else pl_module.model
        distributed = trainer.world_size > 1
        meter = _meter(trainer, loader)
        try:
            self.build_info = model.fit_memory_bank(
                loader,
                gather=pl_module.all_gather if distributed else None,
                rank=trainer.global_rank,
                world_size=trainer.world_size,
                broadcast=(lambda obj: trainer.strategy.broadcast(obj, src=0))
                if distributed
                else None,
                coreset_ratio=self.coreset_ratio,
                projection_dim=self.projection_dim,
                seed=self.seed,
                streaming=self.streaming,
                spill_dir=self.spill_dir,
                dtype=BANK_DTYPES[self.dtype],
                log=rank_zero_info,
                warn=rank_zero_warn,
                check_stop=lambda: raise_if_stop_requested(*_bank_stop(trainer)),
                on_batch=meter.update,
            )
        finally:
            meter.close()
        # final.ckpt holds no callback state (weights only): the system keeps a copy.
        pl_module.bank_build_info = dict(self.build_info)
        if self.save_checkpoint:
            # save_checkpoint is collective under DDP: every rank calls it, rank 0 writes.
            trainer.save_checkpoint(
                Path(self._checkpoint_dir(trainer)) / FINAL_CHECKPOINT, weights_only=True
            )

    def state_dict(self) -> dict:
        return dict(self.build_info)

    def load_state_dict(self, state_dict: dict) -> None:
        self.build_info = dict(state_dict)

    @staticmethod
    def _checkpoint_dir(trainer: L.Trainer) -> str:
        if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
            return trainer.checkpoint_callback.dirpath
        return str(Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints")


def _bank_stop(trainer: L.Trainer) -> tuple[str, str]:
    """What ``raise_if_stop_requested`` says when a stop signal ends the bank's build."""
    last = Path(MemoryBankCallback._checkpoint_dir(trainer)) / "last.ckpt"
    then = (
        f"training is complete in {last}; run the same command again to build the bank and test"
        if last.is_file()
        else "no checkpoint of the trained model was written; the run must be repeated"
    )
    return "while building the memory bank", then


def _meter(trainer: L.Trainer, loader) -> Progress:
    """The progress of reading the training normals' features (rank 0 shows it)."""
    try:
        total = len(loader)
    except TypeError:
        total = None
    return Progress(
        total, "memory bank: features of the training normals", enabled=trainer.is_global_zero
    )


def _shard(loader: DataLoader, rank: int, world_size: int) -> DataLoader:
    """The same loader over samples ``rank, rank + world_size, ...`` (in order)."""
    if world_size == 1:
        return loader
    indices = range(rank, len(loader.dataset), world_size)
    return DataLoader(
        Subset(loader.dataset, indices),
        batch_size=loader.batch_size,
        shuffle=False,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
    )
