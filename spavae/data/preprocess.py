"""Input checks and the count preprocessing of spaVAE (ALGORITHM section 1.2 and 1.4).

The encoder sees z-scored ``log1p`` library-normalised expression; the likelihood sees the raw counts
together with the size factors. Nothing is dropped silently: :func:`filter_empty` reports what it removes.
"""

from __future__ import annotations

import logging
import warnings

import anndata as ad
import numpy as np
import scipy.sparse as sp

logger = logging.getLogger("spavae")


def _dense(matrix) -> np.ndarray:
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


def check_count_block(counts, *, where: str = "counts", integer: bool = True, first_row: int = 0) -> None:
    """Raise a one-line error unless ``counts`` (dense or sparse) holds finite, non-negative (integer) counts.

    Parameters
    ----------
    counts
        A spots x genes block.
    where
        Name of the matrix in the message (``'adata.X'``, ``"layers['counts']"``).
    integer
        Refuse non-integer values. The negative-binomial likelihood is defined on integer counts only, so
        normalised, log-transformed or corrected values are refused rather than trained on.
    first_row
        Row offset of the block in the whole matrix (for the message).
    """
    values = counts.data if sp.issparse(counts) else np.asarray(counts)
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        raise ValueError(f"{where}: counts must be real numbers, got dtype {values.dtype}; convert them first, "
                         "e.g. with .astype(np.float32) for numbers stored as text or bool")
    n_bad = int(np.size(values) - np.isfinite(values).sum())
    if n_bad:
        raise ValueError(f"{where}: {n_bad} count value(s) are NaN or infinite; spavae needs raw counts. "
                         "Fill or remove those entries, or pass the raw count layer (layer='counts').")
    if (values < 0).any():
        raise ValueError(f"{where}: {int((values < 0).sum())} count value(s) are negative; spavae models raw counts. "
                         "Pass the raw count layer (layer='counts'), not scaled or log-transformed data.")
    if integer and values.size and not np.array_equal(values, np.round(values)):
        dense = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
        row, col = np.argwhere(dense != np.round(dense))[0]
        raise ValueError(
            f"{where}: counts must be integers (e.g. {dense[row, col]:.4g} at row {first_row + row}, column {col}); "
            "pass the raw count layer (layer='counts'), or round deliberately with "
            "adata.X = np.rint(adata.X) if the values are corrected counts"
        )


def check_counts(counts, *, where: str = "counts", integer: bool = True) -> None:
    """Raise a clear error unless ``counts`` is a non-empty 2-D spots x genes matrix of raw counts.

    See :func:`check_count_block` for the value checks (non-integer values are refused when ``integer``).
    """
    if not sp.issparse(counts) and np.ndim(counts) != 2:
        raise ValueError(f"{where}: counts must be a 2-D spots x genes matrix, got shape {np.shape(counts)}")
    if counts.shape[0] == 0 or counts.shape[1] == 0:
        raise ValueError(f"{where}: counts matrix is empty (shape {counts.shape})")
    check_count_block(counts, where=where, integer=integer)


def check_locations(locations: np.ndarray, n_spots: int, *, where: str = "locations") -> None:
    """Raise a clear error unless ``locations`` is a finite ``n_spots x 2`` array of real numbers."""
    locations = np.asarray(locations)
    if not np.issubdtype(locations.dtype, np.number) or np.issubdtype(locations.dtype, np.complexfloating):
        raise ValueError(f"{where}: locations must be real numbers, got dtype {locations.dtype}; convert them "
                         "first, e.g. with .astype(float)")
    if locations.ndim != 2 or locations.shape[1] != 2:
        raise ValueError(f"{where}: locations must be a spots x 2 array, got shape {locations.shape}")
    if locations.shape[0] != n_spots:
        raise ValueError(f"{where}: {locations.shape[0]} locations for {n_spots} spots; they must match one to one")
    if not np.isfinite(locations).all():
        raise ValueError(f"{where}: {int((~np.isfinite(locations)).any(1).sum())} spot location(s) are NaN/inf")


def empty_masks(counts) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of the spots and the genes whose total count is zero."""
    dense_sum0 = np.asarray(counts.sum(axis=0)).ravel()
    dense_sum1 = np.asarray(counts.sum(axis=1)).ravel()
    return dense_sum1 <= 0, dense_sum0 <= 0


def filter_empty(adata: ad.AnnData, *, layer: str | None = None) -> ad.AnnData:
    """Return a copy without zero-count genes and zero-count spots, reporting what was removed.

    Genes are removed first and then spots, as in the original (scanpy ``filter_genes(min_counts=1)``
    then ``filter_cells(min_counts=1)``). Locations, ``obs`` and ``obsm`` stay aligned because the
    spots are removed from the whole AnnData.

    Parameters
    ----------
    adata
        Spots x genes AnnData.
    layer
        Layer with the raw counts that decides what is empty (``None``: ``.X``), the same ``layer`` the model is
        given.
    """
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"adata has no layer '{layer}' (layer=); layers present: {list(adata.layers.keys())}")

    def counts(data: ad.AnnData):
        return data.X if layer is None else data.layers[layer]

    _, empty_genes = empty_masks(counts(adata))
    if empty_genes.any():
        names = list(adata.var_names[empty_genes][:5])
        message = f"removed {int(empty_genes.sum())} gene(s) with zero total count (e.g. {names})"
        logger.warning(message)
        warnings.warn(message, stacklevel=2)
        adata = adata[:, ~empty_genes]
    empty_spots, _ = empty_masks(counts(adata))
    if empty_spots.any():
        names = list(adata.obs_names[empty_spots][:5])
        message = (
            f"removed {int(empty_spots.sum())} spot(s) with zero total count together with their locations "
            f"(e.g. {names})"
        )
        logger.warning(message)
        warnings.warn(message, stacklevel=2)
        adata = adata[~empty_spots]
    return adata.copy()


def size_factors(counts) -> np.ndarray:
    """Library size factors ``s_i = n_i / median(n)`` with ``n_i`` the total count of spot ``i``."""
    totals = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    if (totals <= 0).any():
        raise ValueError(
            f"{int((totals <= 0).sum())} spot(s) have zero total count; remove them with spavae.data.filter_empty"
        )
    return totals / np.median(totals)


def normalize_log_scale(counts, factors: np.ndarray) -> np.ndarray:
    """Encoder input: counts / size factor, ``log1p``, then z-scored per gene (ddof=1; zero sd -> 1)."""
    logged = np.log1p(_dense(counts).astype(np.float64) / factors[:, None])
    mean = logged.mean(axis=0)
    sd = logged.std(axis=0, ddof=1) if logged.shape[0] > 1 else np.zeros_like(mean)
    sd[sd <= 1e-10 * np.maximum(1.0, np.abs(mean))] = 1.0  # constant genes (up to round-off) stay at 0
    return (logged - mean) / sd
