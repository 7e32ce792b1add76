"""The UMAP tool and the embedding plot (separate: umap-learn compiles with numba, ~15 s on 2 cores)."""

from __future__ import annotations

import numpy as np
import pytest
from anndata import AnnData

from spavae.analysis import umap
from spavae.plot import plot_embedding


def test_umap_writes_a_2d_embedding_that_keeps_clusters_apart(tmp_path):
    rng = np.random.default_rng(0)
    adata = AnnData(np.zeros((90, 1), dtype=np.float32))
    adata.obsm["X_spavae"] = np.concatenate([rng.normal(loc=8 * k, size=(30, 4)) for k in range(3)])
    labels = np.repeat(["a", "b", "c"], 30)
    out = umap(adata, n_neighbors=10, copy=True)
    assert "X_umap" not in adata.obsm
    embedding = out.obsm["X_umap"]
    assert embedding.shape == (90, 2) and out.uns["X_umap"]["params"]["use_rep"] == "X_spavae"
    centres = np.array([embedding[labels == g].mean(0) for g in "abc"])
    spread = max(np.linalg.norm(embedding[labels == g] - c, axis=1).max() for g, c in zip("abc", centres))
    gaps = [np.linalg.norm(centres[i] - centres[j]) for i in range(3) for j in range(i + 1, 3)]
    assert min(gaps) > spread
    plot_embedding(embedding, labels, tmp_path / "umap.png")
    assert (tmp_path / "umap.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(KeyError, match="obsm has no 'X_pca'"):
        umap(adata, use_rep="X_pca")
