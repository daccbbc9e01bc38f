"""Under DDP, a non-finite loss on ONE rank skips the step on EVERY rank
(``VSADModule.training_step``: the "bad" flag is max-reduced over ranks first).

Were the decision taken per rank, the ranks with a finite loss would run backward and wait in
DDP's gradient all-reduce for the rank that skipped: a deadlock. Two real processes over gloo
run a real ``Trainer(strategy="ddp")``; they meet through a rendezvous file (no TCP port), as
under ``torchrun`` (the torchelastic variables tell Lightning that the processes exist already).
The process group's timeout turns a deadlock into an error, and the test gives up on the
processes after a generous deadline rather than hanging the suite.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vsad_lightning.data.datamodule import MultiViewDataModule
from vsad_lightning.system.module import VSADModule

WORLD = 2
COLLECTIVE_TIMEOUT = timedelta(seconds=90)  # a skipped all-reduce raises instead of hanging
GIVE_UP_S = 600  # far above the normal run; only a hang that the timeout missed reaches it


class PoisonRankOne(L.Callback):
    """NaN images on rank 1 at global step 0 only: rank 0's loss stays finite there."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == 1 and trainer.global_step == 0:
            batch.images.fill_(float("nan"))


def _worker(rank: int, rendezvous: str, root: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD), TORCHELASTIC_RUN_ID="vsad-test", MASTER_ADDR="127.0.0.1",
        MASTER_PORT="1",  # read by Lightning's environment, never used: the group exists
    )  # fmt: skip
    dist.init_process_group(
        "gloo", init_method=rendezvous, rank=rank, world_size=WORLD, timeout=COLLECTIVE_TIMEOUT
    )
    try:
        L.seed_everything(0, verbose=False)
        model = VSADModule(
            image_size=64, attention_dim=16, num_heads=2, lr=5e-4, warmup_steps=0,
            inversion_steps=1, knn_backend="torch",
        )  # fmt: skip
        # 8 normals, 4 per rank, batch 2: two steps per rank.
        data = MultiViewDataModule(
            root, "brick", resolution=64, image_size=64, batch_size=2, seed=0,
            per_sample_homographies=False,
        )  # fmt: skip
        trainer = L.Trainer(
            accelerator="cpu", devices=WORLD, strategy="ddp", max_steps=2, logger=False,
            default_root_dir=str(out_dir),  # the bank's final.ckpt lands here, not in the cwd
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[PoisonRankOne()], num_sanity_val_steps=0,
        )  # fmt: skip
        trainer.fit(model, datamodule=data)
        checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
        optimizer = trainer.optimizers[0]
        adam_steps = {int(optimizer.state[p]["step"]) for p in model.unet.trainable_parameters()}
        Path(out_dir, f"rank{rank}.json").write_text(
            json.dumps(
                {
                    "skipped": model.skipped_steps,
                    "global_step": trainer.global_step,
                    "checksum": checksum,
                    "adam_steps": sorted(adam_steps),
                }
            )
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_one_ranks_nan_skips_the_step_on_every_rank(
    synthetic_root_cached, ddp_rendezvous, tmp_path
):
    context = mp.start_processes(
        _worker,
        args=(ddp_rendezvous, str(synthetic_root_cached), str(tmp_path)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + GIVE_UP_S
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"the DDP run did not finish within {GIVE_UP_S} s: deadlocked")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for rank, result in enumerate(results):
        # Two steps each (Lightning counts a skipped step, as in one process); the first was
        # skipped everywhere although rank 0's loss was finite, so AdamW applied one update.
        assert result["global_step"] == 2, (rank, result)
        assert result["skipped"] == 1, (rank, result)
        assert result["adam_steps"] == [1], (rank, result)
    # Both ranks took the same step: the weights are the same.
    assert results[0]["checksum"] == results[1]["checksum"]
