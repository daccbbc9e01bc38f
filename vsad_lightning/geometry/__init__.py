"""Homographies: estimation, caching, scaling to feature resolutions and projection."""

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
    "NEIGHBOUR_GRAPHS",
    "from_opencv_convention",
    "neighbour_mask",
    "pixel_centre_grid",
    "project_points",
    "scale_homography",
    "scale_matrix",
]
