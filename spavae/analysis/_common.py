"""Input checks and small helpers shared by the analysis modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anndata as ad
import numpy as np

from spavae.analysis.clustering import visium_array_to_xy

if TYPE_CHECKING:
    from spavae.api import SpaVAE


def check_trained(model: SpaVAE) -> None:
    """Raise unless ``model`` is a trained :class:`~spavae.SpaVAE`."""
    if not hasattr(model, "module") or not hasattr(model, "data"):
        raise TypeError(f"model must be a spavae.SpaVAE, got {type(model).__name__}")
    model.check_trained()


def check_same_spots(adata: ad.AnnData, model: SpaVAE) -> None:
    """Raise unless ``adata`` holds the spots and genes ``model`` was trained on, in the same order."""
    check_trained(model)
    model.check_same_spots(adata)


def obsm_array(adata: ad.AnnData, key: str, *, hint: str) -> np.ndarray:
    """``adata.obsm[key]`` as a float array, with an error naming the available keys and ``hint`` when absent."""
    if key not in adata.obsm:
        raise KeyError(f"adata.obsm has no '{key}' ({hint}); keys: {list(adata.obsm.keys())}")
    values = np.asarray(adata.obsm[key], dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"adata.obsm['{key}'] contains NaN/inf values")
    return values


def spot_coordinates(adata: ad.AnnData, spatial_key: str, visium_array: bool) -> np.ndarray:
    """Coordinates for neighbour look-ups; Visium ``(array_row, array_col)`` go through the hexagonal lattice."""
    locations = obsm_array(adata, spatial_key, hint="the n_obs x 2 spot coordinates")
    if locations.ndim != 2 or locations.shape[1] != 2:
        raise ValueError(f"adata.obsm['{spatial_key}'] must be n_obs x 2, got shape {locations.shape}")
    return visium_array_to_xy(locations) if visium_array else locations
