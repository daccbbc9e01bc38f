"""The memory bank of normal features: storage, streaming builder, coreset and exact searches.

docs/method.md#memory-bank. One module per concern, each importing only those below it:

- ``storage``: ``MemoryBank`` (per-level buffers that travel in checkpoints) and the row layout
  ``flatten_features`` / ``unflatten_features``.
- ``builder``: ``StreamingBankBuilder``, which spills feature rows to disk while they are
  extracted and builds each level from them.
- ``coreset``: ``greedy_coreset``, the greedy k-center selection.
- ``knn``: ``nearest_distance`` / ``nearest_neighbour``, the exact global search and its backend
  dispatch over ``brute_force``, ``projected`` and ``faiss_flat``; ``common`` holds what they
  share (cached bank statistics, the direct distance of the winners).
- ``positional``: the exact windowed search of the positional bank.
"""

from vsad_lightning.bank.builder import StreamingBankBuilder
from vsad_lightning.bank.coreset import greedy_coreset
from vsad_lightning.bank.knn import (
    DEFAULT_MAX_CHUNK_BYTES,
    KnnBackend,
    nearest_distance,
    nearest_neighbour,
)
from vsad_lightning.bank.storage import MemoryBank, flatten_features, unflatten_features

__all__ = [
    "DEFAULT_MAX_CHUNK_BYTES",
    "KnnBackend",
    "MemoryBank",
    "StreamingBankBuilder",
    "flatten_features",
    "greedy_coreset",
    "nearest_distance",
    "nearest_neighbour",
    "unflatten_features",
]
