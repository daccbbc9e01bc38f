"""Streaming bank builder: same banks as the in-memory path, in one process and over real gloo."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vsad_lightning.bank.builder import StreamingBankBuilder
from vsad_lightning.bank.coreset import greedy_coreset

ROWS_PER_SAMPLE = {0: 12, 1: 48}  # two levels, e.g. 5 views at 2x2 and 4x4... any fixed count
DIMS = {0: 24, 1: 10}


def batches(num_samples: int = 23, batch_size: int = 4, seed: int = 0):
    """``(level, rows, samples)`` like the callback's feature loop, plus all rows per level."""
    g = torch.Generator().manual_seed(seed)
    per_sample = {
        level: torch.randn(num_samples, ROWS_PER_SAMPLE[level], DIMS[level], generator=g)
        for level in ROWS_PER_SAMPLE
    }
    return per_sample


def feed(builder: StreamingBankBuilder, per_sample: dict, samples: list[int], batch_size: int = 4):
    for b0 in range(0, len(samples), batch_size):
        chosen = samples[b0 : b0 + batch_size]
        for level, rows in per_sample.items():
            builder.add(level, rows[chosen].flatten(0, 1), len(chosen))


def all_rows(per_sample: dict) -> dict:
    return {level: rows.flatten(0, 1) for level, rows in per_sample.items()}


def test_full_bank_equals_the_concatenated_rows_and_spill_files_go(tmp_path):
    per_sample = batches()
    builder = StreamingBankBuilder(spill_dir=str(tmp_path), piece_rows=50)
    feed(builder, per_sample, list(range(23)))
    assert len(list(tmp_path.iterdir())) == 2  # one spill file per level
    banks = dict(builder.build())
    for level, rows in all_rows(per_sample).items():
        assert torch.equal(banks[level], rows), level
    assert builder.total_rows == {0: 23 * 12, 1: 23 * 48}
    assert list(tmp_path.iterdir()) == []


def test_float16_bank_is_assembled_piece_by_piece_and_too_big_a_bank_fails_first(tmp_path):
    per_sample = batches(seed=4)
    builder = StreamingBankBuilder(spill_dir=str(tmp_path), piece_rows=50, dtype=torch.float16)
    feed(builder, per_sample, list(range(23)))
    banks = dict(builder.build())
    for level, rows in all_rows(per_sample).items():
        assert banks[level].dtype == torch.float16
        assert torch.equal(banks[level], rows.half()), level
    # The banks need 23 * (12 * DIMS[0] + 48 * DIMS[1]) * 2 bytes: one byte less is refused
    # with one clear line before anything is allocated, and the spill files still go.
    needed = 23 * (12 * DIMS[0] + 48 * DIMS[1]) * 2
    builder = StreamingBankBuilder(
        spill_dir=str(tmp_path), dtype=torch.float16, memory_limit_bytes=needed - 1
    )
    feed(builder, per_sample, list(range(23)))
    assert builder.required_bytes({0: 23 * 12, 1: 23 * 48}) == needed
    with pytest.raises(MemoryError, match="needs .* GB but .* GB of memory are available"):
        dict(builder.build())
    assert list(tmp_path.iterdir()) == []


def test_exact_coreset_equals_greedy_coreset_of_all_rows(tmp_path):
    # projection_dim >= D: no projection on either side, so the selections must be identical.
    per_sample = batches(seed=1)
    builder = StreamingBankBuilder(
        coreset_ratio=0.2, projection_dim=64, seed=3, spill_dir=str(tmp_path)
    )
    feed(builder, per_sample, list(range(23)))
    banks = dict(builder.build())
    for level, rows in all_rows(per_sample).items():
        keep = greedy_coreset(rows, 0.2, projection_dim=64, seed=3)
        assert torch.equal(banks[level], rows[keep]), level


def test_projected_coreset_is_greedy_coreset_of_the_projected_rows(tmp_path):
    per_sample = batches(seed=2)
    builder = StreamingBankBuilder(
        coreset_ratio=0.25, projection_dim=4, seed=5, spill_dir=str(tmp_path)
    )
    feed(builder, per_sample, list(range(23)))
    banks = dict(builder.build())
    for level, rows in all_rows(per_sample).items():
        # greedy_coreset's own projection (same seed), applied batch by batch as the builder.
        projection = torch.randn(
            DIMS[level], 4, generator=torch.Generator().manual_seed(5)
        ) / math.sqrt(4)
        projected = torch.cat(
            [per_sample[level][b0 : b0 + 4].flatten(0, 1) @ projection for b0 in range(0, 23, 4)]
        )
        keep = greedy_coreset(projected, 0.25, projection_dim=4, seed=5)
        bank = banks[level]
        assert bank.shape == (round(0.25 * rows.shape[0]), rows.shape[1])
        assert torch.equal(bank, rows[keep]), level
        assert torch.unique(bank, dim=0).shape[0] == bank.shape[0]


def test_bad_rows_are_refused(tmp_path):
    builder = StreamingBankBuilder(spill_dir=str(tmp_path))
    with pytest.raises(ValueError, match="do not split"):
        builder.add(0, torch.zeros(10, 3), 3)
    builder.add(0, torch.zeros(6, 3), 2)
    with pytest.raises(ValueError, match="every sample must give 3 rows of width 3"):
        builder.add(0, torch.zeros(8, 3), 2)
    with pytest.raises(ValueError, match="NaN"):
        builder.add(0, torch.full((3, 3), float("nan")), 1)
    builder.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="no feature rows"):
        next(StreamingBankBuilder().build())


def _worker(rank: int, world: int, rendezvous: str, ratio: float, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    try:

        def all_gather(tensor: torch.Tensor) -> torch.Tensor:
            parts = [torch.empty_like(tensor) for _ in range(world)]
            dist.all_gather(parts, tensor.contiguous())
            return torch.stack(parts)

        builder = StreamingBankBuilder(
            coreset_ratio=ratio, projection_dim=6, seed=1, spill_dir=out_dir, piece_rows=40
        )
        # The callback's strided shard: samples rank, rank + world, ...
        feed(builder, batches(seed=4), list(range(rank, 23, world)), batch_size=3)
        banks = dict(builder.build(all_gather, rank))
        torch.save(banks, Path(out_dir) / f"banks_{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("ratio", [1.0, 0.3])
def test_gloo_two_ranks_build_the_single_process_bank(tmp_path, ratio, ddp_rendezvous):
    per_sample = batches(seed=4)
    single = StreamingBankBuilder(
        coreset_ratio=ratio, projection_dim=6, seed=1, spill_dir=str(tmp_path)
    )
    feed(single, per_sample, list(range(23)))
    expected = dict(single.build())
    mp.start_processes(
        _worker, args=(2, ddp_rendezvous, ratio, str(tmp_path)), nprocs=2, start_method="spawn"
    )
    for rank in (0, 1):
        banks = torch.load(tmp_path / f"banks_{rank}.pt")
        assert banks.keys() == expected.keys()
        for level, bank in expected.items():
            # Same rows in the same order (global sample order), on every rank.
            assert torch.equal(banks[level], bank), (rank, level)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["banks_0.pt", "banks_1.pt"]
