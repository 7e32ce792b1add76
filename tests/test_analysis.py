"""Downstream analyses on a small simulated section: keys, shapes, geometry and planted answers."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial import cKDTree
from sklearn.metrics import roc_auc_score

import spavae
from spavae import analysis
from spavae.analysis import (
    denoise,
    denoised_samples,
    differential_expression,
    enhance,
    enhancement_locations,
    find_domains,
    knn_weights,
    leiden_n_domains,
    lfc_threshold,
    morans_i,
    predict,
    predict_latent,
    rank_genes_domains,
    spatial_autocorr,
)
from spavae.data.simulate import hex_grid
from spavae.plot import plot_gene_spatial, plot_volcano

N_DOMAINS = 3


@pytest.fixture(scope="session")
def fitted():
    """A model trained on 90% of a simulated section; the other 10% are held out for prediction."""
    torch.set_num_threads(2)
    full = spavae.simulate_spatial_counts(n_rows=16, n_cols=16, n_genes=60, n_domains=N_DOMAINS, marker_lfc=1.0,
                                          field_lfc=0.25, mean_count=2.0, seed=3)
    held_out = np.sort(np.random.default_rng(0).permutation(full.n_obs)[:26])
    adata = full[np.setdiff1d(np.arange(full.n_obs), held_out)].copy()
    model = spavae.SpaVAE(adata, device="cpu", encoder_layers=(32, 16), decoder_layers=(32,), seed=0)
    model.train(max_epochs=60, lr=3e-2, batch_size=64, progress=False)
    model.write_results(adata, denoise=False)
    return full, held_out, adata, model


def correlation_per_gene(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(0), b - b.mean(0)
    return float(np.mean((a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))))


# ------------------------------------------------------------------ denoising
def test_denoise_writes_a_layer_on_the_documented_scale(fitted):
    _, _, adata, model = fitted
    out = denoise(adata, model, n_samples=5, seed=1, copy=True)
    assert "spavae_denoised" not in adata.layers  # copy=True leaves the input alone
    observed = out.layers["spavae_denoised"]
    assert observed.shape == adata.shape and (observed > 0).all()
    assert out.uns["spavae_denoised"]["params"]["library_size"] == "observed"
    denoise(out, model, n_samples=5, seed=1, library_size="normalized", key_added="norm")
    np.testing.assert_allclose(observed, out.layers["norm"] * model.size_factors[:, None], rtol=1e-5)
    # at the observed library size the totals follow the observed totals
    totals = np.asarray(adata.X.sum(1)).ravel()
    assert np.corrcoef(observed.sum(1), totals)[0, 1] > 0.9


def test_denoised_samples_are_posterior_draws(fitted):
    _, _, adata, model = fitted
    draws = denoised_samples(model, n_samples=4, spots=np.arange(10), seed=0)
    assert draws.shape == (4, 10, adata.n_vars)
    assert not np.allclose(draws[0], draws[1])  # different latent draws
    mask = np.zeros(adata.n_obs, bool)
    mask[:10] = True
    np.testing.assert_array_equal(denoised_samples(model, n_samples=4, spots=mask, seed=0), draws)
    with pytest.raises(ValueError, match="library_size must be one of"):
        denoised_samples(model, library_size="raw")


def test_denoise_refuses_another_anndata(fitted):
    full, _, _, model = fitted
    with pytest.raises(ValueError, match="does not hold the spots of the model"):
        denoise(full, model)


# ------------------------------------------------------------------ domains
def test_find_domains_kmeans_with_refinement_and_scores(fitted):
    _, _, adata, _ = fitted
    out = find_domains(adata, N_DOMAINS, refine="hexagon", truth_key="ground_truth", copy=True)
    labels = out.obs["spavae_domains"]
    assert isinstance(labels.dtype, pd.CategoricalDtype) and labels.nunique() == N_DOMAINS
    assert "spavae_domains_unrefined" in out.obs
    scores = out.uns["spavae_domains"]["scores"]
    assert set(scores) == {"spavae_domains", "spavae_domains_unrefined"}
    assert scores["spavae_domains"]["ari"] > 0.3, scores  # the latent separates the planted domains
    assert out.uns["spavae_domains"]["params"]["refine"] == "hexagon"


@pytest.mark.parametrize("n_domains", [3, 5])
def test_leiden_hits_the_requested_number_of_domains(fitted, n_domains):
    _, _, adata, _ = fitted
    out = find_domains(adata, n_domains, method="leiden", truth_key="ground_truth", copy=True)
    assert out.obs["spavae_domains"].nunique() == n_domains
    assert out.uns["spavae_domains"]["resolution"] > 0


def test_leiden_search_on_separated_blobs():
    rng = np.random.default_rng(0)
    latent = np.concatenate([rng.normal(loc=10 * k, size=(40, 3)) for k in range(4)])
    labels, resolution, _ = leiden_n_domains(latent, 4, n_neighbors=10)
    truth = np.repeat(np.arange(4), 40)
    assert len(set(labels)) == 4 and resolution > 0
    assert pd.crosstab(labels, truth).max(axis=1).sum() == len(truth)  # each cluster is one blob


def test_find_domains_errors(fitted):
    _, _, adata, _ = fitted
    with pytest.raises(KeyError, match="obsm has no 'X_other'.*write_results"):
        find_domains(adata, 3, use_rep="X_other")
    with pytest.raises(ValueError, match="method must be one of"):
        find_domains(adata, 3, method="louvain")
    with pytest.raises(KeyError, match="obs has no column 'labels'"):
        find_domains(adata, 3, truth_key="labels")


# ------------------------------------------------------------------ differential expression
def test_de_finds_the_planted_markers(fitted):
    _, _, adata, model = fitted
    table = differential_expression(adata, model, groupby="ground_truth", group1="domain0", group2="domain1",
                                    n_draws=2000)
    effect = adata.varm["domain_effect"]
    up = (effect[:, 0] > 0) & (effect[:, 1] == 0)  # planted up in domain0, not in domain1
    down = (effect[:, 1] > 0) & (effect[:, 0] == 0)
    assert roc_auc_score(up, table["LFC"]) > 0.75  # 0.5 for random LFCs, below 0.5 for flipped signs
    assert roc_auc_score(down, -table["LFC"]) > 0.75
    assert up[adata.var_names.get_loc(table["LFC"].idxmax())]
    assert table.loc[up, "prob_DE"].mean() > table.loc[~up & ~down, "prob_DE"].mean() + 0.2


def test_de_table_follows_the_definitions(fitted):
    _, _, adata, model = fitted
    table = differential_expression(adata, model, groupby="ground_truth", group1="domain2", n_draws=500)
    assert list(table.columns) == analysis.differential.COLUMNS and table.index.name == "gene"
    attrs = table.attrs
    assert attrs["delta"] >= 0.3 and 0.05 <= attrs["pseudocount"] <= 0.5 and attrs["group2"] == "rest"
    assert attrs["n_spots1"] + attrs["n_spots2"] == adata.n_obs
    np.testing.assert_allclose(table["prob_DE"] + table["prob_not_DE"], 1.0)
    np.testing.assert_allclose(table["bayes_factor"],
                               np.log(table["prob_DE"] + 1e-10) - np.log(table["prob_not_DE"] + 1e-10))
    eps = attrs["pseudocount"]
    np.testing.assert_allclose(table["LFC"], np.log2(table["denoised_mean1"] + eps)
                               - np.log2(table["denoised_mean2"] + eps), rtol=1e-6, atol=1e-8)
    mask = (adata.obs["ground_truth"] == "domain2").to_numpy()
    normalized = np.asarray(adata.X) / model.size_factors[:, None]
    np.testing.assert_allclose(table["raw_mean1"], normalized[mask].mean(0), rtol=1e-5)
    again = differential_expression(adata, model, groupby="ground_truth", group1="domain2", n_draws=500)
    pd.testing.assert_frame_equal(table, again)  # seeded


def test_lfc_threshold_floor_and_mixture():
    rng = np.random.default_rng(0)
    assert lfc_threshold(rng.normal(scale=0.01, size=300)) == 0.3
    spread = np.concatenate([rng.normal(-2, 0.05, 100), rng.normal(0, 0.05, 300), rng.normal(2, 0.05, 100)])
    assert lfc_threshold(spread) == pytest.approx(0.6 * 2, abs=0.05)
    with pytest.raises(ValueError, match="pass delta="):
        lfc_threshold(np.zeros(2))


def test_de_errors(fitted):
    _, _, adata, model = fitted
    with pytest.raises(ValueError, match=r"unknown group label\(s\) \['domain9'\]"):
        differential_expression(adata, model, groupby="ground_truth", group1="domain9")
    with pytest.raises(ValueError, match="must not overlap"):
        differential_expression(adata, model, groupby="ground_truth", group1="domain0",
                                group2=["domain0", "domain1"])
    with pytest.raises(KeyError, match="obs has no column 'layer'"):
        differential_expression(adata, model, groupby="layer", group1="domain0")
    one_group = adata.copy()
    one_group.obs["all"] = "x"
    with pytest.raises(ValueError, match="group2 None has no spots"):
        differential_expression(one_group, model, groupby="all", group1="x")


def test_rank_genes_domains_tidy_table(fitted, tmp_path):
    _, _, adata, model = fitted
    out = rank_genes_domains(adata, model, groupby="ground_truth", n_draws=300, copy=True)
    results = out.uns["spavae_de"]["results"]
    assert len(results) == N_DOMAINS * adata.n_vars
    assert list(results.columns[:2]) == ["group", "gene"]
    assert list(out.uns["spavae_de"]["summary"]["group"]) == [f"domain{d}" for d in range(N_DOMAINS)]
    find_domains(out, N_DOMAINS, refine="hexagon", truth_key="ground_truth")
    out.write_h5ad(tmp_path / "results.h5ad")  # everything written is h5ad-friendly
    back = anndata.read_h5ad(tmp_path / "results.h5ad")
    pd.testing.assert_frame_equal(back.uns["spavae_de"]["results"], results, check_dtype=False)


# ------------------------------------------------------------------ prediction at new locations
def test_prediction_at_training_spots_is_the_full_posterior(fitted):
    _, _, adata, model = fitted
    mean, var, nearest = predict_latent(model, adata.obsm["spatial"], batch_size=37)
    full_mean, full_var = model.latent_posterior(mode="full")
    np.testing.assert_array_equal(nearest, np.arange(adata.n_obs))
    torch.testing.assert_close(mean, full_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var, full_var, rtol=1e-5, atol=1e-6)


def test_prediction_recovers_the_planted_signal_better_than_the_nearest_spot(fitted):
    full, held_out, adata, model = fitted
    locations = full.obsm["spatial"][held_out]
    out = predict(model, locations)
    assert out.shape == (len(held_out), adata.n_vars) and list(out.var_names) == list(adata.var_names)
    np.testing.assert_allclose(out.obsm["spatial"], locations)
    assert out.obsm["X_spavae"].shape == (len(held_out), model.module.n_latent)
    truth = full.layers["true_log_mean"][held_out]
    _, nearest = cKDTree(model.data.scaled_locations).query(model.setup.scale_locations(locations))  # scaled frame
    nearest_raw = np.log1p(np.asarray(adata.X)[nearest] / model.size_factors[nearest, None])
    assert list(out.obs["nearest_spot"]) == list(adata.obs_names[nearest])
    predicted, baseline = correlation_per_gene(np.log(out.X), truth), correlation_per_gene(nearest_raw, truth)
    assert predicted > baseline + 0.15, (predicted, baseline)
    # the GP part carries the location: predicting at the wrong places loses the signal
    shuffled = predict(model, locations[::-1])
    assert correlation_per_gene(np.log(shuffled.X), truth) < predicted - 0.3


def test_prediction_errors(fitted):
    _, _, adata, model = fitted
    with pytest.raises(ValueError, match="n x 2"):
        predict(model, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="NaN"):
        predict(model, np.array([[0.0, np.nan]]))
    untrained = spavae.SpaVAE(adata, device="cpu", encoder_layers=(8,), decoder_layers=(8,))
    with pytest.raises(RuntimeError, match="not trained"):
        predict(untrained, np.zeros((1, 2)))


# ------------------------------------------------------------------ enhancement
def test_enhancement_geometry():
    locations = hex_grid(5, 6)  # nearest-neighbour distance 1
    points, delta = enhancement_locations(locations)
    n = len(locations)
    assert points.shape == (5 * n, 2) and delta == pytest.approx(0.25)
    for block, (dx, dy) in enumerate([(-1, 1), (1, 1), (-1, -1), (1, -1), (0, 0)]):
        np.testing.assert_allclose(points[block * n:(block + 1) * n], locations + delta * np.array([dx, dy]))


def test_enhance_returns_5n_subspots_in_the_training_frame(fitted, tmp_path):
    _, _, adata, model = fitted
    out = enhance(model, n_samples=3)
    n = adata.n_obs
    assert out.shape == (5 * n, adata.n_vars) and out.obs_names.is_unique
    centre = (out.obs["offset"] == "center").to_numpy()
    np.testing.assert_allclose(out.obsm["spatial"][centre], adata.obsm["spatial"], atol=1e-9)  # a round trip
    assert list(out.obs["parent_spot"][centre]) == list(adata.obs_names)
    delta = out.uns["spavae"]["params"]["delta"]
    scaled = model.data.locations.numpy()
    assert delta == pytest.approx(np.median(cKDTree(scaled).query(scaled, k=2)[0][:, 1]) / 4)
    left_up = (out.obs["offset"] == "left_up").to_numpy()
    expected = model.setup.unscale_locations(scaled + delta * np.array([-1.0, 1.0]))  # the offset in the model frame
    np.testing.assert_allclose(out.obsm["spatial"][left_up], expected, atol=1e-9)
    assert out.obsm["X_spavae"].shape == (5 * n, model.module.n_latent) and (out.X > 0).all()
    out.write_h5ad(tmp_path / "enhanced.h5ad")


# ------------------------------------------------------------------ Moran's I
def test_morans_i_matches_the_formula_and_ranks_smooth_above_random():
    rng = np.random.default_rng(0)
    locations = hex_grid(20, 20)
    weights = knn_weights(locations, 5)
    assert weights.shape == (400, 400) and weights.sum() == 400 * 5 and weights.diagonal().sum() == 0
    values = rng.normal(size=(400, 3))
    dense, z = weights.toarray(), values - values.mean(0)
    expected = 400 / dense.sum() * np.einsum("ij,ik,jk->k", dense, z, z) / (z * z).sum(0)
    np.testing.assert_allclose(morans_i(values, weights), expected)
    smooth = spavae.data.simulate.smooth_fields(locations, 1, 5.0, rng)[:, 0]
    scores = morans_i(np.column_stack([smooth, rng.permutation(smooth), np.ones(400)]), weights)
    assert scores[0] > 0.7 and abs(scores[1]) < 0.1 and np.isnan(scores[2])


def test_spatial_autocorr_raw_and_denoised(fitted):
    _, _, adata, model = fitted
    out = denoise(adata, model, copy=True)
    spatial_autocorr(out)
    spatial_autocorr(out, layer="spavae_denoised")
    raw, denoised = out.var["morans_i"], out.var["morans_i_spavae_denoised"]
    assert out.uns["morans_i_spavae_denoised"]["params"]["n_neighbors"] == 5
    markers = np.abs(adata.varm["domain_effect"]).sum(1) > 0
    assert raw[markers].median() > raw[~markers].median()  # planted spatial genes score higher
    assert denoised.median() > raw.median()
    with pytest.raises(KeyError, match="no layer 'counts'"):
        spatial_autocorr(out, layer="counts")


# ------------------------------------------------------------------ plots
def test_plots_write_pngs(fitted, tmp_path):
    _, _, adata, model = fitted
    table = differential_expression(adata, model, groupby="ground_truth", group1="domain0", n_draws=200)
    plot_volcano(table, tmp_path / "volcano.png")
    enhanced = enhance(model, n_samples=1)
    plot_gene_spatial({"raw": (adata.obsm["spatial"], np.asarray(adata.X)[:, 0]),
                       "enhanced": (enhanced.obsm["spatial"], enhanced.X[:, 0])}, tmp_path / "gene.png", gene="g0")
    for name in ("volcano.png", "gene.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="do not match"):
        plot_gene_spatial({"raw": (adata.obsm["spatial"], np.zeros(3))}, tmp_path / "bad.png", gene="g0")
