"""Inference without a Trainer: ``VSADInferencer`` (checkpoints and bundles) and the export."""

from vsad_lightning.inference.export import export_bundle, load_bundle
from vsad_lightning.inference.inferencer import (
    SamplePrediction,
    VSADInferencer,
    load_checkpoint_model,
)

__all__ = [
    "SamplePrediction",
    "VSADInferencer",
    "export_bundle",
    "load_bundle",
    "load_checkpoint_model",
]
