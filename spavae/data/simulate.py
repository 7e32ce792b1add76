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
    ``obsm['true_fields']`` and the true log-means in ``layers['true_log_mean']``.
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
    adata.uns["simulation"] = {
        "seed": seed,
        "n_domains": n_domains,
        "marker_lfc": marker_lfc,
        "field_lfc": field_lfc,
        "dispersion": dispersion,
    }
    return adata
