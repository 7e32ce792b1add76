"""Inducing points for the sparse GP: a regular grid or k-means centroids (ALGORITHM 1.5)."""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans


def grid_inducing_points(steps: int, loc_range: float = 20.0) -> np.ndarray:
    """The ``(steps + 1)**2`` grid over ``[0, loc_range]**2``; the first coordinate varies slowest."""
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"inducing_steps must be a positive integer, got {steps!r}")
    axis = np.linspace(0.0, loc_range, steps + 1)
    first, second = np.meshgrid(axis, axis, indexing="ij")
    return np.column_stack([first.ravel(), second.ravel()])


def kmeans_inducing_points(locations: np.ndarray, n_points: int, *, seed: int = 0, n_init: int = 10) -> np.ndarray:
    """K-means centroids of the (scaled) spot locations."""
    locations = np.asarray(locations, dtype=np.float64)
    if not isinstance(n_points, (int, np.integer)) or not 1 <= n_points <= len(locations):
        raise ValueError(f"n_inducing must be an integer between 1 and the number of spots, got {n_points!r}")
    return KMeans(n_clusters=n_points, n_init=n_init, random_state=seed).fit(locations).cluster_centers_
