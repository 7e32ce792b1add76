"""Spatially variable genes from the linear-decoder variant (spaLDVAE, ALGORITHM 8.1).

With positive latents ``z = exp(log z)`` and decoder ``mean_g = sum_k z_k exp(W_kg)``, a gene's expected expression
splits into a spatial part (the GP factors) and the rest. Two statistics rank the genes
(:func:`scores_from_factors`): the original's ``spatial_score``, the spatial part's share of the expression, and
``spatial_variance``, the spatial part's variation across spots relative to the gene's mean. Retraining on permuted
locations, with the observed model's data setup and training settings (:func:`null_training`), and scoring with
the true locations gives null values and empirical p-values: per gene by default
(:func:`permutation_pvalues`) on values centred per model (:func:`center_scores`), pooled over genes only where
:func:`pooled_null_uniformity` shows on simulated null genes that the pooled null is uniform; Benjamini-Hochberg
q-values (:func:`bh_qvalues`) correct for the number of genes. The retrainings run one after the other or as Ray
tasks (:func:`permutation_null`). docs/sweeps.md has the measured calibration of both statistics.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from scipy import stats

from spavae.analysis.tasks import run_tasks
from spavae.api import SpaVAE
from spavae.data.counts import CountRows
from spavae.data.setup import DataSetup, spot_locations
from spavae.likelihoods import NegativeBinomialObservation
from spavae.nn import LinearPositiveDecoder

STATISTICS = ("spatial_score", "spatial_variance")


def factor_expression(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected positive latents and decoder loadings of a trained linear-decoder :class:`~spavae.SpaVAE`.

    Returns ``(z_bar, loadings)``: ``z_bar_ik = E[exp(z_ik)] = exp(m + v / 2)`` (``N x K``, exact, where the original
    averages 25 samples) and ``loadings_kg = exp(W_kg)`` (``K x G``), so that gene ``g``'s expected expression at spot
    ``i`` (before the size factor) is ``sum_k z_bar_ik loadings_kg``; the first ``model.module.n_gp`` factors are
    the spatial (GP) ones.
    """
    observation = model.module.observations[0]
    if not (isinstance(observation, NegativeBinomialObservation) and isinstance(observation.decoder, LinearPositiveDecoder)
            and model.module.latent_distribution == "lognormal"):
        raise ValueError("spatial scores need the linear-decoder variant: SpaVAE.from_variant('spaLDVAE', adata)")
    mean, var = model.latent_posterior()
    with torch.no_grad():
        return torch.exp(mean + var / 2).double(), torch.exp(observation.decoder.weight).double()


def scores_from_factors(z_bar: torch.Tensor, loadings: torch.Tensor, n_gp: int) -> dict[str, np.ndarray]:
    r"""Both gene statistics from the factor decomposition (:func:`factor_expression`).

    * ``spatial_score`` (ALGORITHM 8.1, the original's): the GP factors' share of the gene's total expected
      expression, :math:`\sum_{i,k \le K} \bar z_{ik} w_{kg} / \sum_{i,k} \bar z_{ik} w_{kg}`. It measures how much
      of a gene's *level* the spatial factors carry, which a constant GP factor can carry as well as a varying one.
    * ``spatial_variance``: the variance across spots of the gene's spatial part :math:`s_{ig} = \sum_{k \le K}
      \bar z_{ik} w_{kg}`, relative to the square of its mean expression :math:`\bar\mu_g` (a squared coefficient
      of variation, so genes of any level compare): :math:`\mathrm{Var}_i(s_{ig}) / \bar\mu_g^2`. It is zero when
      the spatial factors only add a constant, and it is the spatial part of the gene's variation in the units of
      its own mean.
    """
    # From the factors' means and the GP factors' covariance: Var_i(s_ig) = w_g' Cov(z_gp) w_g, no spots x genes array
    factor_mean = z_bar.mean(0)
    total_mean = factor_mean @ loadings
    share = factor_mean[:n_gp] @ loadings[:n_gp] / total_mean
    centred = z_bar[:, :n_gp] - factor_mean[:n_gp]
    gp_loadings = loadings[:n_gp]
    variance = ((centred.T @ centred / len(z_bar)) @ gp_loadings * gp_loadings).sum(0) / total_mean ** 2
    return {"spatial_score": share.cpu().numpy(), "spatial_variance": variance.cpu().numpy()}


def spatial_scores(model) -> pd.DataFrame:
    """``spatial_score``, ``non_spatial_score`` and ``spatial_variance`` of every gene (:func:`scores_from_factors`)
    for a trained linear-decoder :class:`~spavae.SpaVAE`."""
    scores = scores_from_factors(*factor_expression(model), model.module.n_gp)
    return pd.DataFrame({"spatial_score": scores["spatial_score"], "non_spatial_score": 1.0 - scores["spatial_score"],
                         "spatial_variance": scores["spatial_variance"]}, index=model.var_names)


def spatially_variable_genes(adata, model, *, statistic: str = "spatial_score", n_permutations: int = 0,
                             train_kwargs: dict | None = None,
                             key_added: str = "spavae_svg", pooled: bool = False, center: bool = True,
                             progress: Callable | None = None, use_ray: bool = False, address: str | None = None,
                             num_cpus: int | None = None, threads_per_task: int | None = None) -> pd.DataFrame:
    """Rank genes by spatial score, optionally with permutation p-values; results also go to ``adata.var``.

    Parameters
    ----------
    adata
        The AnnData the model was trained on.
    model
        A trained linear-decoder model (``SpaVAE.from_variant('spaLDVAE', adata)``).
    statistic
        What ranks the genes: ``'spatial_score'`` (the original's share of expression from the spatial factors) or
        ``'spatial_variance'`` (the spatial factors' variation of the gene relative to its mean); see
        :func:`scores_from_factors`. The second ranked planted genes better on simulated data, but its permutation
        p-values called 15-60% of the non-spatial genes spatial at the 0.1 level, so p-values are computed for
        ``'spatial_score'`` only (docs/sweeps.md).
    n_permutations
        Number of models retrained with locations permuted across spots (0 = no p-values). Each null model is
        scored with the true locations (:func:`permutation_null`).
    train_kwargs
        The training settings the caller expects the null models to have. The null models are always trained like
        the model (:func:`null_training`), since p-values against nulls trained otherwise are invalid; the call
        is refused when a setting given here differs.
    key_added
        Columns ``<key>_score``, ``<key>_rank`` and, with permutations, ``<key>_pvalue`` and ``<key>_qvalue`` in
        ``adata.var``.
    pooled
        p-values against the null scores of all genes pooled (:func:`pooled_pvalues`) instead of each gene's own
        (:func:`permutation_pvalues`, the default). Pooling is finer with few permutations but valid only when
        the genes share one null distribution: check with :func:`pooled_null_uniformity` on simulated data.
    center
        Compare scores after subtracting each model's median score over the genes (:func:`center_scores`),
        which removes the shift of a whole model's scores that otherwise dominates the comparison (measured in
        docs/sweeps.md); ``False`` compares the raw scores as the original does.
    progress
        Called with the permutation index before each retraining in series (e.g. ``print``).
    use_ray, address, num_cpus, threads_per_task
        Train the null models as Ray tasks (:func:`permutation_null`).

    Returns
    -------
    Table of :func:`spatial_scores` sorted by ``statistic`` (highest first), with ``rank`` and, with permutations,
    ``pvalue`` and ``qvalue``.
    """
    check_svg_request(statistic, n_permutations)
    model.check_same_spots(adata)
    table = spatial_scores(model)
    if n_permutations:
        null = permutation_null(adata, model, n_permutations, train_kwargs=train_kwargs, use_ray=use_ray,
                                address=address, num_cpus=num_cpus, threads_per_task=threads_per_task,
                                progress=progress)[statistic]
        observed = table[statistic].to_numpy()
        if center:
            observed, null = center_scores(observed, null)
        table["pvalue"] = (pooled_pvalues if pooled else permutation_pvalues)(observed, null)
        table["qvalue"] = bh_qvalues(table["pvalue"].to_numpy())
    table = table.sort_values(statistic, ascending=False)
    table["rank"] = np.arange(1, len(table) + 1)
    adata.var[f"{key_added}_score"] = table[statistic].reindex(adata.var_names).to_numpy()
    adata.var[f"{key_added}_rank"] = table["rank"].reindex(adata.var_names).to_numpy()
    for column in ("pvalue", "qvalue"):
        if column in table:
            adata.var[f"{key_added}_{column}"] = table[column].reindex(adata.var_names).to_numpy()
    return table


def check_svg_request(statistic: str, n_permutations: int) -> None:
    """Refuse what :func:`spatially_variable_genes` cannot do, before any training."""
    if n_permutations < 0:
        raise ValueError(f"n_permutations must be >= 0, got {n_permutations}")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    if n_permutations and statistic != "spatial_score":
        raise ValueError(f"permutation p-values of {statistic!r} call non-spatial genes spatial (measured in "
                         "docs/sweeps.md): test with statistic='spatial_score', rank without permutations")


def center_scores(observed, null) -> tuple[np.ndarray, np.ndarray]:
    """Each model's scores minus that model's median score over the genes: ``(observed_c, null_c)``.

    Every retrained model shifts the spatial scores of *all* genes together (its GP factors take a larger or
    smaller share of the expression overall); on simulated data the shift between null models was larger than
    the difference between spatial and non-spatial genes, so raw per-gene p-values of non-spatial genes were
    far from uniform. The permutation test then compares a gene's standing within its model instead. The median
    is used so that a minority of spatial genes barely moves the reference.
    """
    observed, null = _check_null(observed, null)
    return observed - np.median(observed), null - np.median(null, axis=1, keepdims=True)


def permutation_pvalues(observed, null) -> np.ndarray:
    """Per-gene empirical p-values: ``(1 + #{null scores of the gene >= its observed score}) / (1 + R)``.

    Parameters
    ----------
    observed
        The observed score of each of G genes.
    null
        ``R x G`` null scores (one row per permutation).

    Returns
    -------
    G p-values in ``[1 / (1 + R), 1]``; the smallest possible p-value is ``1 / (1 + R)``, so R permutations can
    call nothing below that level.
    """
    observed, null = _check_null(observed, null)
    return (1.0 + (null >= observed).sum(0)) / (1.0 + len(null))


def pooled_pvalues(observed, null) -> np.ndarray:
    """p-values against the null scores of *all* genes pooled: ``(1 + #{pooled >= observed}) / (1 + R G)``.

    Finer than :func:`permutation_pvalues` with few permutations, but only valid when every gene's null score has
    the same distribution; check that with :func:`pooled_null_uniformity` before relying on it.
    """
    observed, null = _check_null(observed, null)
    pooled = np.sort(null.ravel())
    exceed = len(pooled) - np.searchsorted(pooled, observed, side="left")
    return (1.0 + exceed) / (1.0 + len(pooled))


def _check_null(observed, null) -> tuple[np.ndarray, np.ndarray]:
    observed = np.asarray(observed, dtype=np.float64).ravel()
    null = np.atleast_2d(np.asarray(null, dtype=np.float64))
    if null.shape[1] != len(observed) or len(null) == 0:
        raise ValueError(f"null must be (permutations x genes) = (R x {len(observed)}) with R >= 1, got {null.shape}")
    return observed, null


def bh_qvalues(pvalues) -> np.ndarray:
    """Benjamini-Hochberg q-values (false discovery rate adjusted p-values), in the order of ``pvalues``.

    ``q_(i) = min_{j >= i} min(1, p_(j) m / j)`` over the p-values sorted increasingly; NaN p-values stay NaN and
    do not count in ``m``.
    """
    pvalues = np.asarray(pvalues, dtype=np.float64)
    q = np.full(pvalues.shape, np.nan)
    finite = np.flatnonzero(~np.isnan(pvalues))
    if not len(finite):
        return q
    if (pvalues[finite] < 0).any() or (pvalues[finite] > 1).any():
        raise ValueError("p-values must lie in [0, 1]")
    order = finite[np.argsort(pvalues[finite], kind="stable")]
    m = len(order)
    scaled = pvalues[order] * m / np.arange(1, m + 1)
    q[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return q


def pooled_null_uniformity(observed, null, null_genes, *, alpha: float = 0.05) -> dict:
    """Kolmogorov-Smirnov check that pooled p-values of genes known to be non-spatial are uniform.

    Run it on simulated data with planted non-spatial genes (e.g. :func:`spavae.data.simulate.simulate_svg_counts`,
    ``~var['is_spatial']``) and the same model and permutation settings as the real analysis. Pooling the null over
    genes is justified only when this check passes: the pooled p-values of null genes must then be uniform. The
    per-gene p-values of the same genes are tested too, as the reference that should always pass.

    Parameters
    ----------
    observed
        Observed score of every gene (centred with :func:`center_scores` to check what
        :func:`spatially_variable_genes` uses by default).
    null
        ``R x G`` null scores (centred the same way).
    null_genes
        Boolean mask (or indices) of the genes without a spatial pattern.
    alpha
        Level of the KS test.

    Returns
    -------
    ``{'n_null_genes', 'pooled_ks_statistic', 'pooled_ks_pvalue', 'per_gene_ks_statistic', 'per_gene_ks_pvalue',
    'pooling_allowed'}``. The per-gene p-values take only R + 1 values, so their KS test is conservative for small R.
    """
    observed, null = _check_null(observed, null)
    mask = np.zeros(len(observed), dtype=bool)
    mask[np.asarray(null_genes)] = True
    if mask.sum() < 5:
        raise ValueError(f"the uniformity check needs at least 5 null genes, got {int(mask.sum())}")
    pooled = stats.kstest(pooled_pvalues(observed, null)[mask], "uniform")
    per_gene = stats.kstest(permutation_pvalues(observed, null)[mask], "uniform")
    return {"n_null_genes": int(mask.sum()), "pooled_ks_statistic": float(pooled.statistic),
            "pooled_ks_pvalue": float(pooled.pvalue), "per_gene_ks_statistic": float(per_gene.statistic),
            "per_gene_ks_pvalue": float(per_gene.pvalue), "pooling_allowed": bool(pooled.pvalue > alpha)}


def null_training(model, train_kwargs: dict | None = None) -> dict:
    """The training settings of the null models: those the model was trained with (``model.train_params``).

    A permutation p-value compares the observed model's scores with those of models that differ from it only in
    the pairing of spots and locations, so the null models are trained exactly like it (only without a progress
    bar). ``train_kwargs``, if given, is checked against those settings, and the call refused when one differs.

    Returns
    -------
    Keyword arguments of :meth:`spavae.SpaVAE.train`.
    """
    recorded = {key: value for key, value in model.train_params.items() if key != "progress"}
    if not recorded:
        raise ValueError("the model records no training settings (model.train_params is empty): train it with "
                         "model.train() or load it from a file written by SpaVAE.save")
    differ = [key for key, value in (train_kwargs or {}).items()
              if key != "progress" and (key not in recorded or value != recorded[key])]
    if differ:
        given = ", ".join(f"{key}={train_kwargs[key]!r} (the model: {recorded.get(key, 'no such setting')!r})"
                          for key in differ)
        raise ValueError(f"null models must be trained like the observed model, but train_kwargs differ: {given}; "
                         "leave train_kwargs out to use the model's own settings")
    return recorded | {"progress": False}


def null_input(adata: ad.AnnData, setup: DataSetup) -> ad.AnnData:
    """What the null models read of ``adata``, and nothing more, as a small in-memory AnnData.

    It holds the counts of the model's genes (CSR, in the model's order; read chunk by chunk from an AnnData
    opened with ``backed='r'``), the spot names, the true locations and, where the setup uses them, the sections
    and the proteins. Every null model shares its arrays and replaces only the locations (:func:`null_model_scores`),
    so no permutation copies ``adata``.
    """
    rows = CountRows.from_anndata(adata, setup.layer, setup.gene_columns(adata))
    counts = sp.vstack([block for _, block in rows.chunks()], format="csr") if rows.on_disk else rows.matrix
    obs = pd.DataFrame(index=pd.Index(adata.obs_names))
    if setup.batch_key is not None:
        obs[setup.batch_key] = adata.obs[setup.batch_key].to_numpy()
    obsm = {setup.spatial_key: spot_locations(adata, setup.spatial_key)}
    if setup.protein_key is not None:
        obsm[setup.protein_key] = adata.obsm[setup.protein_key]
    layers = {} if setup.layer is None else {setup.layer: counts}
    return ad.AnnData(None if layers else counts, obs=obs, var=pd.DataFrame(index=pd.Index(setup.genes)), obsm=obsm,
                      layers=layers)


def null_model_scores(spots: ad.AnnData, setup: DataSetup, init_params: dict, train_kwargs: dict, order: np.ndarray,
                      seed: int) -> dict[str, np.ndarray]:
    """Every gene statistic (:func:`scores_from_factors`) of one null model: trained with the locations permuted by
    ``order``, scored with the true ones (an identity ``order`` trains the observed model the same way).

    One permutation of :func:`permutation_null`; a plain function of its arguments, so it runs in this process
    or as a Ray task (:func:`spavae.analysis.tasks.run_tasks`).

    Parameters
    ----------
    spots
        The spots with their true locations (:func:`null_input`).
    setup, init_params
        The observed model's fitted data setup and settings (``model.setup``, ``model.init_params``).
    train_kwargs
        Its training settings (:func:`null_training`).
    order
        Spot ``i`` is trained with the location of spot ``order[i]``.
    seed
        Seed of the null model.
    """
    key = setup.spatial_key
    permuted = ad.AnnData(spots.X, obs=spots.obs, var=spots.var, layers=dict(spots.layers),
                          obsm=dict(spots.obsm) | {key: np.asarray(spots.obsm[key])[order]})
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "null.pt"
        SpaVAE(permuted, setup=setup, **(init_params | {"seed": seed})).train(**train_kwargs).save(path)
        scored = SpaVAE.load(path, spots)  # the null model's weights on the spots at their true locations
    scored.refresh_gp_posterior()  # q(u) given its encoder outputs at the true locations
    return scores_from_factors(*factor_expression(scored), scored.module.n_gp)


def permutation_null(adata, model, n_permutations: int, *, train_kwargs: dict | None = None,
                     use_ray: bool = False, address: str | None = None, num_cpus: int | None = None,
                     threads_per_task: int | None = None,
                     progress: Callable | None = None) -> dict[str, np.ndarray]:
    """Null spatial scores of ``n_permutations`` models retrained on locations shuffled across spots.

    Permutation ``r`` shuffles the spots' locations with the ``r``-th draw of a generator seeded with the
    model's seed and trains a fresh model with seed ``seed + r + 1``, the model's data setup and its training
    settings (:func:`null_training`); it is scored with the *true* locations (ALGORITHM 8.1). The permutations are
    drawn before any training, so the result is the same in series and on Ray.

    Parameters
    ----------
    adata
        The AnnData the model was trained on.
    model
        A trained linear-decoder model.
    n_permutations
        Number of null models (each a full training).
    train_kwargs
        The training settings the caller expects the null models to have; refused when one differs from the
        model's own (:func:`null_training`).
    use_ray
        Train the null models as Ray tasks (:func:`spavae.analysis.tasks.run_tasks`) instead of one after the other.
    address, num_cpus
        Ray options (see :func:`spavae.analysis.tasks.run_tasks`).
    threads_per_task
        Torch threads of each null model (and Ray CPUs of each task); ``None``: 1 on Ray, the current setting in
        series. The null scores depend on it slightly (float sums in another order).
    progress
        Called with the permutation index before each training in series (e.g. ``print``).

    Returns
    -------
    For every statistic of :func:`scores_from_factors`, its ``n_permutations x n_genes`` null values (genes in the
    model's order).
    """
    model.check_same_spots(adata)
    if n_permutations < 0:
        raise ValueError(f"n_permutations must be >= 0, got {n_permutations}")
    train = null_training(model, train_kwargs)
    seed = model.init_params["seed"]
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(adata.n_obs) for _ in range(n_permutations)]
    tasks = [(order, seed + r + 1) for r, order in enumerate(orders)]
    if not tasks:
        return {statistic: np.zeros((0, len(model.var_names))) for statistic in STATISTICS}
    common = (null_input(adata, model.setup), model.setup, model.init_params, train)
    if not use_ray:
        results = []
        for r, task in enumerate(tasks):
            if progress is not None:
                progress(r)
            results += run_tasks(null_model_scores, [task], common=common, use_ray=False,
                                 threads_per_task=threads_per_task)
    else:
        results = run_tasks(null_model_scores, tasks, common=common, address=address, num_cpus=num_cpus,
                            threads_per_task=threads_per_task or 1)
    failed = [result for result in results if result.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} of {n_permutations} null models failed; the first: {failed[0].error}")
    return {statistic: np.vstack([result.value[statistic] for result in results]) for statistic in STATISTICS}
