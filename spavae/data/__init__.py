"""Data in: readers, checks, preprocessing, inducing points and the simulator."""

from spavae.data.frame import LocationFrame
from spavae.data.inducing import grid_inducing_points, kmeans_inducing_points
from spavae.data.preprocess import (
    check_counts,
    filter_empty,
    normalize_log_scale,
    size_factors,
)
from spavae.data.readers import detect_format, read, read_h5ad, read_spavae_h5
from spavae.data.simulate import simulate_spatial_counts
from spavae.data.spatialdata_io import read_spatialdata, write_spatialdata
from spavae.data.tenx import read_10x_h5, read_visium, read_visium_hd, read_xenium, write_visium

__all__ = [
    "LocationFrame",
    "check_counts",
    "detect_format",
    "filter_empty",
    "grid_inducing_points",
    "kmeans_inducing_points",
    "normalize_log_scale",
    "read",
    "read_10x_h5",
    "read_h5ad",
    "read_spatialdata",
    "read_spavae_h5",
    "read_visium",
    "read_visium_hd",
    "read_xenium",
    "simulate_spatial_counts",
    "size_factors",
    "write_spatialdata",
    "write_visium",
]
