"""Typed batches, datasets and the MultiViewDataModule.

Modules:

- ``batch``: ``MultiViewSample``, ``MultiViewBatch``, ``collate_multiview``.
- ``dataset``: sample records and the generic ``MultiViewDataset``.
- ``realiad``, ``manta``, ``folder``: the three on-disk layouts.
- ``homographies``: ``ensure_homography_cache`` (load or estimate + write).
- ``synthetic``: the simple synthetic rig and ``vsad-synth``'s writer; ``realistic_rig``: the
  realistic one (``vsad-synth --rig realistic``).
- ``datamodule``: ``MultiViewDataModule``.

Names are imported lazily so that ``from vsad_lightning.data.batch import ...`` stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MultiViewSample": "batch",
    "MultiViewBatch": "batch",
    "collate_multiview": "batch",
    "MultiViewDataset": "dataset",
    "SampleRecord": "dataset",
    "ViewFile": "dataset",
    "RealIADDataset": "realiad",
    "MantaDataset": "manta",
    "MultiViewFolderDataset": "folder",
    "ensure_homography_cache": "homographies",
    "SyntheticMultiView": "synthetic",
    "generate_category": "synthetic",
    "write_synthetic_dataset": "synthetic",
    "RealisticMultiView": "realistic_rig",
    "MultiViewDataModule": "datamodule",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
