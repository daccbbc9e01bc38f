"""vsad-lightning: multi-view visual anomaly detection (VSAD) as a PyTorch Lightning suite.

Packages, one per concern:

- ``geometry``: homographies (estimation, caching, scaling, projection).
- ``data``: the ``MultiViewBatch``, datasets and the ``MultiViewDataModule``.
- ``models``: plain ``nn.Module``s (MVAM, FRM, the view-aligned U-Net, backbones).
- ``bank``: the memory bank (storage, streaming builder, coreset, exact searches).
- ``system``: the LightningModule that wires the models together.
- ``callbacks``: side effects (memory bank, metrics files, pictures).
- ``metrics``: torchmetrics-style anomaly metrics.
- ``cli``: console scripts (``vsad`` and its aliases ``vsad-*``).
- ``inference``: ``VSADInferencer`` and the export, without a Trainer.

The public names ``VSADModel``, ``VSADModule``, ``MultiViewDataModule`` and ``VSADInferencer``
are importable from here.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "VSADModel": "vsad_lightning.models.model",
    "VSADModule": "vsad_lightning.system.module",
    "MultiViewDataModule": "vsad_lightning.data.datamodule",
    "VSADInferencer": "vsad_lightning.inference.inferencer",
}
"""The public names, imported on first use: ``import vsad_lightning`` stays cheap (no torch,
Lightning or diffusers until one of them is asked for)."""

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vsad_lightning' has no attribute {name!r}")
