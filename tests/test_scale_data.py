"""The fitted data setup, sparse and streaming data, and the training budget (atlas-scale issue)."""

from __future__ import annotations

import tracemalloc

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import spavae
from spavae.analysis import enhance, predict
from spavae.data import setup as data_setup
from spavae.data.inducing import grid_inducing_points
from spavae.data.setup import DataSetup, auto_grid_steps, auto_inducing
from spavae.train import split_indices

FAST = {"max_epochs": 4, "progress": False}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model trained on a simulated section, saved to disk."""
    adata = spavae.simulate_spatial_counts(n_rows=14, n_cols=14, n_genes=40, n_domains=3, seed=3)
    model = spavae.SpaVAE(adata, seed=0, encoder_layers=(32, 16), decoder_layers=(32,))
    model.train(**FAST)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    model.save(path)
    return adata, model, path


def test_load_on_half_of_the_spots_in_another_order_gives_the_full_data_results(trained):
    adata, model, path = trained
    rng = np.random.default_rng(0)
    half = rng.permutation(adata.n_obs)[: adata.n_obs // 2]  # a random half, in a shuffled order
    subset = adata[half].copy()
    loaded = spavae.SpaVAE.load(path, subset)
    np.testing.assert_allclose(loaded.get_latent_representation(), model.get_latent_representation()[half],
                               rtol=1e-5, atol=1e-6)
    full_denoised = model.get_denoised_counts(n_samples=3, batch_size=1000)
    np.testing.assert_allclose(loaded.get_denoised_counts(n_samples=3, batch_size=1000), full_denoised[half],
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(loaded.data.scaled_locations, model.data.scaled_locations[half])
    np.testing.assert_allclose(loaded.data.size_factors.numpy(), model.data.size_factors.numpy()[half], rtol=1e-6)
    new_locations = adata.obsm["spatial"][:5] + 0.3
    np.testing.assert_allclose(predict(loaded, new_locations).obsm["X_spavae"][:, :2],
                               predict(model, new_locations).obsm["X_spavae"][:, :2], rtol=1e-5, atol=1e-6)


def test_load_with_reordered_extra_or_missing_genes(trained):
    adata, model, path = trained
    genes = list(adata.var_names)
    reordered = adata[:, genes[::-1]].copy()
    reordered.var_names = genes[::-1]
    np.testing.assert_allclose(spavae.SpaVAE.load(path, reordered).get_latent_representation(),
                               model.get_latent_representation(), rtol=1e-5, atol=1e-6)
    extra = ad.concat([adata, ad.AnnData(np.ones((adata.n_obs, 2), dtype=np.float32),
                                         obs=pd.DataFrame(index=adata.obs_names),
                                         var=pd.DataFrame(index=["extra1", "extra2"]))], axis=1)
    extra.obsm["spatial"] = adata.obsm["spatial"]
    np.testing.assert_allclose(spavae.SpaVAE.load(path, extra).get_latent_representation(),
                               model.get_latent_representation(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"lacks 2 of the model's 40 genes.*gene0"):
        spavae.SpaVAE.load(path, adata[:, genes[2:]].copy())


def test_setup_travels_with_the_model_file(trained):
    adata, model, path = trained
    payload = torch.load(path, weights_only=False)
    saved = DataSetup.from_dict(payload["setup"])
    assert saved.genes == list(adata.var_names)
    np.testing.assert_array_equal(saved.expression_mean, model.setup.expression_mean)
    np.testing.assert_array_equal(saved.inducing_points, model.setup.inducing_points)
    # the statistics are those of the training spots (independent recomputation)
    counts = (adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)).astype(np.float64)
    totals = counts.sum(1)
    logged = np.log1p(counts / (totals / np.median(totals))[:, None])
    np.testing.assert_allclose(saved.library_median, np.median(totals))
    np.testing.assert_allclose(saved.expression_mean, logged.mean(0), rtol=1e-10)
    np.testing.assert_allclose(saved.expression_sd, logged.std(0, ddof=1), rtol=1e-8)


def _sparse_section(n_spots: int, n_genes: int, density: float = 0.05, seed: int = 0) -> ad.AnnData:
    """Poisson counts with two planted halves, built sparse (no dense N x G array)."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n_spots)))
    locations = np.column_stack([np.arange(n_spots) % side, np.arange(n_spots) // side]).astype(float)
    nnz_per_row = np.minimum(rng.binomial(n_genes, density, size=n_spots) + 1, n_genes // 2)
    indptr = np.concatenate([[0], np.cumsum(nnz_per_row)])
    left = locations[:, 0] < side / 2
    indices = np.concatenate([np.sort(rng.choice(n_genes // 2 if is_left else n_genes, k, replace=False))
                              for k, is_left in zip(nnz_per_row, left)]).astype(np.int32)
    data = rng.poisson(2.0, size=len(indices)).astype(np.float32) + 1
    adata = ad.AnnData(sp.csr_matrix((data, indices, indptr), shape=(n_spots, n_genes)))
    adata.obsm["spatial"] = locations
    adata.obs["ground_truth"] = pd.Categorical(np.where(left, "left", "right"))
    return spavae.data.filter_empty(adata) if (np.asarray(adata.X.sum(0)).ravel() == 0).any() else adata


def test_sparse_dense_and_backed_input_train_the_same_model(tmp_path):
    adata = _sparse_section(400, 60, density=0.2)
    dense = adata.copy()
    dense.X = adata.X.toarray()
    path = tmp_path / "section.h5ad"
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    histories = []
    for data in (adata, dense, backed):
        model = spavae.SpaVAE(data, seed=0, encoder_layers=(16,), decoder_layers=(16,))
        model.train(max_epochs=3, progress=False)
        histories.append(model.history.drop(columns="seconds").to_numpy())
    assert backed.isbacked
    np.testing.assert_allclose(histories[1], histories[0], rtol=1e-6)
    np.testing.assert_allclose(histories[2], histories[0], rtol=1e-6)


def test_batches_carry_the_positions_of_their_nonzero_counts(tmp_path):
    """The positions read off the sparse rows are those of the dense batch, whatever the input's storage (explicit
    zeros and duplicated entries included) and the order of the spots."""
    adata = _sparse_section(200, 30, density=0.3)
    messy = adata.X.tocoo()
    half = messy.nnz // 2  # half the entries stored twice (once as a zero), and an explicit zero
    rows = np.concatenate([messy.row, messy.row[:half], [0]])
    cols = np.concatenate([messy.col, messy.col[:half], [int(np.setdiff1d(np.arange(30), messy.col[messy.row == 0])[0])]])
    data = np.concatenate([messy.data, np.zeros(half), [0.0]])
    untidy = sp.csr_matrix((data.astype(np.float32), (rows, cols)), shape=adata.shape)
    untidy.has_canonical_format = False
    adata.X = untidy
    path = tmp_path / "section.h5ad"
    adata.write_h5ad(path)
    order = np.random.default_rng(0).permutation(adata.n_obs)[:64]
    for data in (adata, ad.read_h5ad(path, backed="r")):
        batch = spavae.SpaVAE(data, seed=0).data.batch(order)
        expected = batch.counts.reshape(-1).nonzero().squeeze(1)
        np.testing.assert_array_equal(np.sort(batch.gene_nonzero.numpy()), expected.numpy())


def test_the_training_loss_uses_the_batch_nonzero_positions(monkeypatch):
    """The NB term of a training step scores the very counts whose positions the batch carries (no dense search)."""
    from spavae.likelihoods import GeneNegativeBinomial

    model = spavae.SpaVAE(_sparse_section(120, 20, density=0.3), seed=0, encoder_layers=(8,), decoder_layers=(8,))
    searched = []
    original = GeneNegativeBinomial._nonzero_positions

    def recording(self, value):
        searched.append(self.observed_nonzero is None or value is not self.observed_nonzero[0])
        return original(self, value)

    monkeypatch.setattr(GeneNegativeBinomial, "_nonzero_positions", recording)
    batch = model.data.batch(np.arange(64))
    loss = model.module.loss(batch, 1.0).loss
    assert searched == [False] and torch.isfinite(loss)


def test_editing_adata_after_building_does_not_change_the_model():
    adata = _sparse_section(300, 40, density=0.3)
    dense = adata.copy()
    dense.X = np.asarray(adata.X.toarray(), dtype=np.float32)
    model = spavae.SpaVAE(dense, seed=0)
    before = model.data.batch(np.arange(10)).counts.clone()
    dense.X[:10] = 0.0
    np.testing.assert_array_equal(model.data.batch(np.arange(10)).counts.numpy(), before.numpy())


def test_no_dense_copy_on_the_training_path():
    """Building and training on 20,000 x 2,000 (5 % non-zero) never allocates an N x G array: the traced peak
    stays below a quarter of one float32 dense copy (160 MB)."""
    adata = _sparse_section(20_000, 2_000, density=0.05)
    dense_bytes = adata.n_obs * adata.n_vars * 4
    tracemalloc.start()
    try:
        model = spavae.SpaVAE(adata, seed=0)
        model.train(max_epochs=1, max_steps=3, progress=False)
        model.get_latent_representation()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert model.data.nbytes < 0.15 * dense_bytes
    assert peak < dense_bytes / 4, f"traced peak {peak / 2**20:.0f} MB"


def test_step_budget_epoch_cap_and_validation_cap(monkeypatch):
    adata = _sparse_section(600, 30, density=0.3)
    monkeypatch.setattr("spavae.train.MAX_STEPS_PER_EPOCH", 2)
    model = spavae.SpaVAE(adata, seed=0, encoder_layers=(16,), decoder_layers=(16,))
    model.train(max_epochs=50, max_steps=7, batch_size=64, progress=False)
    assert model.history["step"].tolist() == [2, 4, 6, 7]
    assert model.trainer.state.stop_reason.startswith("step budget of 7 steps")
    train, val = split_indices(10_000, 0.95, torch.Generator().manual_seed(0), max_validation=300)
    assert (len(train), len(val)) == (9_700, 300)
    assert len(set(train.tolist()) | set(val.tolist())) == 10_000


def test_a_small_section_gets_the_minimum_steps_per_epoch(monkeypatch):
    """57 training spots at batch 32 make one batch per pass; an epoch still takes MIN_STEPS_PER_EPOCH steps, each
    a full batch of distinct spots from a fresh shuffle."""
    from spavae.train import MIN_STEPS_PER_EPOCH

    adata = _sparse_section(60, 30, density=0.3)
    model = spavae.SpaVAE(adata, seed=0, encoder_layers=(16,), decoder_layers=(16,))
    seen = []
    original = model.data.batch
    monkeypatch.setattr(model.data, "batch", lambda index: seen.append(np.array(index)) or original(index))
    model.train(max_epochs=2, batch_size=32, progress=False)
    assert model.history["step"].tolist() == [MIN_STEPS_PER_EPOCH, 2 * MIN_STEPS_PER_EPOCH]
    training = [index for index in seen if len(index) == 32]
    assert len(training) == 2 * MIN_STEPS_PER_EPOCH
    assert all(len(set(index.tolist())) == 32 for index in training)
    assert set(np.concatenate(training).tolist()) <= set(model.trainer.train_index.tolist())
    assert len({tuple(index.tolist()) for index in training}) == len(training)  # reshuffled every pass


def test_auto_inducing_rule_and_points_follow_the_tissue():
    assert auto_inducing(4_000) == ("grid", 49)
    assert auto_inducing(100_000) == ("kmeans", 200)
    assert auto_inducing(5_000_000) == ("kmeans", 300)
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 1, (3_000, 2))
    points = points[(points[:, 0] < 0.3) | (points[:, 1] < 0.3)]  # an L-shaped tissue
    adata = ad.AnnData(sp.csr_matrix(rng.poisson(1.0, (len(points), 5)).astype(np.float32) + 1))
    adata.obsm["spatial"] = points
    setup = DataSetup.fit(adata, inducing="kmeans", n_inducing=30)
    scaled = setup.scale_locations(points)
    from scipy.spatial import cKDTree

    distance, _ = cKDTree(scaled).query(setup.inducing_points)
    assert setup.inducing_points.shape == (30, 2)
    assert distance.max() < 1.0  # every point sits in the tissue (the L's empty corner is 14 x 14 units)


def test_a_small_section_gets_a_13_by_13_grid_and_each_section_its_own_by_its_spots():
    assert (auto_grid_steps(200), auto_grid_steps(2000), auto_grid_steps(2001), auto_grid_steps(4000)) == (12, 12, 6, 6)
    small = spavae.simulate_spatial_counts(n_rows=20, n_cols=20, n_genes=60, seed=0)  # 400 spots, a square
    large = spavae.simulate_spatial_counts(n_rows=48, n_cols=48, n_genes=60, seed=0)  # 2,304 spots
    counts = []
    for adata, options, steps in ((small, {}, 12), (large, {}, 6), (small, {"inducing_steps": 6}, 6)):
        setup = DataSetup.fit(adata, **options)
        np.testing.assert_array_equal(setup.inducing_points, grid_inducing_points(steps, setup.frames[0].extent))
        counts.append(len(setup.inducing_points))
    assert abs(counts[0] - 169) <= 13 and abs(counts[1] - 49) <= 7  # about (steps + 1)^2
    small.obs["section"], large.obs["section"] = "small", "large"
    small.obs_names, large.obs_names = [f"s{i}" for i in range(small.n_obs)], [f"l{i}" for i in range(large.n_obs)]
    both = DataSetup.fit(ad.concat([small, large]), batch_key="section")
    per_section = both.inducing_points[:, 2:].sum(0)  # one-hot section columns; sections are sorted: large, small
    assert per_section.tolist() == [counts[1], counts[0]]


def test_whole_transcriptome_input_is_reduced_to_highly_variable_genes(monkeypatch):
    monkeypatch.setattr(data_setup, "AUTO_GENES_THRESHOLD", 50)
    monkeypatch.setattr(data_setup, "AUTO_TOP_GENES", 20)
    adata = spavae.simulate_spatial_counts(n_rows=10, n_cols=10, n_genes=80, seed=0)
    model = spavae.SpaVAE(adata, seed=0)
    assert len(model.var_names) == 20 and model.setup.gene_selection["n_input_genes"] == 80
    assert model.summary()["gene_selection"]["n_top_genes"] == 20
    assert len(spavae.SpaVAE(adata, seed=0, n_top_genes=None).var_names) == 80


def test_denoised_layer_streams_to_disk_and_gene_subsets(trained, tmp_path):
    adata, model, _ = trained
    full = model.get_denoised_counts(n_samples=2, batch_size=64)
    path = model.write_denoised(tmp_path / "denoised.h5ad", n_samples=2, batch_size=64)
    on_disk = ad.read_h5ad(path)
    np.testing.assert_allclose(on_disk.layers["spavae_denoised"], full, rtol=1e-6)
    assert list(on_disk.var_names) == list(model.var_names)
    genes = [model.var_names[5], model.var_names[1]]
    np.testing.assert_allclose(model.get_denoised_counts(n_samples=2, batch_size=64, genes=genes), full[:, [5, 1]],
                               rtol=1e-6)
    with pytest.raises(FileExistsError):
        model.write_denoised(path)


def test_multi_section_prediction_and_enhancement():
    from spavae.data.simulate import simulate_sections

    adata = simulate_sections(n_sections=2, n_rows=10, n_cols=10, n_genes=30, seed=0)
    model = spavae.SpaVAE(adata, batch_key="section", seed=0, encoder_layers=(16,), decoder_layers=(16,))
    model.train(max_epochs=2, progress=False)
    sections = adata.obs["section"].astype(str).to_numpy()
    out = predict(model, adata.obsm["spatial"][:6], sections=sections[:6])
    assert out.n_obs == 6 and list(out.obs["section"]) == list(sections[:6])
    # the nearest spot comes from the same section
    nearest_sections = adata.obs.loc[out.obs["nearest_spot"].astype(str), "section"].astype(str).to_numpy()
    np.testing.assert_array_equal(nearest_sections, sections[:6])
    with pytest.raises(ValueError, match="give the section of each spot"):
        predict(model, adata.obsm["spatial"][:3])
    assert enhance(model, n_samples=2).n_obs == 5 * adata.n_obs


def test_morans_i_in_gene_blocks_equals_the_whole_matrix(monkeypatch):
    from spavae.analysis import spatial_stats

    adata = _sparse_section(300, 40, density=0.3)
    whole = spatial_stats.spatial_autocorr(adata, copy=True).var["morans_i"].to_numpy()
    monkeypatch.setattr(spatial_stats, "_gene_block", lambda n_spots: 7)
    blocked = spatial_stats.spatial_autocorr(adata, copy=True).var["morans_i"].to_numpy()
    np.testing.assert_allclose(blocked, whole, rtol=1e-12)
    counts = adata.X.toarray().astype(np.float64)
    totals = counts.sum(1)
    logged = np.log1p(counts / (totals / np.median(totals))[:, None])
    weights = spatial_stats.knn_weights(adata.obsm["spatial"], 5)
    np.testing.assert_allclose(whole, spatial_stats.morans_i(logged, weights), rtol=1e-12)


def test_prediction_of_a_gene_subset_equals_those_columns_of_the_full_prediction(trained):
    adata, model, _ = trained
    locations = adata.obsm["spatial"][:7] + 0.25
    genes = [model.var_names[3], model.var_names[0]]
    full = predict(model, locations, n_samples=3, batch_size=4)
    subset = predict(model, locations, n_samples=3, genes=genes, batch_size=4)
    assert list(subset.var_names) == genes
    np.testing.assert_allclose(subset.X, full.X[:, [3, 0]], rtol=1e-6)
    assert enhance(model, n_samples=2, genes=genes).shape == (5 * adata.n_obs, 2)


def test_cli_predict_and_enhance_for_a_multi_section_model(tmp_path):
    from spavae.cli import main
    from spavae.data.simulate import simulate_sections

    adata = simulate_sections(n_sections=2, n_rows=8, n_cols=8, n_genes=20, seed=1)
    model = spavae.SpaVAE(adata, batch_key="section", seed=0, encoder_layers=(16,), decoder_layers=(16,))
    model.train(max_epochs=2, progress=False)
    model.save(tmp_path / "model.pt")
    adata.write_h5ad(tmp_path / "results.h5ad")
    sections = adata.obs["section"].astype(str).to_numpy()
    table = pd.DataFrame({"x": adata.obsm["spatial"][:4, 0] + 0.2, "y": adata.obsm["spatial"][:4, 1],
                          "section": sections[[0, 1, -2, -1]]})
    table.to_csv(tmp_path / "new.csv", index=False)
    source = [str(tmp_path / "results.h5ad"), "--model", str(tmp_path / "model.pt")]
    assert main(["predict", *source, str(tmp_path / "new.csv"), "--out", str(tmp_path / "p"), "--n-samples", "2"]) == 0
    written = pd.read_csv(tmp_path / "p" / "predictions.csv")
    assert len(written) == 4
    nearest_sections = adata.obs.loc[written["nearest_spot"].astype(str), "section"].astype(str).to_numpy()
    np.testing.assert_array_equal(nearest_sections, table["section"].to_numpy())
    table.drop(columns="section").to_csv(tmp_path / "bare.csv", index=False)
    assert main(["predict", *source, str(tmp_path / "bare.csv"), "--out", str(tmp_path / "q")]) == 2
    assert main(["enhance", *source, "--out", str(tmp_path / "e"), "--n-samples", "2"]) == 0
    assert ad.read_h5ad(tmp_path / "e" / "enhanced.h5ad").n_obs == 5 * adata.n_obs
