"""Resolution enhancement: predict four sub-spots around every spot (ALGORITHM 7.5)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from spavae.analysis._common import check_trained
from spavae.analysis.prediction import predict

if TYPE_CHECKING:
    from spavae.api import SpaVAE

#: Offsets (in units of delta) of the four sub-spots, in the original's block order, then the spot itself.
OFFSETS = {"left_up": (-1, 1), "right_up": (1, 1), "left_down": (-1, -1), "right_down": (1, -1), "center": (0, 0)}


def enhancement_locations(locations: np.ndarray) -> tuple[np.ndarray, float]:
    """The ``5N`` enhanced locations and the offset ``delta``.

    ``delta`` is the median over spots of the distance to the nearest other spot, divided by 4. Each spot
    ``(x, y)`` gives ``(x - delta, y + delta)``, ``(x + delta, y + delta)``, ``(x - delta, y - delta)`` and
    ``(x + delta, y - delta)``; the four blocks (each in spot order) are followed by the original locations.
    """
    locations = np.asarray(locations, dtype=np.float64)
    if locations.ndim != 2 or locations.shape[1] != 2 or len(locations) < 2:
        raise ValueError(f"locations must be n x 2 with n >= 2, got shape {locations.shape}")
    distances, _ = cKDTree(locations).query(locations, k=2)
    delta = float(np.median(distances[:, 1])) / 4.0
    if delta <= 0:
        raise ValueError("more than half of the spots share their location with another spot; delta would be 0")
    points = np.concatenate([locations + delta * np.array(offset) for offset in OFFSETS.values()])
    return points, delta


def enhance(model: SpaVAE, *, n_samples: int = 25, genes: Sequence[str] | None = None, key_added: str = "spavae",
            batch_size: int | None = None, seed: int = 0) -> ad.AnnData:
    """Predict latent and expression at ``5N`` sub-spot locations around the training spots.

    The geometry is computed in the model's scaled frame (as in the original), then mapped back to the
    frame of the training ``obsm['spatial']``.

    Parameters
    ----------
    model
        A trained :class:`~spavae.SpaVAE`.
    n_samples
        Latent draws averaged for the expression.
    genes
        Only these genes: the output has ``5N`` rows, so for a large section ``5N x G`` is best avoided.
    key_added
        Prefix of the keys written, as in :func:`~spavae.analysis.predict`.
    batch_size
        Locations processed at once.
    seed
        Seed of the latent draws.

    Returns
    -------
    A new AnnData with ``5N`` rows (see :func:`~spavae.analysis.predict` for its keys) plus
    ``obs['parent_spot']``, ``obs['offset']`` and ``uns[key_added]['params']['delta']`` (in the scaled frame).
    """
    check_trained(model)
    scaled = model.data.scaled_locations
    codes = model.data.section_codes
    if codes is None:
        points, delta = enhancement_locations(scaled)
        sections = None
    else:  # sections overlap in the scaled frame: the spacing is measured within each section
        delta = float(np.median([enhancement_locations(scaled[codes == i])[1] for i in np.unique(codes)]))
        points = np.concatenate([scaled + delta * np.array(offset) for offset in OFFSETS.values()])
        sections = np.tile(np.asarray(model.setup.sections)[codes], len(OFFSETS))
    parents = np.tile(np.asarray(model.obs_names), len(OFFSETS))
    offsets = np.repeat(list(OFFSETS), len(scaled))
    out = predict(model, points, sections=sections, scaled=True, n_samples=n_samples, genes=genes, key_added=key_added,
                  batch_size=batch_size, seed=seed,
                  obs_names=pd.Index([f"{p}_{o}" for p, o in zip(parents, offsets)]))
    out.obs["parent_spot"] = pd.Categorical(parents)
    out.obs["offset"] = pd.Categorical(offsets, categories=list(OFFSETS))
    out.uns[key_added]["params"]["delta"] = delta
    return out
