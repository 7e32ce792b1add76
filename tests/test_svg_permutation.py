"""Permutation p-values of spatially variable genes: the statistics against independent computations, the
serial and Ray nulls, and the calibration on simulated planted genes."""

import anndata
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

import spavae
from spavae.analysis.svg import (
    bh_qvalues,
    center_scores,
    null_input,
    null_model_scores,
    null_training,
    permutation_null,
    permutation_pvalues,
    pooled_null_uniformity,
    pooled_pvalues,
    spatial_scores,
    spatially_variable_genes,
)
from spavae.api import VARIANTS
from spavae.data.simulate import simulate_svg_counts


def test_per_gene_pvalues_count_the_gene_s_own_null_scores():
    rng = np.random.default_rng(0)
    null = rng.normal(size=(19, 6))
    observed = rng.normal(size=6)
    observed[2] = null[4, 2]  # a tie counts as at least as extreme
    by_loop = [(1 + sum(null[r, g] >= observed[g] for r in range(19))) / 20 for g in range(6)]
    np.testing.assert_allclose(permutation_pvalues(observed, null), by_loop)
    assert permutation_pvalues([10.0], [[0.0], [1.0]])[0] == pytest.approx(1 / 3)  # the floor is 1 / (1 + R)


def test_pooled_pvalues_count_every_gene_s_null_scores():
    rng = np.random.default_rng(1)
    null, observed = rng.normal(size=(3, 5)), rng.normal(size=5)
    pool = null.ravel()
    expected = [(1 + (pool >= o).sum()) / (1 + pool.size) for o in observed]
    np.testing.assert_allclose(pooled_pvalues(observed, null), expected)
    with pytest.raises(ValueError, match="permutations x genes"):
        pooled_pvalues(observed, null[:, :4])


def test_bh_qvalues_match_the_step_up_definition():
    rng = np.random.default_rng(2)
    p = np.concatenate([rng.uniform(0, 0.01, 10), rng.uniform(size=40)])
    m = len(p)
    expected = [min(1.0, min(p[j] * m / (np.sum(p <= p[j])) for j in range(m) if p[j] >= p[i])) for i in range(m)]
    np.testing.assert_allclose(bh_qvalues(p), expected)
    for alpha in (0.01, 0.05, 0.2):  # rejecting q <= alpha is the BH procedure at level alpha
        order = np.sort(p)
        passing = np.nonzero(order <= alpha * np.arange(1, m + 1) / m)[0]
        n_reject = passing.max() + 1 if len(passing) else 0
        assert (bh_qvalues(p) <= alpha).sum() == n_reject
    q = bh_qvalues([0.5, np.nan, 0.01])
    assert np.isnan(q[1]) and q[2] == pytest.approx(0.02) and q[0] == pytest.approx(0.5)


def test_pooling_check_passes_for_exchangeable_genes_and_fails_when_gene_nulls_differ():
    rng = np.random.default_rng(3)
    n_perm, n_genes = 20, 200
    draws = rng.normal(size=(n_perm + 1, n_genes))  # every gene: the same null, observed one more draw of it
    null_genes = np.arange(150)
    check = pooled_null_uniformity(draws[0], draws[1:], null_genes)
    assert check["pooling_allowed"] and check["pooled_ks_pvalue"] > 0.01
    shifted = draws.copy()
    shifted[:, 150:] += 2.0  # 50 genes whose null scores sit higher: pooled, they inflate the null genes' p-values
    check = pooled_null_uniformity(shifted[0], shifted[1:], null_genes)
    assert not check["pooling_allowed"] and check["pooled_ks_pvalue"] < 0.01
    assert check["per_gene_ks_pvalue"] > 0.01  # the per-gene p-values of the null genes stay uniform
    # observed scores not exchangeable with their null (all shifted down): the per-gene p-values fail too
    check = pooled_null_uniformity(draws[0] - 1.0, draws[1:], null_genes)
    assert check["per_gene_ks_pvalue"] < 0.01 and not check["pooling_allowed"]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread in every test (after conftest's 2): 2 threads on 2 busy cores make these trainings 20-30
    times slower. The module's fixtures set it too, as they are built before it."""
    torch.set_num_threads(1)


#: The 7 x 7 grid of the calibration in docs/sweeps.md (the default gives these 144 spots 13 x 13, and five
#: per-dimension kernels over 169 points make every null model slower).
GRID_STEPS = 6


@pytest.fixture(scope="module")
def svg_model():
    """A small spaLDVAE on 144 spots with 30 planted spatial and 70 non-spatial genes.

    lr 0.02 so that 30 epochs (210 steps) separate the planted genes; at the default 0.005 the model had learned
    nothing yet and every gene looked the same (docs/sweeps.md)."""
    torch.set_num_threads(1)
    adata = simulate_svg_counts(n_rows=12, n_cols=12, seed=0)
    model = spavae.SpaVAE.from_variant("spaLDVAE", adata, n_gp=5, encoder_layers=(32, 16), device="cpu",
                                       inducing_steps=GRID_STEPS)
    train = VARIANTS["spaLDVAE"]["train"] | {"beta": 1.0, "max_epochs": 30, "lr": 0.02, "progress": False}
    model.train(**train)
    return adata, model, train


def test_the_spatial_statistics_match_a_direct_computation(svg_model):
    _, model, _ = svg_model
    mean, var = model.latent_posterior()
    z_bar = np.exp(mean.double().numpy() + var.double().numpy() / 2)
    loadings = np.exp(model.module.observations[0].decoder.weight.detach().double().numpy())
    spatial = np.einsum("ik,kg->ig", z_bar[:, :5], loadings[:5])
    total = np.einsum("ik,kg->ig", z_bar, loadings)
    scores = spatial_scores(model)
    np.testing.assert_allclose(scores["spatial_score"], spatial.sum(0) / total.sum(0), rtol=1e-6)  # float32 latents
    np.testing.assert_allclose(scores["spatial_variance"], spatial.var(0) / total.mean(0) ** 2, rtol=1e-6)
    assert stats.spearmanr(scores["spatial_variance"], total.var(0)).statistic < 0.99  # not the total variance


@pytest.fixture(scope="module")
def quick_model(svg_model):
    """The small spaLDVAE of ``svg_model`` trained for 3 epochs only: a cheap model whose null models (trained like
    it) test the mechanics of the permutation null."""
    adata, _, train = svg_model
    torch.set_num_threads(1)
    model = spavae.SpaVAE.from_variant("spaLDVAE", adata, n_gp=5, encoder_layers=(32, 16), device="cpu",
                                       inducing_steps=GRID_STEPS)
    model.train(**(train | {"max_epochs": 3}))
    return model


@pytest.fixture(scope="module")
def quick_null(svg_model, quick_model):
    """Two null models of ``quick_model``, in series."""
    return permutation_null(svg_model[0], quick_model, 2, threads_per_task=1)


def test_null_models_must_be_trained_like_the_observed_model(svg_model):
    """A 3-epoch null against a 30-epoch model gives invalid p-values: refused before any training."""
    adata, model, train = svg_model
    assert null_training(model) == model.train_params and train.items() <= model.train_params.items()
    assert null_training(model, {"lr": 0.02, "progress": True}) == model.train_params  # never a progress bar
    with pytest.raises(ValueError, match=r"trained like the observed model.*max_epochs=3 \(the model: 30\)"):
        permutation_null(adata, model, 1, train_kwargs=train | {"max_epochs": 3})
    with pytest.raises(ValueError, match=r"trained like the observed model.*epochs=30 \(the model: 'no such"):
        spatially_variable_genes(adata.copy(), model, n_permutations=1, train_kwargs={"epochs": 30})


def test_a_null_model_of_the_identity_permutation_is_the_observed_model(svg_model, quick_model):
    """Same data setup, settings, seed and training, scored at the true locations: the observed scores exactly."""
    adata, _, _ = svg_model
    same = null_model_scores(null_input(adata, quick_model.setup), quick_model.setup, quick_model.init_params,
                             null_training(quick_model), np.arange(adata.n_obs), quick_model.init_params["seed"])
    observed = spatial_scores(quick_model)
    for statistic, values in same.items():
        np.testing.assert_array_equal(values, observed[statistic].to_numpy())


def test_the_null_is_the_same_in_series_and_on_ray(svg_model, quick_model, quick_null):
    ray = pytest.importorskip("ray")
    adata, _, _ = svg_model
    started = not ray.is_initialized()
    try:
        on_ray = permutation_null(adata, quick_model, 2, use_ray=True, num_cpus=2, threads_per_task=1)
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
    assert set(quick_null) == set(on_ray) == {"spatial_score", "spatial_variance"}
    for statistic, values in quick_null.items():
        assert values.shape == (2, adata.n_vars) and not np.allclose(values[0], values[1])
        np.testing.assert_allclose(on_ray[statistic], values, rtol=1e-5)


def test_a_backed_anndata_gives_the_same_null_and_stays_as_it_was(svg_model, quick_model, quick_null, tmp_path):
    adata, _, _ = svg_model
    adata.write_h5ad(tmp_path / "section.h5ad")
    backed = anndata.read_h5ad(tmp_path / "section.h5ad", backed="r")
    null = permutation_null(backed, quick_model, 2, threads_per_task=1)
    for statistic, values in quick_null.items():
        np.testing.assert_array_equal(null[statistic], values)
    assert backed.isbacked and backed.file.is_open
    np.testing.assert_array_equal(backed.obsm["spatial"], adata.obsm["spatial"])


def test_table_pvalues_count_the_null_scores_at_least_the_observed_one(svg_model, quick_model, quick_null):
    """The table's p-values against ones computed here from the observed and null statistics (the same seeds)."""
    adata, _, _ = svg_model
    table = spatially_variable_genes(adata.copy(), quick_model, n_permutations=2, threads_per_task=1)
    observed = spatial_scores(quick_model)["spatial_score"]
    null = quick_null["spatial_score"]
    centred = observed - np.median(observed)  # each model's scores minus its median over the genes
    centred_null = [row - np.median(row) for row in null]
    expected = pd.Series([(1 + sum(row[g] >= centred.iloc[g] for row in centred_null)) / 3
                          for g in range(adata.n_vars)], index=observed.index)
    np.testing.assert_allclose(table["pvalue"], expected.reindex(table.index))
    assert expected.nunique() == 3  # 1/3, 2/3 and 1 all occur: the comparison is not vacuous
    np.testing.assert_allclose(table["qvalue"], bh_qvalues(table["pvalue"].to_numpy()))


def test_spatial_variance_ranks_but_gets_no_pvalues(svg_model):
    adata, model, _ = svg_model
    annotated = adata.copy()
    table = spatially_variable_genes(annotated, model, statistic="spatial_variance")
    assert (np.diff(table["spatial_variance"].to_numpy()) <= 0).all()
    np.testing.assert_allclose(annotated.var["spavae_svg_score"], table["spatial_variance"].reindex(adata.var_names))
    with pytest.raises(ValueError, match="spatial_score"):
        spatially_variable_genes(adata.copy(), model, statistic="spatial_variance", n_permutations=2)
    with pytest.raises(ValueError, match="statistic must be one of"):
        spatially_variable_genes(adata.copy(), model, statistic="share")


@pytest.fixture(scope="module")
def null_nine(svg_model):
    """Observed statistics and those of 9 null models of the small spaLDVAE, trained with the same settings."""
    adata, model, train = svg_model
    observed = spatial_scores(model)
    null = permutation_null(adata, model, 9, threads_per_task=1)
    return {statistic: (observed[statistic].to_numpy(), null[statistic]) for statistic in null}


def within_level(p: np.ndarray, levels=(0.1, 0.2)) -> bool:
    """The bound of a valid test on genes without a pattern: at most a share ``level`` of them at ``p <= level``."""
    return all(np.mean(p <= level) <= level for level in levels)


def test_planted_genes_get_small_pvalues_and_noise_genes_valid_ones(svg_model, null_nine):
    """The default test (spatial_score, centred per model): power, and no excess of small p-values for noise genes.

    Seeded and deterministic: the 9 null models, and so the p-values, are the same at every run."""
    adata, _, _ = svg_model
    spatial = adata.var["is_spatial"].to_numpy()
    p = permutation_pvalues(*center_scores(*null_nine["spatial_score"]))
    assert np.mean(p[spatial] == 0.1) >= 0.5  # measured 0.63: the smallest p-value 9 permutations can give
    assert within_level(p[~spatial])  # measured 1 and 8 of the 70 noise genes at p <= 0.1 and p <= 0.2


def test_the_calibration_check_catches_null_models_trained_less_than_the_observed_one(svg_model, null_nine):
    """3-epoch null models against the 30-epoch model (this module's nulls before :func:`null_training`): the same
    permutations and seeds as ``null_nine``, but the noise genes' p-values break the bound of a valid test."""
    adata, model, train = svg_model
    seed = model.init_params["seed"]
    rng = np.random.default_rng(seed)  # the permutations of permutation_null
    spots = null_input(adata, model.setup)
    short = np.vstack([null_model_scores(spots, model.setup, model.init_params, train | {"max_epochs": 3},
                                         rng.permutation(adata.n_obs), seed + r + 1)["spatial_score"]
                       for r in range(9)])
    p = permutation_pvalues(*center_scores(null_nine["spatial_score"][0], short))
    noise = ~adata.var["is_spatial"].to_numpy()
    assert not within_level(p[noise])  # measured 14 and 20 of the 70 noise genes at p <= 0.1 and p <= 0.2


def test_raw_scores_and_the_spatial_variance_give_noise_genes_too_many_small_pvalues(svg_model, null_nine):
    """Why the defaults are what they are: the two alternatives call non-spatial genes spatial (docs/sweeps.md)."""
    adata, _, _ = svg_model
    spatial = adata.var["is_spatial"].to_numpy()
    raw = permutation_pvalues(*null_nine["spatial_score"])  # the original's comparison
    assert not within_level(raw[~spatial])  # measured 20 of the 70 noise genes at p <= 0.1
    variance = permutation_pvalues(*center_scores(*null_nine["spatial_variance"]))
    assert np.mean(variance[spatial] == 0.1) >= 0.8  # more power...
    assert np.mean(variance[~spatial] <= 0.1) > 0.15  # ...but more than 15% of the noise genes at the 0.1 level
