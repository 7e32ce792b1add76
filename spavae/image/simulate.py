"""A simulated section with a domain that only the image shows: identical counts, a distinct stain colour.

:func:`simulate_image_domain_section` draws a layered section with :func:`spavae.simulate_spatial_counts`,
gives one domain the expression of its neighbouring layer (so the two are identical in distribution in the
counts) and paints a synthetic H&E-like image in which that domain is stained purple (hematoxylin-rich) while
every other domain has the same pink, in the Space Ranger layout of ``uns['spatial']``.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from spavae.data.simulate import simulate_spatial_counts

LIBRARY_ID = "simulated"
BACKGROUND = (0.94, 0.94, 0.95)
TISSUE = (0.88, 0.60, 0.74)
HIDDEN = (0.66, 0.46, 0.74)
NUCLEUS = (0.35, 0.20, 0.50)
SPOT_FRACTION = 0.55  # Visium: 55 um spots, 100 um apart


def simulate_image_domain_section(
    *,
    n_rows: int = 24,
    n_cols: int = 24,
    n_genes: int = 100,
    n_domains: int = 5,
    hidden_domain: int | None = None,
    spot_spacing: float = 180.0,
    hires_scalef: float = 0.12,
    lowres_scalef: float = 0.04,
    seed: int = 0,
) -> ad.AnnData:
    """Simulate counts and an H&E-like image where one domain is visible only in the image.

    Parameters
    ----------
    n_rows, n_cols, n_genes, n_domains
        As in :func:`spavae.simulate_spatial_counts`.
    hidden_domain
        Index of the domain whose counts copy those of domain ``hidden_domain - 1`` (its neighbouring layer)
        and that is stained differently; default the middle domain.
    spot_spacing
        Distance between neighbouring spot centres in full-resolution pixels; spots are 0.55 of it across.
    hires_scalef, lowres_scalef
        Scale factors of the ``'hires'`` and ``'lowres'`` images (``hires_scalef / lowres_scalef`` must be an
        integer: the lowres image averages blocks of the hires one).
    seed
        Seed of the random generator.

    Returns
    -------
    AnnData with counts in ``.X``; ``obs['ground_truth']`` (all ``n_domains`` domains),
    ``obs['expression_domain']`` (the hidden domain merged into its neighbour) and the Visium array indices
    ``obs['array_row']``, ``obs['array_col']``; ``obsm['spatial']`` in
    full-resolution pixels and ``obsm['spatial_lattice']`` in lattice units; ``layers['true_log_mean']`` and
    ``varm['domain_effect']`` after the merge; ``uns['spatial']['simulated']`` with ``images`` (``'hires'``,
    ``'lowres'``: float32 RGB in [0, 1]) and ``scalefactors``; ``uns['simulation']`` with ``hidden_domain``
    and ``partner_domain``.
    """
    hidden = n_domains // 2 if hidden_domain is None else int(hidden_domain)
    if not 1 <= hidden < n_domains:
        raise ValueError(f"hidden_domain must be in 1..{n_domains - 1} (it copies domain hidden_domain - 1), got "
                         f"{hidden_domain}")
    factor = hires_scalef / lowres_scalef
    if not (lowres_scalef > 0 and factor >= 1 and np.isclose(factor, round(factor))):
        raise ValueError(f"hires_scalef / lowres_scalef must be a positive integer, got {hires_scalef} / "
                         f"{lowres_scalef}")
    adata = simulate_spatial_counts(n_rows=n_rows, n_cols=n_cols, n_genes=n_genes, n_domains=n_domains, seed=seed)
    rng = np.random.default_rng([seed, 1])
    domains = np.array([int(label.removeprefix("domain")) for label in adata.obs["ground_truth"].astype(str)])
    _merge_expression(adata, domains, hidden, rng)

    lattice = adata.obsm["spatial"]
    spots = (lattice - lattice.min(0) + 2.0) * spot_spacing
    adata.obsm["spatial_lattice"] = lattice
    rows = np.round(lattice[:, 1] / np.sqrt(0.75)).astype(int)  # Visium array indices of the hexagonal lattice
    adata.obs["array_row"] = rows - rows.min()
    adata.obs["array_col"] = np.round(2 * lattice[:, 0]).astype(int) - int(np.round(2 * lattice[:, 0]).min())
    adata.obsm["spatial"] = spots
    hires = _paint(spots, domains == hidden, spot_spacing, hires_scalef, rng)
    k = int(round(factor))
    height, width = hires.shape[0] // k * k, hires.shape[1] // k * k
    lowres = hires[:height, :width].reshape(height // k, k, width // k, k, 3).mean((1, 3))
    adata.uns["spatial"] = {LIBRARY_ID: {
        "images": {"hires": hires, "lowres": lowres.astype(np.float32)},
        "scalefactors": {"tissue_hires_scalef": hires_scalef, "tissue_lowres_scalef": lowres_scalef,
                         "spot_diameter_fullres": SPOT_FRACTION * spot_spacing,
                         "fiducial_diameter_fullres": 0.8 * spot_spacing},
        "metadata": {}}}
    adata.uns["simulation"] = {**adata.uns["simulation"], "hidden_domain": hidden, "partner_domain": hidden - 1}
    return adata


def _merge_expression(adata: ad.AnnData, domains: np.ndarray, hidden: int, rng: np.random.Generator) -> None:
    """Give the hidden domain its partner's log fold changes and redraw every spot's counts."""
    partner = hidden - 1
    effect = adata.varm["domain_effect"]
    log_mean = adata.layers["true_log_mean"].astype(np.float64)
    rows = domains == hidden
    log_mean[rows] += effect[:, partner] - effect[:, hidden]
    effect[:, hidden] = effect[:, partner]
    dispersion = adata.uns["simulation"]["dispersion"]
    mu = rng.lognormal(0.0, 0.3, size=adata.n_obs)[:, None] * np.exp(log_mean)
    adata.X = rng.negative_binomial(dispersion, dispersion / (dispersion + mu)).astype(np.float32)
    adata.layers["true_log_mean"] = log_mean.astype(np.float32)
    adata.varm["domain_effect"] = effect
    merged = np.where(rows, partner, domains)
    adata.obs["expression_domain"] = pd.Categorical([f"domain{d}" for d in merged])


def _paint(spots: np.ndarray, hidden: np.ndarray, spacing: float, scalef: float,
           rng: np.random.Generator) -> np.ndarray:
    """The hires image: background off the tissue, pink tissue, purple hidden domain, nuclei and noise."""
    height, width = (int(np.ceil((spots[:, axis].max() + 2 * spacing) * scalef)) for axis in (1, 0))
    rows, cols = np.mgrid[0:height, 0:width]
    pixels = np.column_stack([cols.ravel(), rows.ravel()]) / scalef
    distance, nearest = cKDTree(spots).query(pixels)
    in_tissue = (distance < spacing).reshape(height, width)
    colour = np.where(hidden[nearest][:, None], HIDDEN, TISSUE).reshape(height, width, 3)
    nuclei = in_tissue & (rng.random((height, width)) < 0.05)
    colour[nuclei] = NUCLEUS
    image = np.where(in_tissue[..., None], colour + rng.normal(0, 0.03, colour.shape),
                     np.asarray(BACKGROUND) + rng.normal(0, 0.01, colour.shape))
    return np.clip(image, 0, 1).astype(np.float32)
