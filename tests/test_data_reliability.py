"""The data setup's reliability issue: library sizes of whole transcriptomes, inducing points of several
sections, and highly variable genes ranked within sections."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import spavae
from spavae.data import setup as data_setup
from spavae.data.inducing import split_inducing
from spavae.data.setup import MIN_SECTION_INDUCING, DataSetup, auto_inducing
from test_genes import _sections as _hvg_sections

TINY = {"encoder_layers": (16,), "decoder_layers": (16,), "device": "cpu", "seed": 0}


# ---------------------------------------------------------------------- library sizes over the whole transcriptome
def _located(counts: np.ndarray, seed: int = 0) -> ad.AnnData:
    """Sparse counts with spot names, gene names and uniformly scattered locations."""
    adata = ad.AnnData(sp.csr_matrix(counts, dtype=np.float32))
    adata.obs_names = [f"spot{i}" for i in range(adata.n_obs)]
    adata.var_names = [f"gene{i}" for i in range(adata.n_vars)]
    adata.obsm["spatial"] = np.random.default_rng(seed).uniform(0, 100, (adata.n_obs, 2))
    return adata


def _transcriptome() -> tuple[ad.AnnData, np.ndarray]:
    """150 spots x 400 genes, near-Poisson but for every tenth gene, which is overdispersed (the highly variable
    genes); 3 spots have counts only in the near-Poisson genes."""
    counts, labels = _hvg_sections()
    counts = counts[labels == "s2"]
    only_flat = np.array([5, 50, 100])
    counts[np.ix_(only_flat, np.arange(counts.shape[1]) % 10 == 5)] = 0
    return _located(counts), only_flat


def _totals(adata: ad.AnnData) -> np.ndarray:
    return np.asarray(adata.X.sum(axis=1), dtype=np.float64).ravel()


def _without_counts(adata: ad.AnnData, spot: int) -> ad.AnnData:
    """A copy of ``adata`` in which ``spot`` has no count in any gene."""
    counts = adata.X.toarray()
    counts[spot] = 0
    out = adata.copy()
    out.X = sp.csr_matrix(counts)
    return out


def test_spots_with_counts_only_outside_the_selected_genes_get_library_sizes_over_all_genes():
    adata, only_flat = _transcriptome()
    setup = DataSetup.fit(adata, n_top_genes=20)
    assert _totals(adata[only_flat, setup.genes]).max() == 0  # these spots have no count in the selected genes
    assert setup.library_genes == list(adata.var_names)
    np.testing.assert_allclose(setup.library_median, np.median(_totals(adata)))
    np.testing.assert_allclose(setup.library_sizes(adata), _totals(adata))
    # a spot's library size does not depend on the other spots, nor on the order or extra genes of adata
    shuffled = adata[only_flat[::-1], adata.var_names[::-1]].copy()
    np.testing.assert_allclose(setup.library_sizes(shuffled), _totals(adata)[only_flat[::-1]])
    restored = DataSetup.from_dict(setup.to_dict())
    assert restored.library_genes == setup.library_genes


def test_without_gene_selection_the_library_is_the_model_genes():
    adata, _ = _transcriptome()
    with pytest.warns(UserWarning, match=r"removed \d+ gene"):
        adata = spavae.data.filter_empty(adata)
    setup = DataSetup.fit(adata)
    assert setup.library_genes is None and setup.genes == list(adata.var_names)
    extra = ad.concat([adata, ad.AnnData(sp.csr_matrix(np.ones((adata.n_obs, 2), dtype=np.float32)),
                                         obs=pd.DataFrame(index=adata.obs_names),
                                         var=pd.DataFrame(index=["extra1", "extra2"]))], axis=1)
    np.testing.assert_allclose(setup.library_sizes(extra), _totals(adata))  # extra genes are ignored


def test_library_sizes_need_every_library_gene_and_refuse_spots_without_counts():
    adata, only_flat = _transcriptome()
    setup = DataSetup.fit(adata, n_top_genes=20)
    with pytest.raises(ValueError, match=r"adata lacks 380 of the 400 genes that a spot's library size sums over "
                                         r"\(e.g. \['gene"):
        setup.library_sizes(adata[:, setup.genes].copy())
    empty = _without_counts(adata, only_flat[0])
    with pytest.raises(ValueError, match=r"adata.X: 1 spot\(s\) \(e.g. \['.*'\]\) have zero total count over the "
                                         r"400 genes of their library size; remove them first with "
                                         r"`adata = spavae.data.filter_empty\(adata\)`"):
        setup.library_sizes(empty)
    extra = ad.concat([empty, ad.AnnData(sp.csr_matrix(np.ones((adata.n_obs, 1), dtype=np.float32)),
                                         obs=pd.DataFrame(index=adata.obs_names),
                                         var=pd.DataFrame(index=["extra"]))], axis=1)
    with pytest.raises(ValueError, match=r"have zero total count over the 400 genes of their library size; "
                                         r"remove those spots from adata first$"):
        setup.library_sizes(extra)  # filter_empty would keep the spot (its extra gene has a count)


def test_a_spot_without_any_count_is_still_refused_with_the_filter_empty_advice():
    adata, only_flat = _transcriptome()
    adata = _without_counts(adata, only_flat[0])
    with pytest.raises(ValueError, match=r"adata.X has 1 spot\(s\) and 0 gene\(s\) with zero total count; remove "
                                         r"them first with `adata = spavae.data.filter_empty\(adata\)`"):
        spavae.SpaVAE(adata, n_top_genes=20, **TINY)
    kept = spavae.data.filter_empty(adata)
    assert kept.n_obs == adata.n_obs - 1
    DataSetup.fit(kept, n_top_genes=20)  # the advice works


def test_a_model_trains_on_spots_without_selected_counts_and_keeps_its_library_sizes(tmp_path):
    adata, only_flat = _transcriptome()
    model = spavae.SpaVAE(adata, n_top_genes=20, **TINY).train(max_epochs=2, progress=False)
    latent = model.get_latent_representation()
    assert np.isfinite(latent).all() and np.isfinite(model.history["train_loss"]).all()
    assert np.isfinite(model.get_denoised_counts(n_samples=2)[only_flat]).all()
    np.testing.assert_allclose(model.size_factors, _totals(adata) / np.median(_totals(adata)), rtol=1e-6)
    path = tmp_path / "model.pt"
    model.save(path)
    subset = adata[only_flat].copy()  # a model loaded on a few spots keeps their library sizes
    loaded = spavae.SpaVAE.load(path, subset)
    np.testing.assert_allclose(loaded.size_factors, model.size_factors[only_flat], rtol=1e-6)
    np.testing.assert_allclose(loaded.get_latent_representation(), latent[only_flat], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="genes that a spot's library size sums over"):
        spavae.SpaVAE.load(path, adata[:, model.var_names].copy())


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
