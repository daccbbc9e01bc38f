"""Checkpoints written in place, atomically, on the run folder's own file system.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction, which stages the
file in ``$TMPDIR`` and then *moves* it: a copy when ``$TMPDIR`` is another file system. A
full disk then left a truncated ``.ckpt`` in the run folder (found by ``--resume auto`` as
the newest checkpoint), and a kill during the copy left the staged file in ``/tmp``.
``AtomicCheckpointIO`` stages the file next to its target instead
(``utils.io.atomic_write_bytes``): a failed write is one ``DataError`` line naming the
checkpoint, and the previous checkpoint of that name stays intact.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vsad_lightning.utils.io import atomic_write_bytes


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose ``save_checkpoint`` writes atomically in the target's folder."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint takes no storage_options, got "
                f"{storage_options!r}"
            )
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getbuffer(), "checkpoint")
