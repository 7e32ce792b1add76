"""The data setup's reliability issue: inducing points of several sections, and highly variable genes ranked
within sections."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from spavae.data import setup as data_setup
from spavae.data.inducing import split_inducing
from spavae.data.setup import MIN_SECTION_INDUCING, DataSetup, auto_inducing
from test_genes import _sections as _hvg_sections


def _located(counts: np.ndarray, seed: int = 0) -> ad.AnnData:
    """Sparse counts with spot names, gene names and uniformly scattered locations."""
    adata = ad.AnnData(sp.csr_matrix(counts, dtype=np.float32))
    adata.obs_names = [f"spot{i}" for i in range(adata.n_obs)]
    adata.var_names = [f"gene{i}" for i in range(adata.n_vars)]
    adata.obsm["spatial"] = np.random.default_rng(seed).uniform(0, 100, (adata.n_obs, 2))
    return adata


# ---------------------------------------------------------------------- inducing points of several sections
def _sections(sizes: list[int], seed: int = 0) -> ad.AnnData:
    """Sections of uniformly scattered spots (5 genes with counts), ``obs['section']`` naming them."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    adata = ad.AnnData(sp.csr_matrix(rng.poisson(1.0, (n, 5)).astype(np.float32) + 1))
    adata.obs_names = [f"spot{i}" for i in range(n)]
    adata.obs["section"] = np.repeat([f"s{i:02d}" for i in range(len(sizes))], sizes)
    adata.obsm["spatial"] = rng.uniform(0, 100, (n, 2))
    return adata


def _per_section(setup: DataSetup) -> np.ndarray:
    return setup.inducing_points[:, 2:].sum(axis=0)


def test_kmeans_inducing_points_of_many_sections_follow_the_budget_of_one_section(monkeypatch):
    monkeypatch.setattr(data_setup, "GRID_MAX_SPOTS", 1_000)  # k-means from 1,000 spots on, to keep the test fast
    adata = _sections([300] * 8)
    setup = DataSetup.fit(adata, batch_key="section")
    method, budget = auto_inducing(adata.n_obs)
    assert method == "kmeans" and len(setup.inducing_points) == budget == 49
    np.testing.assert_array_equal(np.sort(_per_section(setup)), [6] * 7 + [7])


def test_a_tiny_section_among_big_ones_gets_the_minimum_and_no_error(monkeypatch):
    monkeypatch.setattr(data_setup, "GRID_MAX_SPOTS", 1_000)
    adata = _sections([1_200, 800, 30])
    setup = DataSetup.fit(adata, batch_key="section")
    assert len(setup.inducing_points) == 49
    np.testing.assert_array_equal(_per_section(setup), [27, 18, MIN_SECTION_INDUCING])


def test_a_given_n_inducing_is_the_total_of_all_sections():
    adata = _sections([200, 100])
    setup = DataSetup.fit(adata, batch_key="section", inducing="kmeans", n_inducing=30)
    np.testing.assert_array_equal(_per_section(setup), [20, 10])
    with pytest.raises(ValueError, match=r"n_inducing must be an integer between 1 and the number of spots \(300\), "
                                         r"got 301"):
        DataSetup.fit(adata, batch_key="section", inducing="kmeans", n_inducing=301)
    with pytest.raises(ValueError, match=r"n_inducing=1 is fewer than the 2 sections; give at least one inducing "
                                         r"point per section \(n_inducing >= 2\)"):
        DataSetup.fit(adata, batch_key="section", inducing="kmeans", n_inducing=1)
    setup = DataSetup.fit(adata, batch_key="section", inducing="kmeans", n_inducing=2)  # the user's choice is kept
    np.testing.assert_array_equal(_per_section(setup), [1, 1])


def test_split_inducing_is_proportional_with_a_floor():
    np.testing.assert_array_equal(split_inducing([3_000] * 40, 240, [4] * 40), [6] * 40)
    np.testing.assert_array_equal(split_inducing([600, 300, 100], 10, [1, 1, 1]), [6, 3, 1])
    np.testing.assert_array_equal(split_inducing([1_000, 10, 10], 20, [4, 4, 3]), [13, 4, 3])
    assert split_inducing([250] * 100, 50, [4] * 100).tolist() == [4] * 100  # the floors exceed the budget
    assert split_inducing([5, 7, 11], 23, [4, 4, 4]).tolist() == [5, 7, 11]


# ---------------------------------------------------------------------- highly variable genes within sections
def test_gene_selection_ranks_genes_within_each_section():
    """Gene 0 is flat within each of three sections, at 1 count in one and 8 in the others."""
    counts, labels = _hvg_sections()
    adata = _located(counts)
    adata.obs["section"] = labels
    pooled = DataSetup.fit(adata, n_top_genes=30)
    assert "gene0" in pooled.genes  # pooling the sections, the shift looks like variability
    setup = DataSetup.fit(adata, batch_key="section", n_top_genes=30)
    assert "gene0" not in setup.genes and len(setup.genes) == 30
    assert setup.gene_selection == {"flavor": "seurat_v3", "n_top_genes": 30, "n_input_genes": 400,
                                    "batch_key": "section"}
