"""Inducing points for the sparse GP: a regular grid or k-means centroids (ALGORITHM 1.5)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.cluster import KMeans


def grid_inducing_points(steps: int, extent: float | Sequence[float] = 20.0) -> np.ndarray:
    """An even grid of about ``(steps + 1)**2`` points over ``[0, width] x [0, height]``, corners included.

    A square ``extent`` (one number, or equal sides) gives exactly the original's ``(steps + 1)**2`` grid. For a
    rectangle the spacing ``h`` solves ``(width / h + 1)(height / h + 1) = (steps + 1)**2`` and each side gets
    ``round(side / h) + 1`` points (at least 2), evenly spaced, so a 3:1 section is covered evenly instead of
    being squeezed into a square. The first coordinate varies slowest.
    """
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"inducing_steps must be a positive integer, got {steps!r}")
    width, height = np.broadcast_to(np.asarray(extent, dtype=np.float64), (2,))
    if not (width > 0 and height > 0):
        raise ValueError(f"the grid's extent must be positive, got {extent!r}")
    n = (steps + 1) ** 2
    inverse_spacing = (-(width + height) + np.sqrt((width + height) ** 2 + 4 * width * height * (n - 1))) \
        / (2 * width * height)
    counts = [max(2, int(round(side * inverse_spacing)) + 1) for side in (width, height)]
    first, second = np.meshgrid(np.linspace(0.0, width, counts[0]), np.linspace(0.0, height, counts[1]), indexing="ij")
    return np.column_stack([first.ravel(), second.ravel()])


def kmeans_inducing_points(locations: np.ndarray, n_points: int, *, seed: int = 0, n_init: int = 10) -> np.ndarray:
    """K-means centroids of the (scaled) spot locations."""
    locations = np.asarray(locations, dtype=np.float64)
    if not isinstance(n_points, (int, np.integer)) or not 1 <= n_points <= len(locations):
        raise ValueError(f"n_inducing must be an integer between 1 and the number of spots, got {n_points!r}")
    return KMeans(n_clusters=n_points, n_init=n_init, random_state=seed).fit(locations).cluster_centers_


def split_inducing(sizes: Sequence[int], total: int, floors: Sequence[int]) -> np.ndarray:
    """Share ``total`` inducing points among sections in proportion to their spot counts, each at least its floor.

    A section whose proportional share falls below its floor gets the floor, and the rest is shared among the
    other sections in proportion to their sizes, until every share reaches its floor; the shares are then rounded
    by largest remainder, so they add up to ``total`` (ties go to the earlier section). If the floors alone exceed
    ``total``, every section gets its floor.

    Parameters
    ----------
    sizes
        Number of spots of each section.
    total
        Number of inducing points of all sections together.
    floors
        The fewest points each section may get.

    Returns
    -------
    The number of inducing points of each section (integers).
    """
    sizes, floors = np.asarray(sizes, dtype=np.float64), np.asarray(floors, dtype=np.int64)
    fixed = np.zeros(len(sizes), dtype=bool)
    while not fixed.all():
        free = ~fixed
        share = np.where(free, (total - floors[fixed].sum()) * sizes / sizes[free].sum(), floors)
        below = free & (share < floors)
        if not below.any():
            counts = np.floor(share).astype(np.int64)
            remainder = np.where(free, share - counts, -1.0)
            counts[np.argsort(-remainder, kind="stable")[:total - counts.sum()]] += 1
            return counts
        fixed |= below
    return floors
