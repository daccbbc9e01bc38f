"""torchmetrics-style anomaly metrics (pixel, view, sample)."""
