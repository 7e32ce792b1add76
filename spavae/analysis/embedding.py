"""A 2-D UMAP of the latent for plotting."""

from __future__ import annotations

import anndata as ad

from spavae.analysis._common import obsm_array


def umap(adata: ad.AnnData, *, use_rep: str = "X_spavae", n_neighbors: int = 15, min_dist: float = 0.5,
         seed: int = 0, key_added: str = "X_umap", copy: bool = False) -> ad.AnnData | None:
    """UMAP (umap-learn) of ``obsm[use_rep]`` written to ``obsm[key_added]``.

    Parameters
    ----------
    adata
        AnnData with the latent in ``obsm[use_rep]``.
    use_rep
        ``obsm`` key of the latent.
    n_neighbors, min_dist
        UMAP settings (scanpy's defaults).
    seed
        UMAP random state (a fixed seed makes it single-threaded and reproducible).
    key_added
        ``obsm`` key of the embedding; the parameters go to ``uns[key_added]['params']``.
    copy
        Work on and return a copy of ``adata``.

    Returns
    -------
    The copy when ``copy=True``, else ``None``.
    """
    from umap import UMAP  # imported here: umap-learn compiles with numba on import (seconds)

    latent = obsm_array(adata, use_rep, hint="the latent; write it with model.write_results(adata)")
    if not 2 <= n_neighbors < adata.n_obs:
        raise ValueError(f"n_neighbors must be between 2 and n_obs - 1 = {adata.n_obs - 1}, got {n_neighbors}")
    adata = adata.copy() if copy else adata
    adata.obsm[key_added] = UMAP(n_neighbors=n_neighbors, min_dist=min_dist, random_state=seed).fit_transform(latent)
    adata.uns[key_added] = {"params": {"use_rep": use_rep, "n_neighbors": n_neighbors, "min_dist": min_dist,
                                       "seed": seed}}
    return adata if copy else None
