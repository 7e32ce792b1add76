"""Data in: readers, checks, preprocessing, inducing points and the simulator."""

from spavae.data.inducing import grid_inducing_points, kmeans_inducing_points
from spavae.data.preprocess import (
    LocationScaler,
    check_counts,
    filter_empty,
    normalize_log_scale,
    size_factors,
)
from spavae.data.readers import read, read_h5ad, read_spavae_h5
from spavae.data.simulate import simulate_spatial_counts

__all__ = [
    "LocationScaler",
    "check_counts",
    "filter_empty",
    "grid_inducing_points",
    "kmeans_inducing_points",
    "normalize_log_scale",
    "read",
    "read_h5ad",
    "read_spavae_h5",
    "simulate_spatial_counts",
    "size_factors",
]
