"""Quiet the library messages a VSAD user cannot act on; keep every other warning.

Each is quieted as narrowly as possible (an exact message, one logger) and only because this
project causes it on purpose:

- ``Found 1 module(s) in eval mode at the start of training``: the image encoder is frozen
  and kept in eval mode on purpose (``VSADModule.train``).
- ``The dirpath has changed from ...``: a checkpoint loaded into another run folder
  (``vsad-test``, a resumed run's new version) carries its old ``ModelCheckpoint`` folder;
  every run writes its own ``checkpoints/``, so nothing of the old bookkeeping is wanted.
- ``isinstance(treespec, LeafSpec)`` is deprecated: torch's notice about Lightning's own code.
- Lightning's "Tip" advertisements for its cloud loggers and model registry (log records).

Fixed at their cause instead, elsewhere: the empty validation loader (``cli/run.py`` sets
``limit_val_batches 0`` when ``data.val_fraction`` is 0), ``transfer_batch_to_device`` (the
batch's own ``to`` is what Lightning calls), the ``weights_only`` notice (the bank callback
says what it saves).
"""

from __future__ import annotations

import logging
import warnings

_MESSAGES = (
    r"Found \d+ module\(s\) in eval mode at the start of training",
    r"The dirpath has changed from",
    r".*isinstance\(treespec, LeafSpec\)",
)

_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropAdvertisements(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("\N{ELECTRIC LIGHT BULB} Tip:")


_FILTER = _DropAdvertisements()


def quiet_known_noise() -> None:
    """Install the filters (idempotent)."""
    for message in _MESSAGES:
        warnings.filterwarnings("ignore", message=message)
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
