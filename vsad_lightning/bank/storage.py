"""The memory bank of normal features (storage) and its feature layout.

docs/method.md#memory-bank: one bank ``M^(l)`` per decoder level, holding the features
of all training views (the paper's choice) or a greedy k-center coreset (ratio rho) of them
(``vsad_lightning.bank.coreset``).
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

from vsad_lightning.bank.knn import DEFAULT_MAX_CHUNK_BYTES, KnnBackend, nearest_distance
from vsad_lightning.bank.positional import positional_search

_BANK_PREFIX = "bank_"
_GRID_PREFIX = "grid_"


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

    def grid(self, level: int) -> tuple[int, int, int] | None:
        """``(V, h, w)`` when the bank of ``level`` holds whole feature maps in place, else None.

        Only such a bank (every training feature, rows in ``flatten_features`` order) supports
        ``positional_distances``; a coreset keeps no positions.
        """
        grid = self._buffers.get(f"{_GRID_PREFIX}{int(level)}")
        return None if grid is None else tuple(int(g) for g in grid.tolist())

    @torch.no_grad()
    def set_level(
        self, level: int, features: Tensor, grid: tuple[int, int, int] | None = None
    ) -> None:
        """Store ``features`` ``(N, D)`` as the bank of ``level`` (replacing any previous one).

        Args:
            level: the decoder level.
            features: ``(N, D)`` rows.
            grid: ``(V, h, w)`` when ``features`` are whole ``(n, V, D, h, w)`` feature maps
                flattened by ``flatten_features`` (then ``N = n V h w``); it enables the
                positional search. ``None`` for a coreset or any other set of rows.
        """
        if features.dim() != 2 or features.shape[0] == 0 or features.shape[1] == 0:
            raise ValueError(
                f"bank level {level}: expected features (N, D) with N, D >= 1, got "
                f"{tuple(features.shape)}"
            )
        if grid is not None and (len(grid) != 3 or features.shape[0] % math.prod(grid)):
            raise ValueError(
                f"bank level {level}: {features.shape[0]} rows are not whole feature maps of "
                f"grid (V, h, w) = {tuple(grid)}"
            )
        # In pieces: a full-size mask would be a second bank's worth of bytes at scale.
        for start in range(0, features.shape[0], 1 << 16):
            if not torch.isfinite(features[start : start + (1 << 16)]).all():
                raise ValueError(f"bank level {level}: features contain NaN or inf")
        dtype = self.storage_dtype or torch.float32
        rows = features.detach().to(device=self._device_anchor.device, dtype=dtype)
        self.register_buffer(self.buffer_name(level), rows.contiguous())
        grid_name = f"{_GRID_PREFIX}{int(level)}"
        if grid is None:
            self._buffers.pop(grid_name, None)
        else:
            grid_tensor = torch.tensor(grid, dtype=torch.long, device=self._device_anchor.device)
            self.register_buffer(grid_name, grid_tensor)

    @torch.no_grad()
    def positional_distances(
        self,
        level: int,
        features: Tensor,
        radius: int,
        *,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        exclude: Tensor | None = None,
    ) -> Tensor:
        """``(B, V, h, w)`` distance of each query to the nearest bank feature NEAR ITS PLACE.

        The positional bank (``model.bank_mode: positional``): a fixed inspection rig sees
        each part at nearly the same place in every image, so the query at view ``v``,
        position ``(y, x)`` is compared only with training features of the same view within
        ``radius`` positions (Chebyshev), instead of the paper's global bank. Benign
        appearance that is normal at one place (an edge, a highlight) can then no longer hide
        a defect somewhere else. Distances are exact: the nearest candidate is chosen from the
        expanded ``|a|^2 - 2ab + |b|^2`` form, then its distance is recomputed directly.

        Args:
            level: the decoder level; its bank must hold whole feature maps (``grid``).
            features: ``(B, V, C, h, w)`` queries on the bank's grid.
            radius: the search window's half-width in feature positions (0: same position).
            max_chunk_bytes: bound of the per-chunk ``(positions, shifts x B, n)`` score block
                and its gathered queries.
            exclude: ``(B,)`` bank sample (index ``0..n-1`` of the ``n`` stored feature maps) that
                query ``b`` must not be compared with, or -1 for none: the leave-one-out score
                of a training sample against the bank without its own rows
                (``vsad_lightning.models.calibration``). It masks that sample's candidates in
                the search, so the bank is never rebuilt.
        """
        grid = self.grid(level)
        if grid is None:
            raise ValueError(
                f"bank level {level} keeps no positions (it was built from a coreset or loaded "
                "without its grid); the positional bank needs bank.coreset_ratio: 1.0"
            )
        if radius < 0:
            raise ValueError(f"radius must be >= 0, got {radius}")
        views, height, width = grid
        rows = self.bank(level)
        channels = rows.shape[1]
        if features.dim() != 5 or tuple(features.shape[1:]) != (views, channels, height, width):
            raise ValueError(
                f"bank level {level} holds maps (V, C, h, w) = {(views, channels, height, width)};"
                f" got queries of shape {tuple(features.shape)}"
            )
        count = rows.shape[0] // (views * height * width)
        excluded = self._excluded(level, exclude, features.shape[0], count, rows.device)
        return positional_search(
            rows, grid, features, radius, max_chunk_bytes=max_chunk_bytes, excluded=excluded
        )

    @staticmethod
    def _excluded(
        level: int, exclude: Tensor | None, batch: int, count: int, device: torch.device
    ) -> tuple[Tensor, Tensor] | None:
        """``(queries, bank samples)`` index pairs to mask in ``positional_distances``."""
        if exclude is None:
            return None
        exclude = exclude.to(device=device, dtype=torch.long).flatten()
        if exclude.numel() != batch:
            raise ValueError(
                f"exclude must hold one bank sample per query ({batch}), got {exclude.numel()}"
            )
        if bool(((exclude < -1) | (exclude >= count)).any()):
            raise ValueError(
                f"bank level {level} holds {count} samples; exclude must be in [-1, {count - 1}], "
                f"got {exclude.tolist()}"
            )
        if count < 2 and bool((exclude >= 0).any()):
            raise ValueError(
                f"bank level {level} holds {count} sample: leaving it out leaves nothing to compare"
            )
        query_of = torch.nonzero(exclude >= 0).flatten()
        return query_of, exclude[query_of]

    def num_samples(self, level: int) -> int:
        """The number of whole feature maps stored at ``level`` (it needs a ``grid``)."""
        grid = self.grid(level)
        if grid is None:
            raise ValueError(f"bank level {level} keeps no positions (built from a coreset)")
        return self.bank(level).shape[0] // math.prod(grid)

    def sample_features(self, level: int, samples: Tensor) -> Tensor:
        """``(b, V, C, h, w)`` stored feature maps of bank samples ``samples`` (``(b,)`` indices).

        The inverse of ``flatten_features`` for a bank that keeps whole maps: the features the
        bank was built from, so leave-one-out calibration scores training samples without
        extracting their features again.
        """
        grid = self.grid(level)
        if grid is None:
            raise ValueError(f"bank level {level} keeps no positions (built from a coreset)")
        views, height, width = grid
        rows = self.bank(level)
        maps = rows.view(-1, views * height * width, rows.shape[1])[samples.to(rows.device)]
        return unflatten_features(
            maps.reshape(-1, rows.shape[1]).float(), (samples.numel(), views, height, width)
        )

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
            if name.startswith(_GRID_PREFIX) and value.dim() == 1:
                self.register_buffer(
                    name, torch.empty_like(value, device=self._device_anchor.device)
                )
                continue
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
        sizes = ", ".join(
            f"{level}: {tuple(self.bank(level).shape)}"
            + (f" on grid {grid}" if (grid := self.grid(level)) else "")
            for level in self.levels
        )
        return f"levels={{{sizes}}}"
