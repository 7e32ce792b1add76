"""The encoder reading principal axes of its gene input (spavae.data.input_axes), on sections with many more genes
than spots: the rule, the axes against an independent SVD, the batch's input, and the axes travelling with the
model file."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import spavae
import spavae.data.input_axes as input_axes_module
from spavae.choices import describe_choices
from spavae.data.input_axes import AUTO_INPUT_AXES, auto_input_axes
from spavae.data.setup import DataSetup


@pytest.fixture(scope="module")
def wide():
    """64 spots x 300 genes: more than twice as many genes as spots."""
    return spavae.simulate_spatial_counts(n_rows=8, n_cols=8, n_genes=300, n_domains=3, mean_count=2.0, seed=3)


def z_scored(adata) -> np.ndarray:
    """The encoder's gene input computed here from its definition (ALGORITHM 1.2-1.3), independently of spavae."""
    counts = np.asarray(adata.X.toarray() if sp.issparse(adata.X) else adata.X, dtype=np.float64)
    totals = counts.sum(1)
    logged = np.log1p(counts / (totals / np.median(totals))[:, None])
    return (logged - logged.mean(0)) / logged.std(0, ddof=1)


def assert_same_axes(found: np.ndarray, expected: np.ndarray) -> None:
    """Equal columns up to each column's sign."""
    signs = np.sign((found * expected).sum(0))
    assert (signs != 0).all()
    np.testing.assert_allclose(found, expected * signs, atol=1e-8)


def test_the_rule_projects_only_where_genes_outnumber_spots_twice():
    assert auto_input_axes(300, 2000, binarize=False) == AUTO_INPUT_AXES
    assert auto_input_axes(500, 2000, binarize=False) == AUTO_INPUT_AXES
    assert auto_input_axes(1000, 2000, binarize=False) is None  # 2 genes per spot: the genes
    assert auto_input_axes(3639, 5000, binarize=False) is None
    assert auto_input_axes(300, 2000, binarize=True) is None
    assert auto_input_axes(6, 100, binarize=False) == 5  # never more than the spots' rank


def test_the_axes_are_the_principal_axes_of_the_z_scored_input(wide):
    setup = DataSetup.fit(wide)
    assert setup.input_axes.shape == (300, AUTO_INPUT_AXES)
    _, _, vt = np.linalg.svd(z_scored(wide), full_matrices=False)
    assert_same_axes(setup.input_axes, vt[:AUTO_INPUT_AXES].T)
    largest = setup.input_axes[np.abs(setup.input_axes).argmax(0), np.arange(AUTO_INPUT_AXES)]
    assert (largest > 0).all()  # the sign convention


def test_a_sample_of_spots_is_used_above_the_cap_and_it_is_seeded(wide, monkeypatch):
    monkeypatch.setattr(input_axes_module, "MAX_AXES_SPOTS", 40)
    setup = DataSetup.fit(wide, input_axes=5, seed=7)
    rows = np.sort(np.random.default_rng(7).permutation(wide.n_obs)[:40])
    sample = z_scored(wide)[rows]  # z-scored with the statistics of all spots, then centred on the sample
    _, _, vt = np.linalg.svd(sample - sample.mean(0), full_matrices=False)
    assert_same_axes(setup.input_axes, vt[:5].T)
    np.testing.assert_array_equal(DataSetup.fit(wide, input_axes=5, seed=7).input_axes, setup.input_axes)
    assert not np.allclose(np.abs(DataSetup.fit(wide, input_axes=5, seed=8).input_axes), np.abs(setup.input_axes))


def test_dense_and_sparse_counts_give_the_same_axes(wide):
    dense = wide.copy()
    dense.X = np.asarray(wide.X.toarray() if sp.issparse(wide.X) else wide.X)
    sparse = wide.copy()
    sparse.X = sp.csr_matrix(dense.X)
    np.testing.assert_allclose(DataSetup.fit(dense).input_axes, DataSetup.fit(sparse).input_axes, atol=1e-10)


def test_the_encoder_reads_the_projection_and_the_decoder_every_gene(wide):
    model = spavae.SpaVAE(wide, seed=0)
    batch = model.data.batch(np.arange(wide.n_obs))
    expected = z_scored(wide) @ model.setup.input_axes
    np.testing.assert_allclose(batch.expression.numpy(), expected, rtol=1e-4, atol=1e-4)
    assert batch.counts.shape == (wide.n_obs, 300)
    assert model.module.encoder.trunk[0].in_features == AUTO_INPUT_AXES
    model.train(max_epochs=3, progress=False)
    assert model.get_denoised_counts().shape == (wide.n_obs, 300)
    assert np.isfinite(model.get_latent_representation()).all()


def test_without_the_rule_the_encoder_reads_the_genes(wide, small_adata):
    assert DataSetup.fit(wide, input_axes=None).input_axes is None
    assert DataSetup.fit(small_adata).input_axes is None  # 256 spots, 60 genes
    model = spavae.SpaVAE(small_adata, seed=0)
    assert model.setup.n_input == model.setup.n_genes == model.module.encoder.trunk[0].in_features
    forced = spavae.SpaVAE(small_adata, input_axes=4, seed=0)
    assert forced.module.encoder.trunk[0].in_features == 4


def test_the_axes_travel_with_the_model_file(wide, tmp_path):
    model = spavae.SpaVAE(wide, seed=0).train(max_epochs=3, progress=False)
    model.save(tmp_path / "model.pt")
    half = wide[::2].copy()  # 32 spots x 300 genes: refitting would give other axes
    loaded = spavae.SpaVAE.load(tmp_path / "model.pt", half)
    np.testing.assert_array_equal(loaded.setup.input_axes, model.setup.input_axes)
    np.testing.assert_array_equal(loaded.get_latent_representation(), model.get_latent_representation()[::2])
    assert not np.allclose(np.abs(DataSetup.fit(half).input_axes), np.abs(model.setup.input_axes))


def test_a_setup_saved_without_axes_loads_as_reading_the_genes(small_adata):
    values = DataSetup.fit(small_adata).to_dict()
    del values["input_axes"]  # a model file written before the option existed
    assert DataSetup.from_dict(values).input_axes is None


def test_the_choice_is_printed_with_its_reason(wide, small_adata):
    lines = describe_choices(spavae.SpaVAE(wide, seed=0))
    assert "encoder input: 10 principal axes of the z-scored genes (input_axes='auto': 4.7 genes per spot, " \
           "more than 2)" in lines
    lines = describe_choices(spavae.SpaVAE(small_adata, seed=0))
    assert "encoder input: the genes (input_axes='auto': 0.23 genes per spot, 2 or fewer)" in lines


@pytest.mark.parametrize("value", [0, -3, True, 2.5, "all"])
def test_a_bad_input_axes_is_refused_in_one_line(wide, value):
    with pytest.raises(ValueError, match="input_axes must be a positive integer, 'auto' or None"):
        DataSetup.fit(wide, input_axes=value)


def test_more_axes_than_the_spots_allow_or_on_peaks_are_refused(wide):
    with pytest.raises(ValueError, match=r"input_axes must be an integer between 1 and 63 \(the spots minus one"):
        DataSetup.fit(wide, input_axes=64)
    with pytest.raises(ValueError, match="binarised peaks .* give input_axes=None"):
        DataSetup.fit(wide, likelihood="bernoulli", input_axes=5)
    assert DataSetup.fit(wide, likelihood="bernoulli").input_axes is None


def test_a_multi_section_model_projects_both_sections_onto_one_set_of_axes(wide, tmp_path):
    import anndata as ad

    first, second = wide[:32].copy(), wide[32:].copy()
    first.obs["section"], second.obs["section"] = "a", "b"
    both = ad.concat([first, second])
    model = spavae.SpaVAE(both, batch_key="section", seed=0).train(max_epochs=2, progress=False)
    assert model.setup.input_axes.shape == (300, AUTO_INPUT_AXES)
    assert model.module.encoder.trunk[0].in_features == AUTO_INPUT_AXES + 2  # axes + one-hot section
    model.save(tmp_path / "model.pt")
    loaded = spavae.SpaVAE.load(tmp_path / "model.pt", both[both.obs["section"] == "b"].copy())
    np.testing.assert_array_equal(loaded.get_latent_representation(), model.get_latent_representation()[32:])
