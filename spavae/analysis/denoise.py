"""Denoised expression: decoder means under the latent posterior, averaged or as posterior samples (ALGORITHM 7.2).

The decoder mean :math:`\\bar\\mu(z)` is on the **normalised scale** (size factor 1, every spot at the median
library size). ``library_size='observed'`` multiplies it by each spot's size factor, giving counts on the
scale of the observed counts of that spot; ``'normalized'`` returns :math:`\\bar\\mu` itself (the original's
``denoised_counts.txt``). No negative-binomial noise is added: these are expected values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import torch

from spavae.analysis._common import check_same_spots, check_trained
from spavae.train import auto_batch_size

if TYPE_CHECKING:
    from spavae.api import SpaVAE

LIBRARY_SIZES = ("observed", "normalized")


def _spot_positions(spots, n_spots: int) -> np.ndarray:
    """Positions selected by ``spots`` (integer positions or a boolean mask over the model's spots), checked."""
    spots = np.asarray(spots)
    positions = np.flatnonzero(spots) if spots.dtype == bool and spots.shape == (n_spots,) else spots
    if positions.ndim != 1 or positions.dtype.kind not in "iu" or len(positions) == 0 \
            or positions.min() < 0 or positions.max() >= n_spots:
        raise ValueError(f"spots must be a boolean mask of length {n_spots} or integer positions in [0, {n_spots}), "
                         f"selecting at least one spot; got a {spots.dtype} array of shape {spots.shape}")
    return positions


def _check_library_size(library_size: str) -> None:
    if library_size not in LIBRARY_SIZES:
        raise ValueError(f"library_size must be one of {LIBRARY_SIZES}, got {library_size!r}")


def _posterior_samples(model: SpaVAE, *, n_samples: int, spots: np.ndarray | None, library_size: str, mode: str,
                       batch_size: int | None, seed: int) -> np.ndarray:
    check_trained(model)
    _check_library_size(library_size)
    positions = None if spots is None else _spot_positions(spots, len(model.data))
    mean, var = model.latent_posterior(mode=mode, batch_size=batch_size)
    factors, covariates = model.data.size_factors, model.data.covariates
    if positions is not None:
        index = torch.as_tensor(positions, device=mean.device)
        mean, var, factors = mean[index], var[index], factors[index]
        covariates = None if covariates is None else covariates[index]
    out = model.module.decode_posterior(mean, var, covariates=covariates, n_samples=n_samples, average=False,
                                        batch_size=batch_size or auto_batch_size(len(model.data)), seed=seed)
    if library_size == "observed":
        out = out * factors.to(out.dtype)[:, None]
    return out.cpu().numpy()


def denoised_samples(model: SpaVAE, *, n_samples: int = 10, spots: np.ndarray | None = None,
                     library_size: str = "observed", mode: str = "full", batch_size: int | None = None,
                     seed: int = 0) -> np.ndarray:
    """Posterior samples of the expected expression of training spots: one decoder mean per latent draw.

    Parameters
    ----------
    model
        A trained :class:`~spavae.SpaVAE`.
    n_samples
        Draws per spot.
    spots
        Integer positions or a boolean mask of the training spots to sample (all by default).
    library_size
        ``'observed'`` (times each spot's size factor) or ``'normalized'`` (size factor 1).
    mode
        Latent posterior of :meth:`~spavae.SpaVAE.latent_posterior` (``'full'`` exact, ``'chunked'`` original).
    batch_size
        Spots decoded at once (the ``'auto'`` batch-size rule by default).
    seed
        Seed of the latent draws.

    Returns
    -------
    Array of shape ``n_samples x n_spots x n_genes``.
    """
    return _posterior_samples(model, n_samples=n_samples, spots=spots, library_size=library_size, mode=mode,
                              batch_size=batch_size, seed=seed)


def denoise(adata: ad.AnnData, model: SpaVAE, *, n_samples: int = 25, library_size: str = "observed",
            mode: str = "full", key_added: str = "spavae_denoised", batch_size: int | None = None, seed: int = 0,
            copy: bool = False) -> ad.AnnData | None:
    """Write denoised expression (the posterior mean of the decoder mean) to ``adata.layers[key_added]``.

    When ``adata`` has genes the model never saw, the values of the model's genes go to ``adata.obsm[key_added]``
    instead, with the gene names in ``adata.uns[key_added]['denoised_genes']`` (see
    :meth:`~spavae.SpaVAE.store_denoised`): no gene gets values the model did not predict.

    Parameters
    ----------
    adata
        The AnnData the model was trained on (same spots, same order; it may hold more genes).
    model
        A trained :class:`~spavae.SpaVAE`.
    n_samples
        Latent draws averaged per spot (25, as in the original scripts).
    library_size
        ``'observed'``: counts at each spot's observed library size (the default, comparable with ``.X``);
        ``'normalized'``: the normalised scale of the original (every spot at the median library size).
    mode
        ``'full'`` (exact sparse-GP posterior given all spots) or ``'chunked'`` (the original's per-chunk one).
    key_added
        Layer name; the parameters go to ``adata.uns[key_added]['params']``.
    batch_size
        Spots decoded at once.
    seed
        Seed of the latent draws.
    copy
        Work on and return a copy of ``adata``.

    Returns
    -------
    The copy when ``copy=True``, else ``None``.
    """
    check_same_spots(adata, model)
    adata = adata.copy() if copy else adata
    _check_library_size(library_size)
    denoised = model.get_denoised_counts(n_samples=n_samples, library_size=library_size, mode=mode,
                                         batch_size=batch_size, seed=seed)
    genes = model.store_denoised(adata, denoised, key_added)
    adata.uns[key_added] = {"params": {"n_samples": n_samples, "library_size": library_size, "mode": mode,
                                       "seed": seed}} | ({} if genes is None else {"denoised_genes": genes})
    return adata if copy else None
