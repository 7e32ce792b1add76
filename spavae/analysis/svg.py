"""Spatially variable genes from the linear-decoder variant (spaLDVAE, ALGORITHM 8.1).

With positive latents ``z = exp(log z)`` and decoder ``mean_g = sum_k z_k exp(W_kg)``, the share of a gene's expected
expression that comes from the GP (spatial) factors is its spatial score. Retraining on permuted locations and
scoring with the true locations gives a null distribution and empirical p-values.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from spavae.likelihoods import NegativeBinomialObservation
from spavae.nn import LinearPositiveDecoder


def spatial_scores(model) -> pd.DataFrame:
    """Spatial and non-spatial score of every gene for a trained linear-decoder :class:`~spavae.SpaVAE`.

    ``z_bar_ik = E[exp(z_ik)] = exp(m + v / 2)`` (exact, where the original averages 25 samples),
    ``c_k = sum_i z_bar_ik``, ``W'_kg = c_k exp(W_kg)``; spatial score = GP-factor share of ``sum_k W'_kg``.
    """
    observation = model.module.observations[0]
    if not (isinstance(observation, NegativeBinomialObservation) and isinstance(observation.decoder, LinearPositiveDecoder)
            and model.module.latent_distribution == "lognormal"):
        raise ValueError("spatial scores need the linear-decoder variant: SpaVAE.from_variant('spaLDVAE', adata)")
    mean, var = model.latent_posterior()
    with torch.no_grad():
        totals = torch.exp(mean + var / 2).sum(0)
        contribution = totals[:, None] * torch.exp(observation.decoder.weight)
    n_gp = model.module.n_gp
    spatial = contribution[:n_gp].sum(0)
    total = contribution.sum(0)
    score = (spatial / total).cpu().numpy()
    return pd.DataFrame({"spatial_score": score, "non_spatial_score": 1.0 - score}, index=model.var_names)


def spatially_variable_genes(adata, model, *, n_permutations: int = 0, train_kwargs: dict | None = None,
                             key_added: str = "spavae_svg", pooled: bool = True,
                             progress: Callable | None = None) -> pd.DataFrame:
    """Rank genes by spatial score, optionally with permutation p-values; results also go to ``adata.var``.

    Parameters
    ----------
    adata
        The AnnData the model was trained on.
    model
        A trained linear-decoder model (``SpaVAE.from_variant('spaLDVAE', adata)``).
    n_permutations
        Number of models retrained with locations permuted across spots (0 = no p-values). Each null model is
        scored with the true locations.
    train_kwargs
        Training arguments of the null models (default: the model's own).
    key_added
        Columns ``<key>_score``, ``<key>_rank`` and, with permutations, ``<key>_pvalue`` in ``adata.var``.
    pooled
        p-values against the null scores of all genes pooled (finer with few permutations) instead of the gene's own.
    progress
        Called with the permutation index before each retraining (e.g. ``print``).

    Returns
    -------
    Table sorted by spatial score (highest first), with ``rank`` and, with permutations, ``pvalue``.
    """
    from spavae.api import SpaVAE

    model.check_same_spots(adata)  # the null models reuse the model's scaled locations spot by spot
    if n_permutations < 0:
        raise ValueError(f"n_permutations must be >= 0, got {n_permutations}")
    table = spatial_scores(model)
    nulls = []
    rng = np.random.default_rng(model.init_params["seed"])
    for r in range(n_permutations):
        if progress is not None:
            progress(r)
        shuffled = adata.copy()
        key = model.init_params["spatial_key"]
        shuffled.obsm[key] = np.asarray(adata.obsm[key])[rng.permutation(adata.n_obs)]
        null = SpaVAE(shuffled, **(model.init_params | {"seed": model.init_params["seed"] + r + 1}))
        null.train(**((train_kwargs if train_kwargs is not None else model.train_params) | {"progress": False}))
        null.data.locations = model.data.locations  # score with the true locations:
        null.refresh_gp_posterior()  # q(u) given the null model's encoder outputs at the true locations
        nulls.append(spatial_scores(null)["spatial_score"].to_numpy())
    if nulls:
        null = np.vstack(nulls)
        observed = table["spatial_score"].to_numpy()
        if pooled:
            pooled_null = np.sort(null.ravel())
            exceed = len(pooled_null) - np.searchsorted(pooled_null, observed, side="left")
            table["pvalue"] = (1 + exceed) / (1 + len(pooled_null))
        else:
            table["pvalue"] = (1 + (null >= observed).sum(0)) / (1 + len(null))
    table = table.sort_values("spatial_score", ascending=False)
    table["rank"] = np.arange(1, len(table) + 1)
    adata.var[f"{key_added}_score"] = table["spatial_score"].reindex(adata.var_names).to_numpy()
    adata.var[f"{key_added}_rank"] = table["rank"].reindex(adata.var_names).to_numpy()
    if "pvalue" in table:
        adata.var[f"{key_added}_pvalue"] = table["pvalue"].reindex(adata.var_names).to_numpy()
    return table
