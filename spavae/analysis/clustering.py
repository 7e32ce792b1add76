"""Spatial domains: KMeans on the latent, neighbour refinement and ARI/NMI scores (ALGORITHM 7.6)."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

NEIGHBOURS = {"hexagon": 6, "square": 4}


def cluster_kmeans(latent: np.ndarray, n_clusters: int, *, n_init: int = 100, seed: int = 0) -> np.ndarray:
    """KMeans labels (``n_init`` restarts, 100 as in the original) of the rows of ``latent``."""
    latent = np.asarray(latent)
    if not np.isfinite(latent).all():
        raise ValueError("the latent embedding contains NaN/inf values; the model did not train properly")
    if not isinstance(n_clusters, (int, np.integer)) or isinstance(n_clusters, bool) \
            or not 1 <= n_clusters <= len(latent):
        raise ValueError(f"the number of clusters must be an integer between 1 and the number of spots "
                         f"({len(latent)}), got {n_clusters!r}")
    return KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed).fit_predict(latent)


def visium_array_to_xy(array_coords: np.ndarray) -> np.ndarray:
    """Visium ``(array_row, array_col)`` to lattice ``(x, y)`` in which all six hexagonal neighbours are equidistant.

    In raw array coordinates the neighbours ``(r, c +- 2)`` are farther than ``(r +- 1, c +- 1)`` and tie with
    non-neighbours ``(r +- 2, c)``, so a nearest-neighbour rule would pick the wrong spots.
    """
    array_coords = np.asarray(array_coords, dtype=np.float64)
    return np.column_stack([array_coords[:, 1], array_coords[:, 0] * np.sqrt(3.0)])


def refine_labels(labels: np.ndarray, locations: np.ndarray, *, shape: str = "hexagon") -> np.ndarray:
    """Neighbour-majority refinement of domain labels (the original's ``refine``).

    Each spot looks at its ``n + 1`` nearest spots, itself included (``n`` = 6 for ``'hexagon'``/Visium,
    4 for ``'square'``/ST). It takes the most frequent label when its own label occurs fewer than ``n/2``
    times *and* the most frequent one more than ``n/2`` times. Only the original labels are read
    (not iterative).
    """
    if shape not in NEIGHBOURS:
        raise ValueError(f"shape must be one of {sorted(NEIGHBOURS)}, got {shape!r}")
    labels = np.asarray(labels)
    locations = np.asarray(locations, dtype=np.float64)
    if locations.ndim != 2 or locations.shape[1] != 2 or len(locations) != len(labels):
        raise ValueError(f"locations must be one x, y pair per label ({len(labels)} x 2), got shape {locations.shape}")
    n_nb = NEIGHBOURS[shape]
    _, neighbours = cKDTree(locations).query(locations, k=min(n_nb + 1, len(locations)))
    refined = labels.copy()
    for i, row in enumerate(neighbours):
        values, counts = np.unique(labels[row], return_counts=True)
        own = counts[values == labels[i]][0]
        if own < n_nb / 2 and counts.max() > n_nb / 2:
            refined[i] = values[np.argmax(counts)]
    return refined


def labelled_spots(truth, unlabeled: str = "NA") -> np.ndarray:
    """Boolean mask of the spots with a reference label: not ``unlabeled`` and not missing (``None``/NaN)."""
    return np.array([t is not None and t == t and str(t) != unlabeled for t in np.asarray(truth, dtype=object)],
                    dtype=bool)


def score_clustering(truth, predicted, *, unlabeled: str = "NA") -> dict[str, float]:
    """ARI and NMI against ``truth``, leaving out spots whose truth is ``unlabeled`` (or missing)."""
    truth = np.asarray(truth, dtype=object)
    predicted = np.asarray(predicted)
    if truth.shape[0] != predicted.shape[0]:
        raise ValueError(f"{truth.shape[0]} true labels for {predicted.shape[0]} predicted labels")
    keep = labelled_spots(truth, unlabeled)
    if not keep.any():
        raise ValueError("no labelled spots to score against")
    t, p = truth[keep].astype(str), predicted[keep]
    return {"ari": float(adjusted_rand_score(t, p)), "nmi": float(normalized_mutual_info_score(t, p)),
            "n_scored": int(keep.sum())}
