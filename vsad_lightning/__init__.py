"""vsad-lightning: multi-view visual anomaly detection (VSAD) as a PyTorch Lightning suite.

Packages, one per concern:

- ``geometry``: homographies (estimation, caching, scaling, projection).
- ``data``: the ``MultiViewBatch``, datasets and the ``MultiViewDataModule``.
- ``models``: plain ``nn.Module``s (MVAM, FRM, the view-aligned U-Net, backbones).
- ``bank``: the memory bank (storage, streaming builder, coreset, exact searches).
- ``system``: the LightningModule that wires the models together.
- ``callbacks``: side effects (memory bank, metrics files, pictures).
- ``metrics``: torchmetrics-style anomaly metrics.
- ``cli``: console scripts.
"""

__version__ = "0.1.0"
