"""Spatial autocorrelation: Moran's I per gene on a k-nearest-neighbour graph of the spots (ALGORITHM 7.7)."""

from __future__ import annotations

import anndata as ad
import numpy as np
from scipy import sparse
from sklearn.neighbors import kneighbors_graph

from spavae.analysis._common import spot_coordinates
from spavae.data.preprocess import size_factors


def knn_weights(locations: np.ndarray, n_neighbors: int = 5) -> sparse.csr_matrix:
    """Binary ``n x n`` kNN connectivity: ``A_ij = 1`` when ``j`` is among the ``n_neighbors`` nearest of ``i``.

    No self loops and not symmetrised, as in the original.
    """
    locations = np.asarray(locations, dtype=np.float64)
    if not 1 <= n_neighbors < len(locations):
        raise ValueError(f"n_neighbors must be between 1 and n_spots - 1 = {len(locations) - 1}, got {n_neighbors}")
    return kneighbors_graph(locations, n_neighbors, mode="connectivity", include_self=False).tocsr()


def morans_i(values: np.ndarray, weights: sparse.spmatrix) -> np.ndarray:
    """Moran's I of every column of ``values`` (spots x features) under the spatial weights.

    :math:`I = \\frac{N}{\\sum_{ij} A_{ij}} \\frac{\\sum_{ij} A_{ij} z_i z_j}{\\sum_i z_i^2}` with
    :math:`z = y - \\bar y`. A constant column gives NaN.
    """
    values = np.asarray(values.toarray() if sparse.issparse(values) else values, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] != weights.shape[0]:
        raise ValueError(f"values must be n_spots x features with n_spots = {weights.shape[0]}, got {values.shape}")
    z = values - values.mean(axis=0)
    numerator = (z * (weights @ z)).sum(axis=0)
    denominator = (z * z).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = len(z) / weights.sum() * numerator / denominator
    return np.where(denominator > 1e-12 * len(z), scores, np.nan)


def _gene_block(n_spots: int) -> int:
    """Genes scored at once: a dense block of at most 20 million values (160 MB), whatever the section size."""
    return max(1, 20_000_000 // max(n_spots, 1))


def spatial_autocorr(adata: ad.AnnData, *, layer: str | None = None, spatial_key: str = "spatial",
                     visium_array: bool = False, n_neighbors: int = 5, preprocess: bool = True,
                     key_added: str | None = None, copy: bool = False) -> ad.AnnData | None:
    """Moran's I of every gene, written to ``adata.var[key_added]``.

    Parameters
    ----------
    adata
        Spots x genes AnnData with coordinates in ``obsm[spatial_key]``.
    layer
        Expression to score (``None`` = ``.X``), e.g. the raw counts or ``'spavae_denoised'``.
    spatial_key
        ``obsm`` key of the coordinates.
    visium_array
        ``obsm[spatial_key]`` holds Visium ``(array_row, array_col)``; convert them to the hexagonal lattice
        (:func:`~spavae.analysis.visium_array_to_xy`) before finding neighbours.
    n_neighbors
        ``k`` of the kNN graph (5 as in the original).
    preprocess
        Score the preprocessed matrix of ALGORITHM 1.2 (size-factor normalised, ``log1p``; the z-scoring does
        not change Moran's I). Use ``False`` for values that are already on the scale to score. Genes are scored
        in blocks (a dense block of at most 20 million values), so a sparse matrix is never densified whole.
    key_added
        ``var`` column (``'morans_i'`` or ``'morans_i_<layer>'`` by default); the parameters go to
        ``adata.uns[key_added]['params']``.
    copy
        Work on and return a copy of ``adata``.

    Returns
    -------
    The copy when ``copy=True``, else ``None``.
    """
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"adata has no layer '{layer}'; layers: {list(adata.layers.keys())}")
    adata = adata.copy() if copy else adata
    key_added = key_added or ("morans_i" if layer is None else f"morans_i_{layer}")
    values = adata.X if layer is None else adata.layers[layer]
    weights = knn_weights(spot_coordinates(adata, spatial_key, visium_array), n_neighbors)
    factors = size_factors(values) if preprocess else None
    columns = values.tocsc() if sparse.issparse(values) else values
    scores = []
    for start in range(0, values.shape[1], _gene_block(values.shape[0])):  # a dense block of genes at a time
        block = columns[:, start:start + _gene_block(values.shape[0])]
        block = np.asarray(block.toarray() if sparse.issparse(block) else block, dtype=np.float64)
        scores.append(morans_i(np.log1p(block / factors[:, None]) if preprocess else block, weights))
    adata.var[key_added] = np.concatenate(scores)
    adata.uns[key_added] = {"params": {"layer": layer, "n_neighbors": n_neighbors, "preprocess": preprocess,
                                       "visium_array": visium_array}}
    return adata if copy else None
