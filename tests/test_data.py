"""Readers, preprocessing, inducing points, the simulator, and clear errors for every bad input."""

import anndata as ad
import h5py
import numpy as np
import pytest
from sklearn.cluster import KMeans

import spavae
from spavae.analysis import refine_labels, score_clustering
from spavae.data import (
    LocationFrame,
    filter_empty,
    grid_inducing_points,
    kmeans_inducing_points,
    normalize_log_scale,
    read,
    read_h5ad,
    read_spavae_h5,
    size_factors,
)


def write_h5(path, **datasets):
    with h5py.File(path, "w") as h5:
        for key, value in datasets.items():
            h5[key] = value
    return path


@pytest.fixture
def toy(tmp_path):
    rng = np.random.default_rng(0)
    counts = rng.poisson(2.0, size=(30, 8)).astype(float)
    counts[:, 0] += 1
    pos = np.column_stack([np.arange(30) % 6, np.arange(30) // 6]).astype(float)
    labels = np.array([b"A", b"B", b"NA"] * 10)
    return counts, pos, labels, tmp_path


def test_read_spavae_h5_layout(toy):
    counts, pos, labels, tmp = toy
    path = write_h5(tmp / "x.h5", X=counts, pos=pos, Y=labels, gene=np.array([f"g{i}".encode() for i in range(8)]))
    adata = read(path)
    assert adata.shape == (30, 8) and list(adata.var_names[:2]) == ["g0", "g1"]
    np.testing.assert_array_equal(adata.X, counts)
    np.testing.assert_array_equal(adata.obsm["spatial"], pos)
    assert list(adata.obs["ground_truth"][:3]) == ["A", "B", "NA"]


@pytest.mark.parametrize("datasets,message", [
    ({"X": "counts"}, r"no dataset \['pos'\]"),
    ({"X": "nan", "pos": "pos"}, "NaN or infinite"),
    ({"X": "negative", "pos": "pos"}, "negative"),
    ({"X": "counts", "pos": "pos3"}, "spots x 2"),
    ({"X": "counts", "pos": "short"}, "must match one to one"),
    ({"X": "vector", "pos": "pos"}, "2-D spots x genes"),
    ({"X": "counts", "pos": "pos", "Y": "short_labels"}, "labels for 30 spots"),
])
def test_bad_h5_inputs_name_the_problem(toy, datasets, message):
    counts, pos, labels, tmp = toy
    bad = counts.copy()
    values = {"counts": counts, "pos": pos, "pos3": np.ones((30, 3)), "short": pos[:20], "vector": counts[:, 0],
              "short_labels": labels[:5]}
    if datasets["X"] == "nan":
        bad[3, 2] = np.nan
        values["nan"] = bad
    if datasets["X"] == "negative":
        bad[1, 1] = -1
        values["negative"] = bad
    path = write_h5(tmp / "bad.h5", **{k: values[v] for k, v in datasets.items()})
    with pytest.raises((ValueError, KeyError), match=message):
        read_spavae_h5(path)


def test_missing_and_non_hdf5_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read(tmp_path / "nothing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    with pytest.raises(ValueError, match="not a readable HDF5 file"):
        read(junk)


def test_read_h5ad_with_layer_spatial_key_and_labels(toy):
    counts, pos, labels, tmp = toy
    adata = ad.AnnData(X=np.log1p(counts).astype(np.float32))
    adata.layers["counts"] = counts
    adata.obsm["coords"] = pos
    adata.obs["layer"] = labels.astype(str)
    adata.write_h5ad(tmp / "x.h5ad")
    back = read(tmp / "x.h5ad", layer="counts", spatial_key="coords", label_key="layer")
    np.testing.assert_array_equal(back.X, counts)
    np.testing.assert_array_equal(back.obsm["spatial"], pos)
    assert back.obs["ground_truth"].iloc[1] == "B"
    with pytest.raises(KeyError, match="no layer 'raw'"):
        read_h5ad(tmp / "x.h5ad", layer="raw", spatial_key="coords")
    with pytest.raises(KeyError, match="no obsm\\['spatial'\\]"):
        read_h5ad(tmp / "x.h5ad", layer="counts")


def test_filter_empty_reports_and_keeps_locations_aligned(toy):
    counts, pos, _, _ = toy
    counts = counts.copy()
    counts[4] = 0
    counts[:, 5] = 0
    adata = ad.AnnData(X=counts)
    adata.obsm["spatial"] = pos
    with pytest.warns(UserWarning) as record:
        kept = filter_empty(adata)
    messages = " ".join(str(r.message) for r in record)
    assert "removed 1 gene(s)" in messages and "removed 1 spot(s)" in messages
    assert kept.shape == (29, 7)
    np.testing.assert_array_equal(kept.obsm["spatial"], np.delete(pos, 4, axis=0))


def test_model_refuses_bad_anndata(toy):
    counts, pos, _, _ = toy
    empty = counts.copy()
    empty[2] = 0
    adata = ad.AnnData(X=empty)
    adata.obsm["spatial"] = pos
    with pytest.raises(ValueError, match="1 spot\\(s\\) and 0 gene\\(s\\) with zero total count.*filter_empty"):
        spavae.SpaVAE(adata)
    good = ad.AnnData(X=counts)
    with pytest.raises(KeyError, match="no 'spatial'"):
        spavae.SpaVAE(good)
    good.obsm["spatial"] = np.column_stack([pos[:, 0], np.ones(30)])
    with pytest.raises(ValueError, match="same coordinate on axis 1"):
        spavae.SpaVAE(good)
    good.obsm["spatial"] = pos
    with pytest.raises(KeyError, match="no layer 'counts'"):
        spavae.SpaVAE(good, layer="counts")
    with pytest.raises(TypeError, match="must be an AnnData"):
        spavae.SpaVAE(counts)


@pytest.mark.parametrize("kwargs,message", [
    ({"n_gp": 0}, "n_gp must be an integer >= 1, got 0"),
    ({"n_gauss": -1}, "n_gauss must be an integer >= 0, got -1"),
    ({"kernel": "matern"}, "unknown kernel"),
    ({"dtype": "float16"}, "dtype must be one of"),
    ({"inducing": "random"}, "inducing must be 'auto', 'grid' or 'kmeans', got 'random'"),
    ({"inducing_steps": 0}, "inducing_steps must be a positive integer"),
    ({"inducing": "kmeans", "n_inducing": 500}, "n_inducing must be an integer between"),
    ({"gp_n_obs": "some"}, "gp_n_obs must be"),
    ({"loc_range": 0}, "loc_range must be positive"),
    ({"dropout": 1.5}, "dropout must be in"),
    ({"device": "cuda"} if not __import__("torch").cuda.is_available() else {"device": "tpu"},
     "device 'cuda' was requested but CUDA is not available" if not __import__("torch").cuda.is_available()
     else "Expected one of"),
    ({"seed": -3}, "seed must be a non-negative integer"),
])
def test_bad_model_settings_are_named(small_adata, kwargs, message):
    with pytest.raises(ValueError, match=message):
        spavae.SpaVAE(small_adata, **kwargs)


@pytest.mark.parametrize("kwargs,message", [
    ({"batch_size": 1}, "batch_size must be an integer >= 2"),
    ({"train_size": 0.0}, "train_size must be in"),
    ({"patience": 0}, "patience must be an integer >= 1"),
    ({"max_epochs": 0}, "max_epochs must be an integer >= 1"),
    ({"lr": -1.0}, "lr must be a finite number > 0"),
    ({"num_samples": 0}, "num_samples must be an integer >= 1"),
    ({"beta_min": 30.0}, r"beta_min \(30.0\) must not exceed beta_max \(25.0\)"),
])
def test_bad_training_settings_are_named(small_adata, kwargs, message):
    with pytest.raises(ValueError, match=message):
        spavae.SpaVAE(small_adata, device="cpu").train(progress=False, **kwargs)


def test_preprocessing_matches_its_definition():
    rng = np.random.default_rng(1)
    counts = rng.poisson(3.0, size=(40, 6)).astype(float) + 1
    sf = size_factors(counts)
    assert np.median(sf) == pytest.approx(1.0)
    np.testing.assert_allclose(sf, counts.sum(1) / np.median(counts.sum(1)))
    z = normalize_log_scale(counts, sf)
    logged = np.log1p(counts / sf[:, None])
    np.testing.assert_allclose(z, (logged - logged.mean(0)) / logged.std(0, ddof=1))
    constant = normalize_log_scale(np.column_stack([counts, 3 * sf]), sf)  # a zero-sd gene stays finite
    assert np.isfinite(constant).all() and np.allclose(constant[:, -1], 0)


def test_location_scaling_and_inducing_points():
    locations = np.array([[0.0, 10.0], [5.0, 30.0], [10.0, 20.0]])
    scaler = LocationFrame("minmax", 20.0).fit(locations)
    np.testing.assert_allclose(scaler.transform(locations), [[0, 0], [10, 20], [20, 10]])
    np.testing.assert_allclose(scaler.transform([[2.5, 15.0]]), [[5.0, 5.0]])
    np.testing.assert_allclose(scaler.inverse_transform(scaler.transform(locations)), locations)
    grid = grid_inducing_points(6, 20.0)
    assert grid.shape == (49, 2)
    np.testing.assert_allclose(grid[:3], [[0, 0], [0, 20 / 6], [0, 40 / 6]])
    np.testing.assert_allclose(grid[-1], [20, 20])
    points = np.random.default_rng(0).uniform(0, 20, (200, 2))
    centroids = kmeans_inducing_points(points, 9, seed=3)
    expected = KMeans(n_clusters=9, n_init=10, random_state=3).fit(points).cluster_centers_
    np.testing.assert_allclose(centroids, expected)


def test_simulator_is_seeded_and_plants_domains():
    a = spavae.simulate_spatial_counts(n_rows=10, n_cols=12, n_genes=30, n_domains=3, seed=4)
    b = spavae.simulate_spatial_counts(n_rows=10, n_cols=12, n_genes=30, n_domains=3, seed=4)
    assert a.shape == (120, 30)
    np.testing.assert_array_equal(a.X, b.X)
    assert a.obs["ground_truth"].nunique() == 3
    assert (a.X == np.round(a.X)).all() and (a.X >= 0).all()
    # the domains are spatially contiguous layers: refinement changes few labels
    truth = a.obs["ground_truth"].to_numpy()
    assert (refine_labels(truth, a.obsm["spatial"]) != truth).mean() < 0.05
    with pytest.raises(ValueError, match="n_domains must be at least 2"):
        spavae.simulate_spatial_counts(n_domains=1)


def test_refinement_rule_and_scores_exclude_na():
    rows, cols = np.meshgrid(np.arange(5), np.arange(5), indexing="ij")
    locations = np.column_stack([cols.ravel() + 0.5 * (rows.ravel() % 2), rows.ravel() * np.sqrt(3) / 2])
    labels = np.zeros(25, dtype=int)
    labels[12] = 1  # an isolated spot in the middle is relabelled to its neighbours' label
    labels[[0, 1]] = 2  # a corner pair: 2 of its own (< 3) among 7, and 5 of label 0 (> 3): relabelled
    labels[[3, 4, 9]] = 3  # a triangle: 3 of its own among 7 (not < 3): kept
    refined = refine_labels(labels, locations)
    assert refined[12] == 0
    assert list(refined[[0, 1]]) == [0, 0]
    assert list(refined[[3, 4, 9]]) == [3, 3, 3]
    truth = np.array(["A", "A", "B", "B", "NA", "NA"], dtype=object)
    pred = np.array([0, 0, 1, 1, 0, 1])
    assert score_clustering(truth, pred) == {"ari": 1.0, "nmi": 1.0, "n_scored": 4}
