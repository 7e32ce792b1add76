"""A simulator of spatial count data with known domains (Visium-like hexagonal spots).

Spots sit on a hexagonal lattice. The tissue is cut into layered domains by curved boundaries (like cortical
layers), smooth random fields add continuous spatial variation, and counts are negative-binomial with spot
library sizes. The planted domains are in ``obs['ground_truth']`` and the fields in ``obsm['true_fields']``.

:func:`simulate_large_section` makes atlas-scale sections (Visium HD-like, up to millions of spots) as sparse
CSR counts generated chunk by chunk, on a tissue-shaped lattice; :func:`simulate_many_genes_section` makes small
sections with many genes of which few carry the domains, for gene selection.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.optimize import brentq

from spavae.data.genes import default_chunk_size


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


_LOG_LIBRARY_STEP = 0.01  # spot library sizes are drawn on a 1 % grid (log scale) ...
_FIELD_STEP = 0.05  # ... and the smooth field on a 0.05 sd grid, so spots share per-gene probability tables
_FOURIER_FEATURES = 200


def tissue_lattice(n_spots: int, *, lattice: str = "hex", seed: int = 0) -> np.ndarray:
    """Exactly ``n_spots`` lattice points (unit spacing) inside an irregular, roughly square tissue outline.

    A lattice about twice as large as needed is laid out; every point gets its distance from the centre in a
    rounded-square norm, divided by a randomly wavy outline radius, and the ``n_spots`` smallest are kept
    (in lattice row order), so the section is one blob with a smooth irregular edge. Coordinates start at 0.

    Parameters
    ----------
    n_spots
        Number of spots.
    lattice
        ``'hex'`` (Visium: rows ``sqrt(3)/2`` apart, odd rows shifted by half a spot) or ``'square'``
        (Visium HD bins).
    seed
        Seed of the outline.

    Returns
    -------
    ``(n_spots, 2)`` float64 array of x, y coordinates.
    """
    if lattice not in ("hex", "square"):
        raise ValueError(f"lattice must be 'hex' or 'square', got {lattice!r}")
    if n_spots < 1:
        raise ValueError(f"n_spots must be at least 1, got {n_spots}")
    row_step = np.sqrt(3) / 2 if lattice == "hex" else 1.0
    width = np.sqrt(2.0 * n_spots * row_step) + 4
    n_cols, n_rows = int(np.ceil(width)), int(np.ceil(width / row_step))
    if lattice == "hex":
        grid = hex_grid(n_rows, n_cols)
    else:
        rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
        grid = np.column_stack([cols.ravel(), rows.ravel()]).astype(np.float64)
    centred = (grid - grid.mean(0)) / (width / 2)
    rng = np.random.default_rng(seed)
    angle = np.arctan2(centred[:, 1], centred[:, 0])
    harmonics = np.arange(2, 6)
    outline = 1 + (rng.uniform(0, 0.04, size=4) * np.cos(np.outer(angle, harmonics)
                                                        + rng.uniform(0, 2 * np.pi, size=4))).sum(1)
    score = (np.abs(centred) ** 4).sum(1) ** 0.25 / outline
    kept = np.sort(np.argpartition(score, n_spots - 1)[:n_spots])
    locations = grid[kept]
    return locations - locations.min(0)


def _layered_domains(locations: np.ndarray, n_domains: int, rng: np.random.Generator) -> np.ndarray:
    """Domain labels of curved layers across the section, their widths a fixed fraction of its height."""
    unit = (locations - locations.min(0)) / np.ptp(locations, axis=0)
    depth = (unit[:, 1] + rng.uniform(0.06, 0.12) * np.sin(2 * np.pi * (rng.uniform(0.6, 1.2) * unit[:, 0]
                                                                         + rng.uniform()))
             + rng.uniform(-0.1, 0.1) * unit[:, 0])
    positions = np.linspace(0, 1, n_domains + 1)[1:-1] + rng.uniform(-0.3, 0.3, size=n_domains - 1) / n_domains
    return np.digitize(depth, np.quantile(depth, np.sort(positions)))


def _smooth_field(locations: np.ndarray, lengthscale: float, rng: np.random.Generator,
                  chunk_size: int = 10_000) -> np.ndarray:
    """One standardised draw of an RBF Gaussian process (random Fourier features), evaluated chunk by chunk."""
    freqs = rng.normal(scale=1.0 / lengthscale, size=(2, _FOURIER_FEATURES))
    phases = rng.uniform(0, 2 * np.pi, size=_FOURIER_FEATURES)
    weights = rng.normal(size=_FOURIER_FEATURES)
    field = np.empty(len(locations))
    for start in range(0, len(locations), chunk_size):
        stop = min(start + chunk_size, len(locations))
        field[start:stop] = np.cos(locations[start:stop] @ freqs + phases) @ weights
    return (field - field.mean()) / field.std()


def _nonzero_probability(mean: np.ndarray, dispersion: float | None) -> np.ndarray:
    """P(count > 0) under NB(mean, dispersion), or Poisson(mean) when ``dispersion`` is None."""
    if dispersion is None:
        return -np.expm1(-mean)
    return -np.expm1(-dispersion * np.log1p(mean / dispersion))


def _positive_counts(mean: np.ndarray, p_nonzero: np.ndarray, dispersion: float | None,
                     rng: np.random.Generator) -> np.ndarray:
    """Counts drawn from NB(mean, dispersion) (or Poisson) conditioned on being positive, by CDF inversion.

    A uniform share of the positive mass, ``e = v * P(count > 0)``, is compared with the running sum of
    ``P(count = k)``, ``k = 1, 2, ...``; the first ``k`` whose sum reaches ``e`` is the count (or the first
    ``k`` past the mean where ``P(count = k) < 1e-18``, when rounding leaves ``e`` above the summed mass).
    """
    values = np.empty(mean.size, dtype=np.float32)
    excess = rng.random(mean.size) * p_nonzero
    if dispersion is None:
        prob = np.exp(-mean)
        ratio = mean
    else:
        prob = np.exp(-dispersion * np.log1p(mean / dispersion))
        ratio = mean / (dispersion + mean)
    active = np.arange(mean.size)
    mass = np.zeros(mean.size)
    k = 0
    while active.size:
        step = ratio if dispersion is None else ratio * (k + dispersion)
        prob = prob * step / (k + 1)
        k += 1
        mass = mass + prob
        done = (excess <= mass) | ((prob < 1e-18) & (k > mean))  # or only a negligible tail is left
        values[active[done]] = k
        keep = ~done
        active, excess, mass, prob, ratio, mean = (active[keep], excess[keep], mass[keep], prob[keep], ratio[keep],
                                                   mean[keep])
    return values


def simulate_large_section(
    n_spots: int,
    n_genes: int = 2000,
    *,
    lattice: str = "hex",
    density: float = 0.05,
    n_domains: int = 5,
    n_domain_genes: int | None = None,
    domain_lfc: float = 1.0,
    field_lfc: float = 0.0,
    dispersion: float | None = 3.0,
    library_sd: float = 0.4,
    seed: int = 0,
    chunk_size: int | None = None,
) -> ad.AnnData:
    """Simulate a large sparse section (Visium HD-like, up to millions of spots) with planted domains.

    Spots sit on a unit-spacing lattice inside an irregular tissue outline (:func:`tissue_lattice`). Curved
    layers cut the section into domains whose widths are fixed fractions of its height, so the domain problem
    looks the same at any ``n_spots``. Gene ``g`` in spot ``i`` of domain ``d`` has mean
    ``library_i * exp(c + base_g + effect_dg + loading_g * field_i)``: ``base_g`` is drawn per gene (sd 1),
    ``n_domain_genes`` genes are up-regulated in one domain each (``effect_dg``, log fold change ``domain_lfc``
    x U(0.7, 1.3)) and re-centred so that their section-wide mean matches their base mean, the other genes load
    on one smooth random field with sd ``field_lfc`` (0: they vary only with the library size), and ``c`` is
    solved for so that the expected fraction of nonzero counts is ``density``. Counts are negative binomial
    (Poisson if ``dispersion`` is None).

    Counts are generated ``chunk_size`` spots at a time straight into the CSR arrays, so memory stays near the
    final matrix (about 8 bytes per nonzero) plus ``chunk_size x n_genes x 9`` bytes of scratch. Nonzero
    positions come from one uniform 32-bit draw per entry compared with the entry's probability of a nonzero
    count; values come from the zero-truncated distribution. To share these probability tables, library sizes
    are drawn on a 1 % grid and the field on a 0.05 sd grid. The result does not depend on ``chunk_size``.

    Parameters
    ----------
    n_spots
        Number of spots (at least 100).
    n_genes
        Number of genes.
    lattice
        ``'hex'`` (Visium) or ``'square'`` (Visium HD bins).
    density
        Target fraction of nonzero counts, in (0, 1); about 0.05 for Visium HD 8 um bins.
    n_domains
        Number of layered domains.
    n_domain_genes
        Genes whose mean differs between domains (default: 10 % of the genes).
    domain_lfc
        Natural-log fold change of a domain gene in its domain.
    field_lfc
        Standard deviation of the non-domain genes' loadings on a smooth field (lengthscale 15 % of the
        section's size); 0 leaves them varying only with library size.
    dispersion
        Negative-binomial inverse dispersion ``theta``; None for Poisson counts.
    library_sd
        Standard deviation of the log library size of spots.
    seed
        Seed; the same arguments give the same data.
    chunk_size
        Spots generated at a time (default: 10,000, fewer when there are over 2,000 genes, so that a chunk
        holds at most 20 million entries).

    Returns
    -------
    AnnData with float32 counts as a CSR matrix in ``.X`` (int32 indices and indptr while the number of nonzeros
    allows), ``obsm['spatial']`` (float64), ``obs['ground_truth']`` (categorical ``domain0``, ...),
    ``obs['library_size']``, ``var['is_domain_gene']``, ``var['mean_expression']`` (section-wide mean count at
    library size 1), ``var['field_loading']``, ``varm['domain_effect']`` (genes x domains log fold changes),
    ``obsm['true_field']`` (one column) when ``field_lfc > 0``, and the settings with the realised density in
    ``uns['simulation']``. The mean count of gene ``g`` in spot ``i`` is exactly ``library_size_i *
    mean_expression_g * exp(domain_effect_g,d(i) + field_loading_g * true_field_i)``.
    """
    n_domain_genes = int(round(0.1 * n_genes)) if n_domain_genes is None else int(n_domain_genes)
    chunk_size = default_chunk_size(n_genes) if chunk_size is None else int(chunk_size)
    _check_large_section_arguments(n_spots, n_genes, density, n_domains, n_domain_genes, dispersion, chunk_size)
    if n_genes % 2:
        chunk_size += chunk_size % 2  # whole 64-bit draws per chunk, so chunking does not change the data
    layout_rng, bits_rng, value_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))

    locations = tissue_lattice(n_spots, lattice=lattice, seed=int(layout_rng.integers(2**32)))
    domains = _layered_domains(locations, n_domains, layout_rng)
    base = layout_rng.normal(size=n_genes)
    effect = np.zeros((n_domains, n_genes))
    domain_genes = np.sort(layout_rng.choice(n_genes, size=n_domain_genes, replace=False))
    effect[np.arange(n_domain_genes) % n_domains, domain_genes] = (
        domain_lfc * layout_rng.uniform(0.7, 1.3, size=n_domain_genes))
    fractions = np.bincount(domains, minlength=n_domains) / n_spots
    base -= np.log(fractions @ np.exp(effect))
    loading = np.zeros(n_genes)
    field_level = np.zeros(n_spots, dtype=np.int64)
    if field_lfc > 0:
        is_noise = np.ones(n_genes, dtype=bool)
        is_noise[domain_genes] = False
        loading[is_noise] = layout_rng.normal(scale=field_lfc, size=is_noise.sum())
        field = _smooth_field(locations, 0.15 * np.ptp(locations, axis=0).mean(), layout_rng)
        field_level = np.rint(field / _FIELD_STEP).astype(np.int64)
    library_level = np.rint(layout_rng.normal(scale=library_sd, size=n_spots) / _LOG_LIBRARY_STEP).astype(np.int64)

    def means(spot_class: np.ndarray, offset: float) -> np.ndarray:
        """Mean counts of the classes ``(domain, library level, field level)``, classes x genes (one array)."""
        log_mean = effect[spot_class[:, 0]]
        log_mean += base + offset
        log_mean += (spot_class[:, 1] * _LOG_LIBRARY_STEP)[:, None]
        if field_lfc > 0:
            log_mean += np.outer(spot_class[:, 2] * _FIELD_STEP, loading)
        return np.exp(log_mean, out=log_mean)

    spot_class = np.column_stack([domains, library_level, field_level])
    sample = layout_rng.choice(n_spots, size=min(n_spots, 2000), replace=False)
    sample_classes, sample_counts = np.unique(spot_class[sample], axis=0, return_counts=True)
    weights = sample_counts / sample_counts.sum() / n_genes

    def density_gap(offset: float) -> float:
        expected = 0.0
        for block in range(0, len(sample_classes), 64):
            mean = means(sample_classes[block:block + 64], offset)
            expected += weights[block:block + 64] @ _nonzero_probability(mean, dispersion).sum(1)
        return expected - density

    offset = brentq(density_gap, -50.0, 50.0, xtol=1e-4)

    capacity = int(density * n_spots * n_genes * 1.03) + 10 * n_genes
    data = np.empty(capacity, dtype=np.float32)
    indices = np.empty(capacity, dtype=np.int32)
    indptr = np.zeros(n_spots + 1, dtype=np.int64)
    nnz = 0
    thresholds = np.empty((min(chunk_size, n_spots), n_genes), dtype=np.uint32)  # scratch reused by every chunk
    is_nonzero = np.empty(thresholds.shape, dtype=bool)
    for start in range(0, n_spots, chunk_size):
        stop = min(start + chunk_size, n_spots)
        classes, inverse = np.unique(spot_class[start:stop], axis=0, return_inverse=True)
        inverse = inverse.ravel()
        mean = means(classes, offset)
        p_nonzero = _nonzero_probability(mean, dispersion)
        threshold = np.minimum(np.floor(p_nonzero * 2.0**32), 2.0**32 - 1).astype(np.uint32)
        n_entries = (stop - start) * n_genes
        bits = bits_rng.bit_generator.random_raw((n_entries + 1) // 2).view(np.uint32)[:n_entries]
        np.take(threshold, inverse, axis=0, out=thresholds[:stop - start])
        np.less(bits.reshape(stop - start, n_genes), thresholds[:stop - start], out=is_nonzero[:stop - start])
        del bits
        flat = np.flatnonzero(is_nonzero[:stop - start])
        rows, cols = np.divmod(flat, n_genes)
        class_of_entry = inverse[rows]
        if nnz + flat.size > capacity:
            capacity = max(nnz + flat.size, int(capacity * 1.25))
            data.resize(capacity, refcheck=False)
            indices.resize(capacity, refcheck=False)
        data[nnz:nnz + flat.size] = _positive_counts(mean[class_of_entry, cols], p_nonzero[class_of_entry, cols],
                                                     dispersion, value_rng)
        indices[nnz:nnz + flat.size] = cols
        indptr[start + 1:stop + 1] = nnz + np.cumsum(np.bincount(rows, minlength=stop - start))
        nnz += flat.size
    data.resize(nnz, refcheck=False)
    indices.resize(nnz, refcheck=False)
    if nnz < 2**31:
        indptr = indptr.astype(np.int32)
    else:
        indices = indices.astype(np.int64)
    counts = sp.csr_matrix((data, indices, indptr), shape=(n_spots, n_genes), copy=False)

    obs = pd.DataFrame(
        {"ground_truth": pd.Categorical.from_codes(domains, categories=[f"domain{d}" for d in range(n_domains)]),
         "library_size": np.exp(library_level * _LOG_LIBRARY_STEP).astype(np.float32)},
        index=pd.Index([f"spot{i}" for i in range(n_spots)]),
    )
    is_domain_gene = np.zeros(n_genes, dtype=bool)
    is_domain_gene[domain_genes] = True
    var = pd.DataFrame({"is_domain_gene": is_domain_gene,
                        "mean_expression": np.exp(base + offset).astype(np.float32),
                        "field_loading": loading.astype(np.float32)},
                       index=pd.Index([f"gene{j}" for j in range(n_genes)]))
    adata = ad.AnnData(X=counts, obs=obs, var=var)
    adata.obsm["spatial"] = locations
    adata.varm["domain_effect"] = effect.T.astype(np.float32)
    if field_lfc > 0:
        adata.obsm["true_field"] = (field_level * _FIELD_STEP)[:, None]
    adata.uns["simulation"] = {
        "seed": seed, "lattice": lattice, "target_density": density, "density": nnz / (n_spots * n_genes),
        "n_domains": n_domains, "n_domain_genes": n_domain_genes, "domain_lfc": domain_lfc,
        "field_lfc": field_lfc, "dispersion": "poisson" if dispersion is None else dispersion,
        "library_sd": library_sd,
    }
    return adata


def _check_large_section_arguments(n_spots: int, n_genes: int, density: float, n_domains: int,
                                   n_domain_genes: int, dispersion: float | None, chunk_size: int) -> None:
    """One-line errors for arguments :func:`simulate_large_section` cannot use."""
    if n_spots < 100:
        raise ValueError(f"n_spots must be at least 100, got {n_spots}")
    if n_genes < 1:
        raise ValueError(f"n_genes must be at least 1, got {n_genes}")
    if not 0 < density < 1:
        raise ValueError(f"density (the target fraction of nonzero counts) must be in (0, 1), got {density}")
    if not 2 <= n_domains <= n_spots // 20:
        raise ValueError(f"n_domains must be between 2 and n_spots / 20 = {n_spots // 20}, got {n_domains}")
    if not 0 <= n_domain_genes <= n_genes:
        raise ValueError(f"n_domain_genes must be between 0 and n_genes = {n_genes}, got {n_domain_genes}")
    if dispersion is not None and dispersion <= 0:
        raise ValueError(f"dispersion must be positive (or None for Poisson counts), got {dispersion}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")


def simulate_many_genes_section(n_spots: int = 400, n_genes: int = 10_000, *, n_domain_genes: int = 300,
                                density: float = 0.3, domain_lfc: float = 2.5, seed: int = 0,
                                **kwargs) -> ad.AnnData:
    """A small section with many genes of which few carry the domains, for gene selection and small-data checks.

    :func:`simulate_large_section` with 10,000 genes of which 300 are domain genes (up ``exp(2.5)``-fold in
    one domain each), and 30 % nonzero counts by default. A domain gene's section-wide mean equals its base mean,
    drawn like every other gene's, so the means of domain and noise genes match and only the spatial structure
    tells them apart: Seurat v3 selection puts about 90 % of the domain genes in its top 500, the top 500 by
    mean under 10 %. Other keyword arguments go to :func:`simulate_large_section`.
    """
    return simulate_large_section(n_spots, n_genes, n_domain_genes=n_domain_genes, density=density,
                                  domain_lfc=domain_lfc, seed=seed, **kwargs)
