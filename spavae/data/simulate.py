"""A simulator of spatial count data with known domains (Visium-like hexagonal spots).

Spots sit on a hexagonal lattice. The tissue is cut into layered domains by curved boundaries (like cortical
layers), smooth random fields add continuous spatial variation, and counts are negative-binomial with spot
library sizes. The planted domains are in ``obs['ground_truth']`` and the fields in ``obsm['true_fields']``.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd


def hex_grid(n_rows: int, n_cols: int) -> np.ndarray:
    """Visium-like hexagonal lattice: ``n_rows * n_cols`` spots, neighbours one unit apart."""
    if n_rows < 2 or n_cols < 2:
        raise ValueError(f"the grid needs at least 2 rows and 2 columns, got {n_rows} x {n_cols}")
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    x = cols + 0.5 * (rows % 2)
    y = rows * np.sqrt(3) / 2
    return np.column_stack([x.ravel(), y.ravel()]).astype(np.float64)


def smooth_fields(locations: np.ndarray, n_fields: int, lengthscale: float, rng: np.random.Generator) -> np.ndarray:
    """Draws of a zero-mean unit-variance RBF Gaussian process (random Fourier features, 200 features)."""
    n_features = 200
    freqs = rng.normal(scale=1.0 / lengthscale, size=(2, n_features, n_fields))
    phases = rng.uniform(0, 2 * np.pi, size=(n_features, n_fields))
    weights = rng.normal(size=(n_features, n_fields))
    proj = np.einsum("nd,dfk->nfk", locations, freqs) + phases
    fields = np.sqrt(2.0 / n_features) * np.einsum("nfk,fk->nk", np.cos(proj), weights)
    return (fields - fields.mean(0)) / fields.std(0)


def simulate_spatial_counts(
    *,
    n_rows: int = 32,
    n_cols: int = 32,
    n_genes: int = 200,
    n_domains: int = 5,
    n_fields: int = 2,
    marker_fraction: float = 0.15,
    marker_lfc: float = 0.5,
    field_lfc: float = 0.08,
    mean_count: float = 0.6,
    dispersion: float = 3.0,
    seed: int = 0,
) -> ad.AnnData:
    """Simulate spatial counts with layered domains, smooth fields and NB noise.

    Parameters
    ----------
    n_rows, n_cols
        Size of the hexagonal spot lattice (``n_rows * n_cols`` spots).
    n_genes
        Number of genes.
    n_domains
        Number of layered domains (bands cut by curved boundaries).
    n_fields
        Number of smooth random fields adding continuous variation.
    marker_fraction
        Fraction of genes up-regulated in each domain.
    marker_lfc
        Natural-log fold change of a domain's marker genes.
    field_lfc
        Standard deviation of the log-scale loadings of genes on the smooth fields.
    mean_count
        Typical mean count per gene and spot before library-size scaling.
    dispersion
        Negative-binomial inverse dispersion ``theta`` (larger = closer to Poisson).
    seed
        Seed of the random generator; the same seed gives the same data.

    Returns
    -------
    AnnData with integer counts in ``.X``, ``obsm['spatial']``, ``obs['ground_truth']`` (domain labels),
    ``obsm['true_fields']``, the true log-means in ``layers['true_log_mean']`` and the planted log fold change
    of every gene in every domain in ``varm['domain_effect']`` (genes x domains, column ``d`` = ``domain<d>``).
    """
    if n_domains < 2:
        raise ValueError(f"n_domains must be at least 2, got {n_domains}")
    if not 0 < marker_fraction <= 1:
        raise ValueError(f"marker_fraction must be in (0, 1], got {marker_fraction}")
    rng = np.random.default_rng(seed)
    locations = hex_grid(n_rows, n_cols)
    unit = (locations - locations.min(0)) / np.ptp(locations, axis=0)
    depth = unit[:, 1] + 0.12 * np.sin(2 * np.pi * (unit[:, 0] + rng.uniform())) + 0.05 * unit[:, 0]
    positions = np.linspace(0, 1, n_domains + 1)[1:-1]
    positions = positions + rng.uniform(-0.3, 0.3, size=n_domains - 1) / n_domains
    domains = np.digitize(depth, np.quantile(depth, np.sort(positions)))

    fields = smooth_fields(locations, n_fields, lengthscale=0.25 * np.ptp(locations, axis=0).mean(), rng=rng)
    base = np.log(mean_count) + rng.normal(scale=0.5, size=n_genes)
    domain_effect = np.zeros((n_domains, n_genes))
    n_markers = max(1, int(round(marker_fraction * n_genes)))
    for d in range(n_domains):
        markers = rng.choice(n_genes, size=n_markers, replace=False)
        domain_effect[d, markers] = marker_lfc * rng.uniform(0.7, 1.3, size=n_markers)
    loadings = rng.normal(scale=field_lfc, size=(n_fields, n_genes))
    log_mean = base + domain_effect[domains] + fields @ loadings
    library = rng.lognormal(mean=0.0, sigma=0.3, size=len(locations))
    mu = library[:, None] * np.exp(log_mean)
    counts = rng.negative_binomial(dispersion, dispersion / (dispersion + mu)).astype(np.float32)

    obs = pd.DataFrame(
        {"ground_truth": pd.Categorical([f"domain{d}" for d in domains])},
        index=pd.Index([f"spot{i}" for i in range(len(locations))]),
    )
    var = pd.DataFrame(index=pd.Index([f"gene{j}" for j in range(n_genes)]))
    var["is_marker"] = (domain_effect > 0).any(0)
    adata = ad.AnnData(X=counts, obs=obs, var=var)
    adata.obsm["spatial"] = locations
    adata.obsm["true_fields"] = fields
    adata.layers["true_log_mean"] = log_mean.astype(np.float32)
    adata.varm["domain_effect"] = domain_effect.T.copy()
    adata.uns["simulation"] = {
        "seed": seed,
        "n_domains": n_domains,
        "marker_lfc": marker_lfc,
        "field_lfc": field_lfc,
        "dispersion": dispersion,
    }
    return adata


def simulate_svg_counts(*, n_rows: int = 24, n_cols: int = 24, n_spatial: int = 30, n_nonspatial: int = 70,
                        n_fields: int = 3, effect: float = 0.8, mean_count: float = 2.0, dispersion: float = 5.0,
                        seed: int = 0) -> ad.AnnData:
    """Counts with planted spatially variable genes (``var['is_spatial']``) for SVG benchmarks.

    Spatial genes load on smooth random fields over the lattice; non-spatial genes on spot-level factors
    drawn independently for every spot (same effect size), so both kinds vary but only the first in space.
    """
    rng = np.random.default_rng(seed)
    locations = hex_grid(n_rows, n_cols)
    fields = smooth_fields(locations, n_fields, lengthscale=0.2 * np.ptp(locations, axis=0).mean(), rng=rng)
    noise = rng.normal(size=(len(locations), n_fields))
    n_genes = n_spatial + n_nonspatial
    loadings = np.zeros((2 * n_fields, n_genes))
    for g in range(n_genes):
        factor = rng.integers(n_fields) + (0 if g < n_spatial else n_fields)
        loadings[factor, g] = effect * rng.choice([-1.0, 1.0])
    log_mean = np.log(mean_count) + rng.normal(scale=0.3, size=n_genes) + np.hstack([fields, noise]) @ loadings
    mu = rng.lognormal(0.0, 0.2, size=len(locations))[:, None] * np.exp(log_mean)
    counts = rng.negative_binomial(dispersion, dispersion / (dispersion + mu)).astype(np.float32)
    var = pd.DataFrame({"is_spatial": np.arange(n_genes) < n_spatial},
                       index=pd.Index([f"gene{j}" for j in range(n_genes)]))
    adata = ad.AnnData(X=counts, obs=pd.DataFrame(index=pd.Index([f"spot{i}" for i in range(len(locations))])),
                       var=var)
    adata.obsm["spatial"] = locations
    return adata


def add_protein_counts(adata: ad.AnnData, *, n_proteins: int = 12, foreground: float = 3.0, seed: int = 0,
                       key: str = "protein_expression") -> ad.AnnData:
    """Add simulated surface-protein counts to ``obsm[key]`` (spaMultiVAE-style background + foreground).

    Every protein has a log-normal background in all spots; in the spots of one planted domain
    (``uns['protein_domains']``) its counts come from the foreground, ``(1 + foreground)`` times the background.
    ``obsm[key + '_is_foreground']`` records which counts are foreground.
    """
    rng = np.random.default_rng(seed)
    domains = adata.obs["ground_truth"].astype(str).to_numpy()
    names = np.unique(domains)
    owner = names[np.arange(n_proteins) % len(names)]
    background = rng.lognormal(mean=np.log(rng.uniform(3, 8, n_proteins)), sigma=0.3, size=(adata.n_obs, n_proteins))
    is_foreground = domains[:, None] == owner[None, :]
    mean = background * np.where(is_foreground, 1.0 + foreground, 1.0)
    counts = rng.negative_binomial(10.0, 10.0 / (10.0 + mean)).astype(np.float32)
    adata.obsm[key] = counts
    adata.obsm[f"{key}_is_foreground"] = is_foreground
    adata.uns["protein_domains"] = list(owner)
    return adata


def simulate_sections(*, n_sections: int = 2, batch_effect: float = 0.5, seed: int = 0, **kwargs) -> ad.AnnData:
    """Several simulated sections sharing domains and genes, with a per-section gene-wise batch effect.

    Sections differ by a log-normal multiplicative effect per gene (``batch_effect`` = its sd); ``obs['section']``
    names the section. Keyword arguments go to :func:`simulate_spatial_counts`.
    """
    rng = np.random.default_rng(seed)
    base = simulate_spatial_counts(seed=seed, **kwargs)
    sections = []
    for s in range(n_sections):
        section = simulate_spatial_counts(seed=seed, **kwargs)  # same domains and genes...
        scale = np.exp(rng.normal(scale=batch_effect, size=base.n_vars))
        mu = np.exp(section.layers["true_log_mean"]) * scale * rng.lognormal(0.0, 0.3, size=(section.n_obs, 1))
        section.X = rng.negative_binomial(3.0, 3.0 / (3.0 + mu)).astype(np.float32)  # ...new counts with the effect
        section.obs_names = [f"s{s}_{name}" for name in section.obs_names]
        section.obs["section"] = f"section{s}"
        sections.append(section)
    adata = ad.concat(sections, merge="same")
    adata.obs["section"] = pd.Categorical(adata.obs["section"])
    return adata
