"""``MemoryBankCallback``: build the memory bank of normal features when training ends, then
calibrate the scores on those normals.

docs/method.md#memory-bank: features of all training views, or a greedy k-center
coreset, per level; stored as module buffers so the bank travels in the checkpoint; under DDP
every rank's features reach the bank (the pitfall of anomalib#2673). The calibration
(``vsad_lightning.models.calibration``) scores every training normal against the bank without
its own rows, from the features the bank was built from (never extracted twice), and stores
normal-only statistics and OK/NG thresholds as module buffers too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from vsad_lightning.bank.builder import StreamingBankBuilder
from vsad_lightning.bank.coreset import greedy_coreset
from vsad_lightning.bank.storage import flatten_features, unflatten_features

FINAL_CHECKPOINT = "final.ckpt"
"""Written after the bank is built: the checkpoint ``vsad-test`` and ``vsad-predict`` take."""


class MemoryBankCallback(L.Callback):
    """At the end of training, extract features of every training normal and fill the bank.

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
    """

    def __init__(
        self,
        coreset_ratio: float = 1.0,
        projection_dim: int = 128,
        seed: int = 0,
        save_checkpoint: bool = True,
        streaming: bool = False,
        spill_dir: str | None = None,
    ) -> None:
        if not 0.0 < coreset_ratio <= 1.0:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.seed = seed
        self.save_checkpoint = save_checkpoint
        self.streaming = streaming
        self.spill_dir = spill_dir
        # How the bank was built; saved in the checkpoint (callbacks section) for audits.
        self.build_info: dict = {}
        self.grids: dict[int, tuple[int, int, int]] = {}
        self.image_size: tuple[int, int] | None = None
        self._homographies: list[Tensor] = []
        self._neighbour_mask: Tensor | None = None
        self._kept: dict[int, Tensor] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        # Fail before training, not after it, when the bank cannot serve the scoring.
        if getattr(pl_module.hparams, "bank_mode", "global") == "positional" and (
            self.coreset_ratio < 1.0
        ):
            raise ValueError(
                "model.bank_mode 'positional' compares features in place and needs every "
                f"training feature: set bank.coreset_ratio to 1.0 (got {self.coreset_ratio})"
            )

    @torch.no_grad()
    def collect_features(self, trainer: L.Trainer, pl_module) -> dict[int, Tensor]:
        """This rank's shard of training features, gathered from every rank: ``(N_l, C_l)``.

        Also records each level's ``(V, h, w)`` grid in ``self.grids``: the rows are whole
        feature maps in ``flatten_features`` order (rank order under DDP, whole samples each).
        """
        loader = _shard(
            trainer.datamodule.train_feature_dataloader(), trainer.global_rank, trainer.world_size
        )
        was_training = pl_module.training
        pl_module.eval()
        chunks: dict[int, list[Tensor]] = {}
        for batch in loader:
            batch = batch.to(pl_module.device)
            self._record_geometry(batch)
            for level, feats in pl_module.extract_features(batch).items():
                self.grids[level] = (feats.shape[1], feats.shape[3], feats.shape[4])
                chunks.setdefault(level, []).append(flatten_features(feats.float()))
        pl_module.train(was_training)
        if not chunks:
            raise RuntimeError("the training feature loader yielded no samples on this rank")
        local = {level: torch.cat(parts) for level, parts in chunks.items()}
        if trainer.world_size == 1:
            return local
        return {level: _gather_rows(pl_module, rows) for level, rows in local.items()}

    @torch.no_grad()
    def stream_features(self, trainer: L.Trainer, pl_module) -> StreamingBankBuilder:
        """This rank's shard of training features, spilled to disk batch by batch."""
        loader = _shard(
            trainer.datamodule.train_feature_dataloader(), trainer.global_rank, trainer.world_size
        )
        builder = StreamingBankBuilder(
            coreset_ratio=self.coreset_ratio,
            projection_dim=self.projection_dim,
            seed=self.seed,
            spill_dir=self.spill_dir,
        )
        was_training = pl_module.training
        pl_module.eval()
        try:
            for batch in loader:
                batch = batch.to(pl_module.device)
                self._record_geometry(batch)
                for level, feats in pl_module.extract_features(batch).items():
                    self.grids[level] = (feats.shape[1], feats.shape[3], feats.shape[4])
                    builder.add(level, flatten_features(feats.float()), feats.shape[0])
        except BaseException:
            builder.close()
            raise
        finally:
            pl_module.train(was_training)
        if not builder.levels:
            raise RuntimeError("the training feature loader yielded no samples on this rank")
        return builder

    def _record_geometry(self, batch) -> None:
        """Keep what calibration needs of each training batch besides its features: the image
        size, and the homographies and neighbour mask that cross-view fusion of the normals'
        maps uses (``model.fusion_strength``)."""
        self.image_size = batch.image_size
        self._homographies.append(batch.homographies.float().cpu())
        self._neighbour_mask = batch.neighbour_mask.cpu()

    def _normal_homographies(self, trainer: L.Trainer, pl_module) -> Tensor:
        """``(N, V, V, 3, 3)`` homographies of every training normal, in the unsharded
        loader's order (each rank saw the strided shard ``rank, rank + world, ...``)."""
        local = torch.cat(self._homographies)
        if trainer.world_size == 1:
            return local
        shape = local.shape[1:]
        gathered = _gather_rows(pl_module, local.flatten(1).to(pl_module.device)).cpu()
        return gathered.view(-1, *shape)[_loader_order(gathered.shape[0], trainer.world_size)]

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self.build_info = {
            "world_size": trainer.world_size,
            "coreset_ratio": self.coreset_ratio,
            "streaming": self.streaming,
        }
        self._kept = {}
        self._homographies: list[Tensor] = []
        self._neighbour_mask: Tensor | None = None
        features: dict[int, Tensor] | None = None
        builder: StreamingBankBuilder | None = None
        if self.streaming:
            builder = self.stream_features(trainer, pl_module)
            # A coreset's calibration reads the rows it was selected from back from the spill.
            builder.keep_spill = self.coreset_ratio < 1.0
            gather = pl_module.all_gather if trainer.world_size > 1 else None
            levels = builder.build(gather, trainer.global_rank)
        else:
            features = self.collect_features(trainer, pl_module)
            self.build_info["feature_rows"] = {
                str(level): int(rows.shape[0]) for level, rows in features.items()
            }
            levels = self._in_memory_levels(features)
        rank_zero_info(f"memory bank: features gathered from {trainer.world_size} process(es)")
        try:
            for level, rows in levels:
                # Every feature in sample order keeps its place (positional bank); a coreset
                # does not.
                grid = self.grids.get(level) if self.coreset_ratio >= 1.0 else None
                pl_module.memory_bank.set_level(level, rows, grid=grid)
                rank_zero_info(f"memory bank level {level}: {rows.shape[0]} x {rows.shape[1]}")
            if builder is not None:
                self.build_info["feature_rows"] = {
                    str(level): rows for level, rows in builder.total_rows.items()
                }
                self._kept = dict(builder.kept)
            homographies = self._normal_homographies(trainer, pl_module)
            self.calibrate(trainer, pl_module, features, builder, homographies)
        finally:
            if builder is not None:
                builder.close()
        if self.save_checkpoint:
            # save_checkpoint is collective under DDP: every rank calls it, rank 0 writes.
            trainer.save_checkpoint(Path(self._checkpoint_dir(trainer)) / FINAL_CHECKPOINT)

    def _in_memory_levels(self, features: dict[int, Tensor]):
        for level, rows in sorted(features.items()):
            if self.coreset_ratio < 1.0:
                keep = greedy_coreset(
                    rows, self.coreset_ratio, projection_dim=self.projection_dim, seed=self.seed
                )
                self._kept[level] = keep
                rows = rows[keep]
            yield level, rows

    @torch.no_grad()
    def calibrate(
        self,
        trainer: L.Trainer,
        pl_module,
        features: dict[int, Tensor] | None,
        builder: StreamingBankBuilder | None,
        homographies: Tensor | None = None,
    ) -> None:
        """Fit ``pl_module.calibration`` from LOO maps of every training normal (collective).

        Where the features come from: a bank of whole feature maps holds them itself
        (``MemoryBank.sample_features``); a coreset needs the rows it was selected from, which
        are ``features`` (the in-memory build, every rank holds all of them) or this rank's
        spill file (the streaming build, which keeps it for this).
        """
        bank = pl_module.memory_bank
        rank, world = trainer.global_rank, trainer.world_size
        if self.image_size is None:
            raise RuntimeError("calibration: no training batch was seen (image size unknown)")
        levels = bank.levels
        first = levels[0]
        row_samples: dict[int, Tensor] | None = None
        features_of: Callable[[Tensor], dict[int, Tensor]]
        if all(bank.grid(level) is not None for level in levels):
            total = bank.num_samples(first)

            def features_of(ids: Tensor) -> dict[int, Tensor]:
                return {level: bank.sample_features(level, ids) for level in levels}

        else:
            per_sample = {level: math.prod(self.grids[level]) for level in levels}
            row_samples = {level: self._kept[level] // per_sample[level] for level in levels}
            if features is not None:
                total = features[first].shape[0] // per_sample[first]

                def read(level: int, ids: Tensor) -> Tensor:
                    rows = features[level]
                    return rows.view(-1, per_sample[level], rows.shape[1])[ids.to(rows.device)]

            else:
                assert builder is not None
                total = builder.total_rows[first] // per_sample[first]

                def read(level: int, ids: Tensor) -> Tensor:
                    # This rank's spill holds global samples rank, rank + world, ...
                    return builder.local_samples(level, (ids - rank) // world)

            def features_of(ids: Tensor) -> dict[int, Tensor]:
                out = {}
                for level in levels:
                    rows = read(level, ids)
                    out[level] = unflatten_features(
                        rows.reshape(-1, rows.shape[-1]).float(), (ids.numel(), *self.grids[level])
                    )
                return out

        if total < 2:
            rank_zero_warn(
                f"calibration skipped: {total} training normal (leave-one-out needs at least 2); "
                "the model can only be tested with model.calibration none, without OK/NG"
            )
            return
        started = time.perf_counter()
        samples = torch.arange(rank, total, world)
        maps = pl_module.leave_one_out_maps(samples, features_of, self.image_size, row_samples)
        if world > 1:
            shape = maps.shape[1:]
            gathered = _gather_rows(pl_module, maps.flatten(1).contiguous())
            # Rank r scored samples r, r + world, ...: back to sample order on every rank.
            maps = gathered[_loader_order(total, world).to(gathered.device)].view(-1, *shape)
        if world > 1 and builder is None:
            # The in-memory bank holds the samples in rank order; the calibration stores the
            # normals in the loader's order, as one process and the streaming build do.
            maps = maps[_loader_order(total, world).to(maps.device)]
        if homographies is not None and homographies.shape[0] != total:
            raise RuntimeError(
                f"calibration: {homographies.shape[0]} homographies for {total} training normals"
            )
        pl_module.fit_calibration(maps, homographies, self._neighbour_mask)
        if world > 1:
            # The maps are the same on every rank, and so is the fit; rank 0's buffers are sent
            # to every rank anyway, so no rank can be left with other thresholds.
            state = {k: v.cpu() for k, v in pl_module.calibration.state_dict().items()}
            state = trainer.strategy.broadcast(state, src=0)
            pl_module.calibration.load_state_dict(state)
        rank_zero_info(
            f"calibration: leave-one-out maps of {total} training normals "
            f"({time.perf_counter() - started:.1f} s)"
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


def _loader_order(total: int, world: int) -> Tensor:
    """Indices that put rank-ordered samples (rank 0's ``0, world, ...``, then rank 1's ``1,
    world + 1, ...``) back in the loader's order ``0, 1, 2, ...``."""
    return torch.argsort(torch.cat([torch.arange(r, total, world) for r in range(world)]))


def _gather_rows(pl_module, rows: Tensor) -> Tensor:
    """All-gather ``(n_r, C)`` rows of different lengths from every rank, rank order."""
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = pl_module.all_gather(count).flatten().tolist()
    padded = rows.new_zeros((max(counts), rows.shape[1]))
    padded[: rows.shape[0]] = rows
    gathered = pl_module.all_gather(padded)  # (world, max_n, C)
    return torch.cat([gathered[r, :n] for r, n in enumerate(counts)])
