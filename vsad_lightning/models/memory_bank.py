"""The memory bank of normal features, its feature layout, and greedy k-center coresets.

DESIGN.md (Inference and scoring): one bank ``M^(l)`` per decoder level, holding the features
of all training views (the paper's choice) or a greedy k-center coreset (ratio rho) of them.
The banks are module buffers, so they travel in Lightning checkpoints; a checkpoint's banks can
be loaded into a fresh, empty ``MemoryBank`` (see ``MemoryBank._load_from_state_dict``).

Layout: a feature map batch ``(B, V, C, h, w)`` becomes rows ``(B*V*h*w, C)`` in the order
``b, v, y, x`` (x fastest). ``flatten_features`` and ``unflatten_features`` are the only place
that order is defined; the bank callback and the scoring both use them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vsad_lightning.models.knn import DEFAULT_MAX_CHUNK_BYTES, KnnBackend, nearest_distance

_BANK_PREFIX = "bank_"


def flatten_features(features: Tensor) -> Tensor:
    """``(B, V, C, h, w)`` -> ``(B*V*h*w, C)`` rows, ordered ``b, v, y, x`` (x fastest)."""
    if features.dim() != 5:
        raise ValueError(f"expected features (B, V, C, h, w), got shape {tuple(features.shape)}")
    return features.permute(0, 1, 3, 4, 2).reshape(-1, features.shape[2])


def unflatten_features(rows: Tensor, grid: tuple[int, int, int, int]) -> Tensor:
    """Inverse of ``flatten_features`` for rows of features or of per-position values.

    Args:
        rows: ``(B*V*h*w, C)`` feature rows or ``(B*V*h*w,)`` per-position values (distances).
        grid: ``(B, V, h, w)``.

    Returns:
        ``(B, V, C, h, w)`` for 2-D ``rows``, ``(B, V, h, w)`` for 1-D ``rows``.
    """
    batch, views, height, width = grid
    expected = batch * views * height * width
    if rows.dim() not in (1, 2) or rows.shape[0] != expected:
        raise ValueError(
            f"expected {expected} rows for grid (B, V, h, w) = {tuple(grid)}, got shape "
            f"{tuple(rows.shape)}"
        )
    if rows.dim() == 1:
        return rows.reshape(batch, views, height, width)
    return rows.reshape(batch, views, height, width, rows.shape[1]).permute(0, 1, 4, 2, 3)


@torch.no_grad()
def greedy_coreset(
    features: Tensor, ratio: float, *, projection_dim: int = 128, seed: int = 0
) -> Tensor:
    """Indices of a greedy k-center (farthest point) coreset of ``features``.

    DESIGN.md (Inference and scoring): the coreset option for large banks. Starting from one
    seeded random row, each step adds the row farthest from everything selected so far, which
    gives a covering radius at most twice the optimal one for that many centres (Gonzalez).

    Distances are computed on a Gaussian random projection to ``projection_dim`` dimensions
    (Johnson-Lindenstrauss: pairwise distances are kept within a small factor), fixed by
    ``seed``; when ``projection_dim >= D`` the features are used as they are (exact distances).

    Complexity: ``O(N D k)`` for the projection and ``O(M N k)`` for the selection, with
    ``k = min(projection_dim, D)`` and ``M = max(1, round(ratio * N))`` rows selected, i.e.
    ``O(ratio N^2 k)``: each step is one matrix-vector product over the projected rows plus an
    elementwise minimum. Extra memory ``O(N k)``.

    Args:
        features: ``(N, D)`` rows.
        ratio: fraction of rows to keep, in ``(0, 1]``; 1.0 returns ``arange(N)``.
        projection_dim: width of the random projection.
        seed: seed of the projection and of the first row.

    Returns:
        ``(M,)`` int64 unique row indices in selection order, on ``features.device``.
    """
    if features.dim() != 2 or features.shape[0] == 0:
        raise ValueError(f"expected features (N, D) with N >= 1, got {tuple(features.shape)}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    if projection_dim < 1:
        raise ValueError(f"projection_dim must be >= 1, got {projection_dim}")
    num_rows, dim = features.shape
    device = features.device
    if ratio == 1.0:
        return torch.arange(num_rows, device=device)
    num_keep = min(num_rows, max(1, round(ratio * num_rows)))

    generator = torch.Generator(device="cpu").manual_seed(seed)
    if projection_dim < dim:
        projection = torch.randn(dim, projection_dim, generator=generator) / math.sqrt(
            projection_dim
        )
        points = features.float() @ projection.to(device)
    else:
        points = features.float()
    # Centre (distances do not change) so the norm expansion below cancels small numbers.
    points = points - points.mean(0)
    sq_norms = points.square().sum(1)

    selected = torch.empty(num_keep, dtype=torch.long, device=device)
    # 0-d tensors, not Python ints, so a GPU loop never waits for the device.
    newest = torch.randint(num_rows, (), generator=generator).to(device)
    selected[0] = newest
    # min_sq[i] = squared distance of row i to the nearest selected row; selected rows are set
    # to -inf so that argmax never picks them again, even when every remaining row is a
    # duplicate of a selected one (distance 0, or slightly negative after rounding: only the
    # argmax is used, so no clamp is needed).
    min_sq = torch.full((num_rows,), math.inf, device=device)
    sq = torch.empty(num_rows, device=device)
    for step in range(1, num_keep):
        centre = points[newest]
        # |x|^2 - 2 x.c + |c|^2: one matrix-vector product and one add per step.
        torch.addmv(sq_norms, points, centre, alpha=-2.0, out=sq).add_(sq_norms[newest])
        torch.minimum(min_sq, sq, out=min_sq)
        min_sq[newest] = -math.inf
        newest = torch.argmax(min_sq)
        selected[step] = newest
    return selected


class MemoryBank(nn.Module):
    """Per-level banks of normal feature rows, stored as buffers ``bank_<level>``.

    Created empty; ``set_level`` fills a level. Loading a state dict creates or resizes the
    buffers to the incoming shapes first, so a checkpoint's banks load into a fresh bank.

    Args:
        dtype: storage dtype of the banks (e.g. ``torch.float16`` halves their memory; the
            search still computes in float32 chunks). ``None``: float32 for ``set_level``, and a
            loaded bank keeps the dtype it was saved with.
    """

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"the bank dtype must be a floating point type, got {dtype}")
        self.storage_dtype = dtype
        # Non-persistent and empty: it follows .to(device), so banks created while loading a
        # state dict land on the module's device.
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)

    @staticmethod
    def buffer_name(level: int) -> str:
        """The buffer (and state-dict key suffix) of a level: ``bank_<level>``."""
        return f"{_BANK_PREFIX}{int(level)}"

    @staticmethod
    def _level_of(name: str) -> int | None:
        if not name.startswith(_BANK_PREFIX):
            return None
        try:
            return int(name[len(_BANK_PREFIX) :])
        except ValueError:
            return None

    @property
    def levels(self) -> list[int]:
        """The levels that have a bank, ascending."""
        return sorted(
            level for name in self._buffers if (level := self._level_of(name)) is not None
        )

    def bank(self, level: int) -> Tensor:
        """The ``(N, D)`` rows of ``level``."""
        name = self.buffer_name(level)
        if name not in self._buffers:
            raise ValueError(f"the memory bank has no level {level}; it has levels {self.levels}")
        return self._buffers[name]

    def is_built(self) -> bool:
        """True when at least one level exists and every level has rows."""
        levels = self.levels
        return bool(levels) and all(self.bank(level).shape[0] > 0 for level in levels)

    @torch.no_grad()
    def set_level(self, level: int, features: Tensor) -> None:
        """Store ``features`` ``(N, D)`` as the bank of ``level`` (replacing any previous one)."""
        if features.dim() != 2 or features.shape[0] == 0 or features.shape[1] == 0:
            raise ValueError(
                f"bank level {level}: expected features (N, D) with N, D >= 1, got "
                f"{tuple(features.shape)}"
            )
        if not torch.isfinite(features).all():
            raise ValueError(f"bank level {level}: features contain NaN or inf")
        dtype = self.storage_dtype or torch.float32
        rows = features.detach().to(device=self._device_anchor.device, dtype=dtype)
        self.register_buffer(self.buffer_name(level), rows.contiguous())

    def distances(
        self,
        level: int,
        queries: Tensor,
        *,
        backend: KnnBackend = "auto",
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    ) -> Tensor:
        """``(Q,)`` exact L2 distance of each query row ``(Q, D)`` to its nearest bank row."""
        bank = self.bank(level)
        if queries.dim() != 2 or queries.shape[1] != bank.shape[1]:
            raise ValueError(
                f"bank level {level} holds rows of width {bank.shape[1]}; got queries of shape "
                f"{tuple(queries.shape)}"
            )
        return nearest_distance(
            queries.to(bank.device), bank, backend=backend, max_chunk_bytes=max_chunk_bytes
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # Banks are sized by the data (and the coreset ratio), so a checkpoint's bank rarely has
        # the shape of this module's buffer, and a fresh module has no buffer at all: create or
        # resize them before the standard copy.
        for key, value in state_dict.items():
            if not key.startswith(prefix) or not isinstance(value, Tensor):
                continue
            name = key[len(prefix) :]
            if self._level_of(name) is None or value.dim() != 2:
                continue
            dtype = self.storage_dtype or value.dtype
            current = self._buffers.get(name)
            if current is None or current.shape != value.shape or current.dtype != dtype:
                empty = torch.empty(value.shape, dtype=dtype, device=self._device_anchor.device)
                self.register_buffer(name, empty)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        sizes = ", ".join(f"{level}: {tuple(self.bank(level).shape)}" for level in self.levels)
        return f"levels={{{sizes}}}"
