"""Which latent dimensions carry the data: the active units of a trained model.

spaVAE gives every section the same number of latent dimensions (2 GP + 8 Gaussian by default), and its KL weight is
controlled towards a target per dimension. A dimension the data does not need is left at its prior: its posterior
mean is nearly the same for every spot. Counting the others, the *active units* of Burda, Grosse and Salakhutdinov
(2016, "Importance weighted autoencoders": active when the variance across the data of the posterior mean exceeds
0.01), says how large a latent the section used, out of the ceiling the model was given.
"""

from __future__ import annotations

import numpy as np

ACTIVE_VARIANCE = 0.01
"""Variance across spots of a dimension's posterior mean above which it is active (Burda et al. 2016)."""


def active_dimensions(latent: np.ndarray, *, threshold: float = ACTIVE_VARIANCE) -> np.ndarray:
    """Which columns of a latent are active: the variance across spots of the posterior mean above ``threshold``.

    Parameters
    ----------
    latent
        ``n_spots x d`` posterior means (:meth:`~spavae.SpaVAE.get_latent_representation`).
    threshold
        The variance bound (0.01, Burda et al. 2016).

    Returns
    -------
    A boolean array of length ``d``.
    """
    latent = np.asarray(latent, dtype=np.float64)
    if latent.ndim != 2 or len(latent) < 2:
        raise ValueError(f"latent must be n_spots x d with at least 2 spots, got shape {latent.shape}")
    if threshold <= 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    return latent.var(axis=0) > threshold


def count_active(active: np.ndarray, n_gp: int) -> dict[str, int]:
    """How many of the active dimensions (:func:`active_dimensions`) are GP (the first ``n_gp``) and Gaussian."""
    return {"gp": int(active[:n_gp].sum()), "gaussian": int(active[n_gp:].sum())}


def describe_active_dimensions(active: np.ndarray, n_gp: int) -> str:
    """The line ``spavae run`` prints after training: how many GP and Gaussian dimensions are active."""
    gp, gaussian = count_active(active, n_gp).values()
    return (f"latent used: {gp + gaussian} of {len(active)} dimensions active ({gp} of {n_gp} GP, {gaussian} of "
            f"{len(active) - n_gp} Gaussian; the variance across spots of the posterior mean above "
            f"{ACTIVE_VARIANCE}, the others stay at their prior)")
