"""Streaming memory-bank build: feature rows go to disk as they are extracted.

The bank (docs/method.md#memory-bank) keeps all training features, or a greedy k-center coreset
(ratio rho) of them, per level. Collecting them in RAM first (a list of batches, ``torch.cat``,
a DDP all-gather) needs two to three times the full feature set, which for one Real-IAD
category at SD2 widths is tens of GB (``benchmarks/bank_scale.py``). This builder holds at most
one batch of raw features at a time:

* ``add(level, rows, num_samples)`` appends the batch's float32 rows to a per-level spill file
  (``spill_dir``, default the system temp directory) and, when a coreset is wanted, keeps only
  their Gaussian random projection to ``projection_dim`` columns in RAM (``N x k`` instead of
  ``N x D``; the projection is the one ``greedy_coreset`` draws from ``seed``).
* ``build()`` yields one level at a time: greedy k-center selection on the projected rows
  (``greedy_coreset`` itself, run on the projections: its pruned selection from 50,000 rows
  on, ``O(N k)`` memory), then only the selected rows are read back from the spill file; with
  ratio 1.0 the bank is filled piece by piece from the file.

Peak memory: ratio 1.0, the bank itself plus one piece (``piece_rows`` rows); ratio < 1,
``~3 N k`` floats for the selection (the projections, their centred copy, the running
distances; the pruned selection's block ids and bounds fit in the same estimate for ``k`` >= 32)
plus the selected ``M x D`` rows, whatever ``D`` is.

Row order (needed for identical banks whatever the number of processes): rows are kept in
*global sample order*, the order of the unsharded feature loader. Under DDP each rank gets the
strided shard ``rank::world_size`` (``MemoryBankCallback``), so global sample ``i`` is local
sample ``i // world`` of rank ``i % world``; ``build(all_gather=...)`` gathers pieces from every
rank and puts each row in its global place. The greedy selection then sees the same rows in the
same order on every rank and in a single process, so the coreset is the same too (up to the
float differences of the features themselves). Every sample must give the same number of rows
per level (true for a fixed rig: ``V x h x w``).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vsad_lightning.bank.coreset import greedy_coreset

AllGather = Callable[[Tensor], Tensor]
"""``t -> (world_size, *t.shape)``: every rank's ``t`` in rank order (``all_gather``)."""


@dataclass
class _LevelSpill:
    path: str
    dim: int
    rows: int = 0
    samples: int = 0
    rows_per_sample: int | None = None
    projected: list[Tensor] = field(default_factory=list)


class StreamingBankBuilder:
    """Build per-level banks from batches of feature rows without holding all of them.

    Args:
        coreset_ratio: fraction of rows kept per level by greedy k-center selection; 1.0 keeps
            every row.
        projection_dim: random-projection width of the coreset's distances (as
            ``greedy_coreset``); when it is ``>= D`` the raw rows are kept in RAM instead and the
            selection is exact (and no memory is saved).
        seed: seed of the projection and of the first selected row.
        spill_dir: directory of the temporary spill files (``None``: ``tempfile``'s default).
            Needs ``4 N D`` bytes of disk per level for the rows this process extracts.
        piece_rows: rows per read from the spill file and per all-gather step.
        dtype: the dtype the banks are assembled in (``torch.float16`` halves the peak: the
            float32 rows are converted piece by piece and never exist whole in float32).
        memory_limit_bytes: the RAM the banks may take; ``None``: the ``MemAvailable`` of
            ``/proc/meminfo`` when ``build`` starts (no check where it cannot be read).
            ``build`` raises one clear ``MemoryError`` before allocating anything when the
            banks of all levels (plus a coreset's selection) would not fit, instead of an
            out-of-memory kill halfway (``required_bytes``).
    """

    def __init__(
        self,
        coreset_ratio: float = 1.0,
        projection_dim: int = 128,
        seed: int = 0,
        spill_dir: str | None = None,
        piece_rows: int = 65_536,
        dtype: torch.dtype = torch.float32,
        memory_limit_bytes: int | None = None,
    ) -> None:
        if not 0.0 < coreset_ratio <= 1.0:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        if projection_dim < 1 or piece_rows < 1:
            raise ValueError("projection_dim and piece_rows must be >= 1")
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.seed = seed
        self.spill_dir = spill_dir
        self.piece_rows = piece_rows
        if not dtype.is_floating_point:
            raise ValueError(f"the bank dtype must be a floating point type, got {dtype}")
        self.dtype = dtype
        self.memory_limit_bytes = memory_limit_bytes
        self._levels: dict[int, _LevelSpill] = {}
        self._projections: dict[int, Tensor | None] = {}
        self.total_rows: dict[int, int] = {}
        """Feature rows per level over all processes, filled by ``build``."""
        self.kept: dict[int, Tensor] = {}
        """Per level, the global row indices the coreset kept (filled by ``build``, ratio < 1)."""
        self.keep_spill = False
        """True: ``build`` leaves the spill files for ``local_samples`` (``close`` removes them)."""

    # --------------------------------------------------------------------------- streaming
    def _projection(self, dim: int) -> Tensor | None:
        """``greedy_coreset``'s projection for width ``dim`` (None: use the rows as they are)."""
        if dim not in self._projections:
            if self.projection_dim >= dim:
                self._projections[dim] = None
            else:
                generator = torch.Generator().manual_seed(self.seed)
                self._projections[dim] = torch.randn(
                    dim, self.projection_dim, generator=generator
                ) / math.sqrt(self.projection_dim)
        return self._projections[dim]

    @torch.no_grad()
    def add(self, level: int, rows: Tensor, num_samples: int) -> None:
        """Append ``rows`` ``(num_samples * r, D)`` of ``num_samples`` consecutive samples."""
        if rows.dim() != 2 or rows.shape[0] == 0 or num_samples < 1:
            raise ValueError(
                f"bank level {level}: expected rows (n, D) of >= 1 samples, got "
                f"{tuple(rows.shape)} for {num_samples} samples"
            )
        if rows.shape[0] % num_samples:
            raise ValueError(
                f"bank level {level}: {rows.shape[0]} rows do not split into {num_samples} "
                "samples of equal size"
            )
        rows = rows.detach().to("cpu", torch.float32).contiguous()
        if not torch.isfinite(rows).all():
            raise ValueError(f"bank level {level}: features contain NaN or inf")
        spill = self._levels.get(level)
        if spill is None:
            handle, path = tempfile.mkstemp(
                prefix=f"vsad_bank_level{level}_", suffix=".f32", dir=self.spill_dir
            )
            os.close(handle)
            spill = self._levels[level] = _LevelSpill(path=path, dim=rows.shape[1])
        per_sample = rows.shape[0] // num_samples
        if rows.shape[1] != spill.dim or spill.rows_per_sample not in (None, per_sample):
            raise ValueError(
                f"bank level {level}: every sample must give {spill.rows_per_sample} rows of "
                f"width {spill.dim}; got {per_sample} rows of width {rows.shape[1]}"
            )
        spill.rows_per_sample = per_sample
        with open(spill.path, "ab") as f:
            rows.numpy().tofile(f)
        spill.rows += rows.shape[0]
        spill.samples += num_samples
        if self.coreset_ratio < 1.0:
            projection = self._projection(spill.dim)
            spill.projected.append(rows.clone() if projection is None else rows @ projection)

    @property
    def levels(self) -> list[int]:
        return sorted(self._levels)

    def feature_rows(self, level: int) -> int:
        """Rows this process has added to ``level``."""
        return self._levels[level].rows

    # ------------------------------------------------------------------------------- build
    @torch.no_grad()
    def build(
        self, all_gather: AllGather | None = None, rank: int = 0
    ) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(level, bank rows)`` level by level, ascending; spill files are then removed.

        ``all_gather``: under DDP, ``LightningModule.all_gather`` (collective: every rank must
        call ``build`` with the same levels), and ``rank`` this process's global rank; ``None``
        and 0 in a single process.
        """
        if not self._levels:
            raise RuntimeError("no feature rows were added to the bank builder")
        try:
            self._check_memory(all_gather, rank)
            for level in self.levels:
                yield level, self._build_level(level, self._levels[level], all_gather, rank)
                if not self.keep_spill:
                    self._remove(level)
        finally:
            if not self.keep_spill:
                self.close()

    def required_bytes(self, total_rows: dict[int, int]) -> int:
        """RAM the banks of every level take once built, from their row counts over all ranks:
        the kept rows in ``dtype``, plus the largest level's coreset selection (its projected
        rows, their centred copy and the running distances: ``~3 N k`` float32)."""
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        kept = sum(
            max(1, round(self.coreset_ratio * rows)) * self._levels[level].dim
            for level, rows in total_rows.items()
        )
        selection = 0
        if self.coreset_ratio < 1.0:
            selection = max(
                3 * rows * min(self.projection_dim, self._levels[level].dim) * 4
                for level, rows in total_rows.items()
            )
        return kept * itemsize + selection

    def _check_memory(self, all_gather: AllGather | None, rank: int) -> None:
        total_rows = {
            level: _Layout.of(spill, all_gather, rank).total
            for level, spill in self._levels.items()
        }
        needed = self.required_bytes(total_rows)
        limit = self.memory_limit_bytes
        if limit is None:
            limit = available_memory_bytes()
        if limit is not None and needed > limit:
            shapes = ", ".join(
                f"level {level}: {rows:,} x {self._levels[level].dim}"
                for level, rows in total_rows.items()
            )
            raise MemoryError(
                f"the memory bank ({shapes} rows, coreset_ratio {self.coreset_ratio}, "
                f"{str(self.dtype).removeprefix('torch.')}) needs {needed / 1e9:.1f} GB but "
                f"{limit / 1e9:.1f} GB of memory are available; store it in float16, lower "
                "bank.coreset_ratio, score fewer model.feature_levels, or use fewer training "
                "samples or a machine with more memory"
            )

    def local_samples(self, level: int, samples: Tensor) -> Tensor:
        """``(len(samples) * r, D)`` rows of this process's local samples ``samples`` (indices
        in the order they were added; under DDP local sample ``j`` of rank ``k`` is global
        sample ``j * world + k``). Needs ``keep_spill``: the spill files outlive ``build``."""
        spill = self._levels.get(level)
        if spill is None or not os.path.exists(spill.path):
            raise RuntimeError(f"bank level {level}: no spill file (set keep_spill before build)")
        per_sample = spill.rows_per_sample or 0
        reader = _SpillReader(spill.path, spill.dim)
        out = torch.empty(samples.numel() * per_sample, spill.dim)
        for k, sample in enumerate(samples.flatten().tolist()):
            # A sample's rows are contiguous in the file: one read each.
            start = int(sample) * per_sample
            reader.read_into(start, start + per_sample, out[k * per_sample : (k + 1) * per_sample])
        return out

    def close(self) -> None:
        """Remove every remaining spill file."""
        for level in list(self._levels):
            self._remove(level)

    def _remove(self, level: int) -> None:
        spill = self._levels.pop(level, None)
        if spill is not None and os.path.exists(spill.path):
            os.remove(spill.path)

    def _build_level(
        self, level: int, spill: _LevelSpill, all_gather: AllGather | None, rank: int
    ) -> Tensor:
        layout = _Layout.of(spill, all_gather, rank)
        self.total_rows[level] = layout.total
        stored = _SpillReader(spill.path, spill.dim)
        if self.coreset_ratio == 1.0:
            return layout.assemble(
                stored.read_into, spill.dim, self.piece_rows, all_gather, dtype=self.dtype
            )
        projected = torch.cat(spill.projected)
        spill.projected.clear()

        def read_projected(start: int, stop: int, out: Tensor, source: Tensor = projected) -> None:
            out.copy_(source[start:stop])

        points = layout.assemble(read_projected, projected.shape[1], self.piece_rows, all_gather)
        del read_projected, projected  # only `points` (N x k) stays for the selection
        # Already projected (or exact): greedy_coreset only selects, its first row from `seed`.
        keep = greedy_coreset(
            points, self.coreset_ratio, projection_dim=points.shape[1], seed=self.seed
        )
        del points
        self.kept[level] = keep
        return layout.select(stored, keep, spill.dim, self.piece_rows, all_gather).to(self.dtype)


@dataclass
class _Layout:
    """Where every rank's local rows go in the global (unsharded, sample-ordered) bank."""

    world: int
    rank: int
    rank_rows: list[int]
    rows_per_sample: int

    @classmethod
    def of(cls, spill: _LevelSpill, all_gather: AllGather | None, rank: int) -> _Layout:
        if all_gather is None:
            return cls(1, 0, [spill.rows], spill.rows_per_sample or 0)
        info = torch.tensor([spill.rows, spill.rows_per_sample or 0, spill.dim])
        gathered = all_gather(info).reshape(-1, 3).tolist()
        if len({tuple(g[1:]) for g in gathered}) != 1:
            raise ValueError(f"ranks disagree on (rows per sample, width): {gathered}")
        return cls(len(gathered), rank, [g[0] for g in gathered], gathered[0][1])

    @property
    def total(self) -> int:
        return sum(self.rank_rows)

    def global_rows(self, rank: int, start: int, stop: int) -> Tensor:
        """Global row indices of local rows ``start:stop`` of ``rank`` (strided shards)."""
        local = torch.arange(start, stop)
        sample, offset = local // self.rows_per_sample, local % self.rows_per_sample
        return (sample * self.world + rank) * self.rows_per_sample + offset

    def assemble(
        self,
        read: Callable[[int, int, Tensor], None],
        dim: int,
        piece_rows: int,
        all_gather: AllGather | None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """All rows of every rank, in global order, read ``piece_rows`` at a time, as ``dtype``."""
        if all_gather is None:
            out = torch.empty(self.total, dim, dtype=dtype)
            piece = None if dtype == torch.float32 else torch.empty(piece_rows, dim)
            for start in range(0, self.total, piece_rows):
                stop = min(start + piece_rows, self.total)
                if piece is None:
                    read(start, stop, out[start:stop])  # straight into the bank: no extra copy
                else:
                    read(start, stop, piece[: stop - start])
                    out[start:stop] = piece[: stop - start]
            return out
        rank = self.rank
        out = torch.empty(self.total, dim, dtype=dtype)
        for start in range(0, max(self.rank_rows), piece_rows):
            stop = start + piece_rows
            piece = torch.zeros(piece_rows, dim)
            if start < self.rank_rows[rank]:
                end = min(stop, self.rank_rows[rank])
                read(start, end, piece[: end - start])
            gathered = all_gather(piece).reshape(self.world, piece_rows, dim)
            for r in range(self.world):
                end = min(stop, self.rank_rows[r])
                if start < end:
                    out[self.global_rows(r, start, end)] = gathered[r, : end - start]
        return out

    def select(
        self,
        stored: _SpillReader,
        keep: Tensor,
        dim: int,
        piece_rows: int,
        all_gather: AllGather | None,
    ) -> Tensor:
        """Rows ``keep`` (global indices, in that order) read from the ranks that hold them."""
        if all_gather is None:
            return stored.rows(keep)
        rank = self.rank
        sample, offset = keep // self.rows_per_sample, keep % self.rows_per_sample
        owner = sample % self.world
        local = (sample // self.world) * self.rows_per_sample + offset
        out = torch.empty(keep.numel(), dim)
        for start in range(0, keep.numel(), piece_rows):
            stop = min(start + piece_rows, keep.numel())
            piece = torch.zeros(stop - start, dim)
            mine = (owner[start:stop] == rank).nonzero().flatten()
            if mine.numel():
                piece[mine] = stored.rows(local[start:stop][mine])
            # Each row is non-zero on exactly one rank: the sum over ranks is that row, exactly.
            out[start:stop] = all_gather(piece).reshape(self.world, stop - start, dim).sum(0)
        return out


def available_memory_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class _SpillReader:
    """Rows of a spill file, read with ``pread`` into the destination tensors.

    Not a memory map: mapped file pages count as resident memory, which is what the streaming
    build is meant to bound (measured: a memory-mapped read-back made the build's peak RSS 40%
    higher than the in-memory path's).
    """

    def __init__(self, path: str, dim: int) -> None:
        self.path = path
        self.row_bytes = 4 * dim
        self.dim = dim

    def read_into(self, start: int, stop: int, out: Tensor) -> None:
        """Rows ``start:stop`` into the contiguous float32 ``out``."""
        view = memoryview(out.numpy()).cast("B")
        with open(self.path, "rb") as f:
            f.seek(start * self.row_bytes)
            if f.readinto(view) != len(view):
                raise RuntimeError(f"spill file {self.path} is shorter than expected")

    def rows(self, indices: Tensor) -> Tensor:
        """``(len(indices), D)`` rows in the given order (read in file order)."""
        out = torch.empty(indices.numel(), self.dim)
        order = torch.argsort(indices)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for position, row in zip(order.tolist(), indices[order].tolist(), strict=True):
                data = os.pread(fd, self.row_bytes, row * self.row_bytes)
                out[position] = torch.frombuffer(bytearray(data), dtype=torch.float32)
        finally:
            os.close(fd)
        return out
