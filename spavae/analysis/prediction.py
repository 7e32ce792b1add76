"""Latent and expression at locations the model was not trained on (ALGORITHM 3.5, "new locations", and 7.4).

* GP dimensions: the exact sparse-GP posterior given the encoder outputs of **all** training spots
  (:math:`b = N`, so :math:`N/b = 1`; fitted after training and saved with the model), at the new locations.
* Gaussian dimensions: copied, mean and variance, from the nearest spot of the model (a KD-tree in the scaled
  frame, within the same section for a multi-section model, which decodes with the given section).
* Expression: the decoder mean averaged over latent draws, on the normalised scale (a new location has no
  observed library size).

The training spots are encoded in chunks and the new locations are processed in chunks of ``batch_size``, so the
memory is :math:`O((N + \\text{batch\\_size})(p + G))` whatever the number of new locations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scipy.spatial import cKDTree

from spavae.analysis._common import check_trained

if TYPE_CHECKING:
    from spavae.api import SpaVAE


def _check_locations(locations: np.ndarray) -> np.ndarray:
    raw = np.asarray(locations)
    try:
        if raw.dtype.kind not in "iufO":  # bool, complex and text are not coordinates
            raise TypeError
        locations = raw.astype(np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"locations must be real numbers, got dtype {raw.dtype}") from None
    if locations.ndim != 2 or locations.shape[1] != 2 or len(locations) == 0:
        raise ValueError(f"locations must be a non-empty n x 2 array, got shape {locations.shape}")
    if not np.isfinite(locations).all():
        raise ValueError("locations contain NaN/inf values")
    return locations


def _nearest_spots(model: SpaVAE, scaled: np.ndarray, codes: np.ndarray | None) -> np.ndarray:
    """Position of the nearest training spot of the same section for each scaled location."""
    train = model.data.scaled_locations
    if codes is None:
        return cKDTree(train).query(scaled)[1]
    nearest = np.empty(len(scaled), dtype=int)
    for index in np.unique(codes):
        members = np.flatnonzero(model.data.section_codes == index)
        if len(members) == 0:
            raise ValueError(f"the model's spots have no spot of section {model.setup.sections[index]!r} to take "
                             "the Gaussian latent dimensions from")
        query = codes == index
        nearest[query] = members[cKDTree(train[members]).query(scaled[query])[1]]
    return nearest


@torch.no_grad()
def predict_latent(model: SpaVAE, locations: np.ndarray, *, sections=None, scaled: bool = False,
                   batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Latent posterior at new locations.

    Parameters
    ----------
    model
        A trained :class:`~spavae.SpaVAE`.
    locations
        ``n x 2`` coordinates, in the frame of the training ``obsm['spatial']`` (or the scaled frame with
        ``scaled=True``).
    sections
        For a multi-section model (``batch_key``): the section label of each location (required).
    scaled
        ``locations`` are already in the model's scaled ``[0, loc_range]`` frame.
    batch_size
        Locations predicted at once (the ``'auto'`` rule by default).

    Returns
    -------
    ``(mean, var, nearest)``: ``n x D`` tensors (GP dims first) and the position of each location's nearest
    spot of the model (same section).
    """
    check_trained(model)
    locations = _check_locations(locations)
    setup, module = model.setup, model.module
    codes = setup.section_codes(sections)
    if codes is not None and len(codes) != len(locations):
        raise ValueError(f"{len(codes)} section labels for {len(locations)} locations")
    query = locations if scaled else setup.scale_locations(locations, codes)
    batch_size = model._batch_size(batch_size, model.data)
    omega, phi2 = model.encode_all(batch_size)
    nearest = _nearest_spots(model, query, codes)
    gp_dtype = module.gp_dtype
    query_t = torch.as_tensor(setup.gp_inputs(query, codes), dtype=gp_dtype, device=model.data.locations.device)
    module.eval()
    module.gp.set_posterior_state(model._gp_posterior)
    gp_mean, gp_var = zip(*(module.gp.marginals(query_t[start:start + batch_size])
                            for start in range(0, len(query_t), batch_size)))
    n_gp = module.n_gp
    rows = torch.as_tensor(nearest, device=omega.device)
    mean = torch.cat([torch.cat(gp_mean).to(omega.dtype), omega[rows, n_gp:]], 1)
    var = torch.cat([torch.cat(gp_var).to(omega.dtype), phi2[rows, n_gp:]], 1)
    return mean, var, nearest


def predict(model: SpaVAE, locations: np.ndarray, *, sections=None, scaled: bool = False, n_samples: int = 25,
            genes: Sequence[str] | None = None, key_added: str = "spavae", obs_names: pd.Index | None = None,
            batch_size: int | None = None, seed: int = 0) -> ad.AnnData:
    """Predict the latent and the expression at new locations and return them as a new AnnData.

    Parameters
    ----------
    model
        A trained :class:`~spavae.SpaVAE`.
    locations
        ``n x 2`` coordinates in the frame of the training ``obsm['spatial']`` (or scaled, see ``scaled``).
    sections
        For a multi-section model: the section label of each location (decoded with that section).
    scaled
        ``locations`` are in the model's scaled ``[0, loc_range]`` frame.
    n_samples
        Latent draws averaged for the expression (25 as in the original; common random numbers, as in
        :meth:`~spavae.SpaVAE.decode_latent`).
    genes
        Predict only these genes (``.X`` is ``n x len(genes)``): for many locations, as the expression of every
        gene is a dense ``n x G`` array.
    key_added
        Prefix of the keys written (as in :meth:`~spavae.SpaVAE.write_results`).
    obs_names
        Names of the new spots (``'pred0'``, ``'pred1'``, ... by default).
    batch_size
        Locations processed at once.
    seed
        Seed of the latent draws.

    Returns
    -------
    AnnData with the predicted expression in ``.X`` (normalised scale, size factor 1), the genes of the model,
    ``obsm['spatial']`` (the given coordinates, in the training frame), ``obsm['spatial_scaled']``,
    ``obsm['X_<key>']`` (latent means), ``obsm['X_<key>_var']`` (latent variances), ``obs['nearest_spot']``
    (the spot the Gaussian dimensions come from), ``obs['section']`` for a multi-section model and
    ``uns[key_added]['params']``.
    """
    locations = _check_locations(locations)
    names = pd.Index(obs_names if obs_names is not None else [f"pred{i}" for i in range(len(locations))])
    if len(names) != len(locations):
        raise ValueError(f"{len(names)} obs_names for {len(locations)} locations")
    mean, var, nearest = predict_latent(model, locations, sections=sections, scaled=scaled, batch_size=batch_size)
    setup = model.setup
    codes = setup.section_codes(sections)
    covariates = None if codes is None else \
        torch.as_tensor(np.eye(setup.n_sections)[codes], dtype=mean.dtype, device=mean.device)
    expression = np.empty((len(mean), len(model.var_names) if genes is None else len(genes)), dtype=np.float32)
    for start, block in model.decode_latent(mean, var, covariates=covariates, n_samples=n_samples, genes=genes,
                                            seed=seed, batch_size=batch_size):
        expression[start:start + len(block)] = block
    scaled_locations = locations if scaled else setup.scale_locations(locations, codes)
    raw_locations = setup.unscale_locations(scaled_locations, codes) if scaled else locations
    obs = pd.DataFrame({"nearest_spot": pd.Categorical(np.asarray(model.obs_names)[nearest])}, index=names)
    if codes is not None:
        obs["section"] = pd.Categorical(np.asarray(setup.sections)[codes], categories=setup.sections)
    var_names = model.var_names.copy() if genes is None else pd.Index(list(genes))
    out = ad.AnnData(X=expression, obs=obs, var=pd.DataFrame(index=var_names))
    out.obsm["spatial"] = raw_locations
    out.obsm["spatial_scaled"] = scaled_locations
    out.obsm[f"X_{key_added}"] = mean.cpu().numpy()
    out.obsm[f"X_{key_added}_var"] = var.cpu().numpy()
    out.uns[key_added] = {"params": {"n_samples": n_samples, "seed": seed, "scale": "normalized",
                                     "n_gp": model.module.n_gp, "n_train_spots": len(model.data)}}
    return out
