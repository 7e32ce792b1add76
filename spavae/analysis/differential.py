"""Differential expression between groups of spots from denoised posterior draws (ALGORITHM 7.3).

For each group, ``n_draws`` spots are drawn with replacement; each drawn spot gets one latent draw from its
posterior and is decoded (normalised scale). From the two ``n_draws x G`` matrices ``D1``, ``D2``:

* pseudocount ``eps``: for each group, the genes with no count in any of its spots; the 0.9-quantile over
  those genes of the largest draw in ``D_k`` (``1e-10`` when there is no such gene); the larger of the two
  groups' values clipped to ``[0.05, 0.5]`` (0.05 with ``estimate_pseudocount=False``);
* ``LFC = log2(mean D1 + eps) - log2(mean D2 + eps)``;
* paired per-draw ``p_lfc = log2(D1 + eps) - log2(D2 + eps)``, summarised by its mean, median and sd;
* threshold ``delta = max(0.3, 0.6 (|m_min| + |m_max|) / 2)`` from a 3-component Gaussian mixture fitted to
  the mean LFCs (``m`` its sorted component means);
* ``prob_DE`` = fraction of draws with ``|p_lfc| >= delta``, ``bayes_factor = log(prob_DE + 1e-10) -
  log(prob_not_DE + 1e-10)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scipy import sparse
from sklearn.mixture import GaussianMixture

from spavae.analysis._common import check_same_spots
from spavae.train import auto_batch_size
from spavae.utils import check_number

if TYPE_CHECKING:
    from spavae.api import SpaVAE

DELTA_FLOOR = 0.3
PSEUDOCOUNT_RANGE = (0.05, 0.5)
COLUMNS = ["LFC", "mean_LFC", "median_LFC", "sd_LFC", "prob_DE", "prob_not_DE", "bayes_factor",
           "denoised_mean1", "denoised_mean2", "raw_mean1", "raw_mean2"]


def _as_list(groups: str | Sequence[str]) -> list[str]:
    return [groups] if isinstance(groups, str) else [str(g) for g in groups]


def group_masks(labels: pd.Series, group1: str | Sequence[str], group2: str | Sequence[str] | None = None, *,
                unlabeled: str | None = "NA") -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of the two groups of spots.

    ``group2=None`` means every other labelled spot (missing labels and ``unlabeled`` excluded).
    """
    present = labels.notna().to_numpy()
    values = labels.astype(str).to_numpy()
    known = set(values[present])
    wanted = _as_list(group1) + ([] if group2 is None else _as_list(group2))
    missing = [g for g in wanted if g not in known]
    if missing:
        raise ValueError(f"unknown group label(s) {missing}; the labels are {sorted(known)}")
    mask1 = present & np.isin(values, _as_list(group1))
    if group2 is None:
        mask2 = present & ~mask1 & (values != unlabeled)
    else:
        mask2 = present & np.isin(values, _as_list(group2))
    if (mask1 & mask2).any():
        raise ValueError(f"group1 {group1!r} and group2 {group2!r} share spots; the groups must not overlap")
    if not mask2.any():
        raise ValueError(f"group2 {group2!r} has no spots (group1 {group1!r} holds every labelled spot)")
    return mask1, mask2


def group_pseudocount(silent: np.ndarray, draws: np.ndarray) -> float:
    """One group's pseudocount: 0.9-quantile, over the ``silent`` genes (never counted in the group), of their
    largest draw."""
    return float(np.quantile(draws[:, silent].max(axis=0), 0.9)) if silent.any() else 1e-10


def normalized_group_means(model: SpaVAE, masks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Mean size-factor-normalised counts (``counts / s``) of each group of the model's spots, per gene.

    The counts are streamed chunk by chunk from the model's sparse matrix: memory is one chunk, whatever the
    number of spots.
    """
    factors = model.data.size_factors.cpu().numpy().astype(np.float64)
    sums = [np.zeros(len(model.var_names)) for _ in masks]
    for start, block in model.data.counts.chunks():
        rows = slice(start, start + block.shape[0])
        scaled = sparse.diags(1.0 / factors[rows]) @ block.astype(np.float64)
        for total, mask in zip(sums, masks):
            total += np.asarray(scaled[mask[rows]].sum(axis=0)).ravel()
    return [total / max(int(mask.sum()), 1) for total, mask in zip(sums, masks)]


def lfc_threshold(mean_lfc: np.ndarray, *, seed: int = 0) -> float:
    """``max(0.3, 0.6 (|m_min| + |m_max|) / 2)`` with ``m`` the means of a 3-component GMM of the mean LFCs."""
    if len(mean_lfc) < 3:
        raise ValueError(f"the LFC threshold needs a 3-component mixture over >= 3 genes, got {len(mean_lfc)}; "
                         "pass delta= explicitly")
    means = np.sort(GaussianMixture(3, random_state=seed).fit(np.asarray(mean_lfc)[:, None]).means_.ravel())
    return max(DELTA_FLOOR, 0.6 * (abs(means[0]) + abs(means[-1])) / 2)


def differential_expression(adata: ad.AnnData, model: SpaVAE, *, groupby: str, group1: str | Sequence[str],
                            group2: str | Sequence[str] | None = None, unlabeled: str | None = "NA",
                            n_draws: int = 10000, estimate_pseudocount: bool = True, delta: float | None = None,
                            mode: str = "full", batch_size: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Differential expression of ``group1`` against ``group2`` (or against all other labelled spots).

    Parameters
    ----------
    adata
        The AnnData the model was trained on (same spots and genes, same order).
    model
        A trained :class:`~spavae.SpaVAE`.
    groupby
        ``obs`` column with the group labels (e.g. domains from :func:`find_domains`).
    group1, group2
        One label or a list of labels each; ``group2=None`` compares with the rest.
    unlabeled
        Label left out of "the rest" (``'NA'``, the unannotated spots of the DLPFC files).
    n_draws
        Spots drawn with replacement per group (10000 as in the original).
    estimate_pseudocount
        Estimate the pseudocount from the draws (the original's default); otherwise use 0.05.
    delta
        LFC threshold; ``None`` estimates it with :func:`lfc_threshold`.
    mode
        Latent posterior: ``'full'`` (exact, given all spots) or ``'chunked'``. The original computes the GP
        posterior per chunk of drawn spots; ``'full'`` gives every drawn spot its exact posterior instead.
    batch_size
        Draws decoded at once.
    seed
        Seed of the spot draws, the latent draws and the mixture.

    Returns
    -------
    Table indexed by gene with columns ``LFC``, ``mean_LFC``, ``median_LFC``, ``sd_LFC``, ``prob_DE``,
    ``prob_not_DE``, ``bayes_factor``, ``denoised_mean1``, ``denoised_mean2`` (normalised scale) and
    ``raw_mean1``, ``raw_mean2`` (size-factor-normalised counts of the groups' spots). ``table.attrs`` holds
    ``delta``, ``pseudocount``, the groups and their sizes.
    """
    check_same_spots(adata, model)
    if groupby not in adata.obs:
        raise KeyError(f"adata.obs has no column '{groupby}'; columns: {list(adata.obs.columns)}")
    check_number("n_draws", n_draws, integer=True, low=1)
    mask1, mask2 = group_masks(adata.obs[groupby], group1, group2, unlabeled=unlabeled)
    raw_mean1, raw_mean2 = normalized_group_means(model, (mask1, mask2))
    mean, var = model.latent_posterior(mode=mode, batch_size=batch_size)
    batch_size = batch_size or auto_batch_size(len(model.data))
    rng = np.random.default_rng(seed)
    draws = []
    for offset, mask in enumerate((mask1, mask2)):
        index = rng.choice(np.flatnonzero(mask), size=n_draws, replace=True)
        rows = torch.as_tensor(index, device=mean.device)
        covariates = None if model.data.covariates is None else model.data.covariates[rows]
        decoded = model.module.decode_posterior(mean[rows], var[rows], covariates=covariates, n_samples=1,
                                   batch_size=batch_size, seed=seed + offset)
        draws.append(decoded.cpu().numpy().astype(np.float32))  # n_draws x G, kept in float32 to halve memory
    d1, d2 = draws
    if estimate_pseudocount:
        eps = float(np.clip(max(group_pseudocount(raw_mean1 == 0, d1),
                                group_pseudocount(raw_mean2 == 0, d2)), *PSEUDOCOUNT_RANGE))
    else:
        eps = PSEUDOCOUNT_RANGE[0]
    paired = np.log2(d1 + np.float32(eps)) - np.log2(d2 + np.float32(eps))
    mean_lfc = paired.mean(axis=0, dtype=np.float64)
    delta = lfc_threshold(mean_lfc, seed=seed) if delta is None else float(delta)
    prob_de = (np.abs(paired) >= delta).mean(axis=0)
    table = pd.DataFrame({
        "LFC": np.log2(d1.mean(0, dtype=np.float64) + eps) - np.log2(d2.mean(0, dtype=np.float64) + eps),
        "mean_LFC": mean_lfc,
        "median_LFC": np.median(paired, axis=0),
        "sd_LFC": paired.std(axis=0, dtype=np.float64),
        "prob_DE": prob_de,
        "prob_not_DE": 1.0 - prob_de,
        "bayes_factor": np.log(prob_de + 1e-10) - np.log(1.0 - prob_de + 1e-10),
        "denoised_mean1": d1.mean(0, dtype=np.float64),
        "denoised_mean2": d2.mean(0, dtype=np.float64),
        "raw_mean1": raw_mean1,
        "raw_mean2": raw_mean2,
    }, index=pd.Index(model.var_names, name="gene"))
    table.attrs = {"delta": delta, "pseudocount": eps, "group1": _as_list(group1),
                   "group2": "rest" if group2 is None else _as_list(group2),
                   "n_spots1": int(mask1.sum()), "n_spots2": int(mask2.sum())}
    return table


def rank_genes_domains(adata: ad.AnnData, model: SpaVAE, *, groupby: str, unlabeled: str | None = "NA",
                       key_added: str = "spavae_de", n_draws: int = 10000, seed: int = 0,
                       copy: bool = False, **kwargs) -> ad.AnnData | None:
    """Each group of ``obs[groupby]`` against the rest; a tidy table in ``adata.uns[key_added]['results']``.

    Parameters
    ----------
    adata, model, groupby, unlabeled, n_draws, seed
        As in :func:`differential_expression`; the ``unlabeled`` group itself is not tested.
    key_added
        ``uns`` key: ``'results'`` is the long table (one row per group and gene, columns ``group``, ``gene``
        and those of :func:`differential_expression`), ``'summary'`` one row per group with ``delta``,
        ``pseudocount`` and the group sizes, ``'params'`` the parameters.
    copy
        Work on and return a copy of ``adata``.
    **kwargs
        Passed to :func:`differential_expression` (``estimate_pseudocount``, ``delta``, ``mode``,
        ``batch_size``).

    Returns
    -------
    The copy when ``copy=True``, else ``None``.
    """
    if groupby not in adata.obs:
        raise KeyError(f"adata.obs has no column '{groupby}'; columns: {list(adata.obs.columns)}")
    labels = adata.obs[groupby]
    groups = sorted(g for g in labels.dropna().astype(str).unique() if g != unlabeled)
    if len(groups) < 2:
        raise ValueError(f"obs['{groupby}'] needs at least 2 labelled groups to compare, got {groups}")
    adata = adata.copy() if copy else adata
    tables, summary = [], []
    for group in groups:
        table = differential_expression(adata, model, groupby=groupby, group1=group, unlabeled=unlabeled,
                                        n_draws=n_draws, seed=seed, **kwargs)
        tables.append(table.reset_index().assign(group=group))
        summary.append({"group": group, **{k: table.attrs[k] for k in ("delta", "pseudocount", "n_spots1",
                                                                        "n_spots2")}})
    results = pd.concat(tables, ignore_index=True)[["group", "gene", *COLUMNS]]
    adata.uns[key_added] = {"results": results, "summary": pd.DataFrame(summary),
                            "params": {"groupby": groupby, "unlabeled": str(unlabeled), "n_draws": n_draws,
                                       "seed": seed, **{k: str(v) for k, v in kwargs.items()}}}
    return adata if copy else None
