"""Homographies: estimation, caching, scaling to feature resolutions and projection."""

from vsad_lightning.geometry.estimation import (
    ImageFeatures,
    detect_features,
    estimate_homographies,
    estimate_pair,
    estimate_pair_from_features,
    format_report,
    inverse_discrepancy_px,
    transfer_error,
)
from vsad_lightning.geometry.projection import (
    NEIGHBOUR_GRAPHS,
    from_opencv_convention,
    neighbour_mask,
    pixel_centre_grid,
    project_points,
    scale_homography,
    scale_matrix,
)

__all__ = [
    "ImageFeatures",
    "detect_features",
    "estimate_homographies",
    "estimate_pair",
    "estimate_pair_from_features",
    "format_report",
    "inverse_discrepancy_px",
    "transfer_error",
    "NEIGHBOUR_GRAPHS",
    "from_opencv_convention",
    "neighbour_mask",
    "pixel_centre_grid",
    "project_points",
    "scale_homography",
    "scale_matrix",
]
