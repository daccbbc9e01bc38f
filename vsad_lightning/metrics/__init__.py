"""torchmetrics-style anomaly metrics (pixel, view, sample) and their files."""

from vsad_lightning.metrics.anomaly import PRO_UNIT, AnomalyMetrics, ScoreBinning, label_regions
from vsad_lightning.metrics.curves import (
    binned_aupro,
    binned_auroc,
    binned_average_precision,
    exact_auroc,
    exact_average_precision,
    trapezoid_up_to,
)
from vsad_lightning.metrics.export import (
    METRIC_KEYS,
    collect_metrics,
    format_metrics_table,
    write_metrics,
)

__all__ = [
    "METRIC_KEYS",
    "PRO_UNIT",
    "AnomalyMetrics",
    "ScoreBinning",
    "binned_aupro",
    "binned_auroc",
    "binned_average_precision",
    "collect_metrics",
    "exact_auroc",
    "exact_average_precision",
    "format_metrics_table",
    "label_regions",
    "trapezoid_up_to",
    "write_metrics",
]
