"""The image view: image features as a second observed view of the latent (``SpaVAE(adata, image=...)``)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from pyro import poutine
from scipy import stats

import spavae
from spavae.cli import main
from spavae.data import write_visium
from spavae.data.batch import Batch
from spavae.image import ImageFeatures, extract_image_features, simulate_image_domain_section
from spavae.image.features import COLOUR_FEATURES, TEXTURE_MIN_PIXELS
from spavae.likelihoods import ImageFeatureObservation


@pytest.fixture(scope="module")
def section():
    return simulate_image_domain_section(n_rows=12, n_cols=12, n_genes=30, seed=3)


def quiet_model(adata, **kwargs) -> spavae.SpaVAE:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return spavae.SpaVAE(adata, **kwargs)


def test_the_image_log_likelihood_is_the_weighted_gaussian_of_the_usable_spots():
    torch.manual_seed(0)
    observation = ImageFeatureObservation(4, 3, (8,), weight=2.5, columns=slice(2, 6))
    with torch.no_grad():
        observation.log_scale.copy_(torch.tensor([0.0, -0.5, 0.3, 1.0]))
    observation.eval()
    z = torch.randn(5, 3, dtype=torch.float32)
    features = torch.randn(5, 4)
    features[1] = float("nan")  # a spot without usable features
    counts = torch.cat([torch.ones(5, 2), features], dim=1)
    batch = Batch(None, None, counts, None)
    trace = poutine.trace(observation.model).get_trace(z, batch)
    trace.compute_log_prob()
    site = trace.nodes["image"]

    mean = observation.denoise(z, batch).detach().numpy().astype(np.float64)
    sd = np.exp([0.0, -0.5, 0.3, 1.0])
    expected = stats.norm.logpdf(features.numpy().astype(np.float64), mean, sd).sum(1)
    expected[1] = 0.0
    np.testing.assert_allclose(site["unscaled_log_prob"].detach().numpy(), expected, rtol=1e-5)
    assert site["scale"] == 2.5
    np.testing.assert_allclose(site["log_prob"].detach().numpy(), 2.5 * expected, rtol=1e-5)
    np.testing.assert_allclose(float(trace.log_prob_sum().detach()), 2.5 * expected.sum(), rtol=1e-5)


def test_the_model_loss_counts_the_image_term_times_its_weight(section):
    low, high = (quiet_model(section, image="lowres", image_weight=w, seed=0) for w in (1.0, 3.0))
    batch = low.data.batch(np.arange(40))
    observation = low.module.observations[1]
    low.module.eval(), high.module.eval()
    torch.manual_seed(1)
    loss_low = low.module.loss(batch, beta=1.0)
    torch.manual_seed(1)
    loss_high = high.module.loss(batch, beta=1.0)
    # the same draws of z (same seed, same weights): the difference is 2 x the image log-likelihood at those draws
    torch.manual_seed(1)
    post = low.module.posterior(batch.expression, batch.locations)
    guide = poutine.trace(low.module.sample_latent).get_trace(post, batch, 1.0)
    z = torch.cat([guide.nodes["z_gp"]["value"], guide.nodes["z_gauss"]["value"]], dim=1)
    observed = batch.counts[:, observation.columns]
    usable = torch.isfinite(observed).all(1)
    log_likelihood = torch.distributions.Normal(observation.denoise(z, batch), observation.scale).log_prob(
        torch.nan_to_num(observed)).sum(1)[usable].sum()
    difference = float((loss_high.nb - loss_low.nb).detach())
    np.testing.assert_allclose(difference, -2.0 * float(log_likelihood.detach()), rtol=1e-5)


def test_the_encoder_sees_the_features_and_masked_spots_give_no_nan(section):
    adata = section.copy()
    pixels = adata.obsm["spatial"].copy()
    pixels[:3] = -1e5  # three spots off the image
    adata.obsm["spatial"] = pixels
    model = quiet_model(adata, image="hires", seed=0)
    assert model.setup.n_input == model.setup.n_genes + 11
    features = model.data.image_features
    assert np.isnan(features[:3]).all() and np.isfinite(features[3:]).all()
    batch = model.data.batch(np.arange(10))
    np.testing.assert_array_equal(batch.expression[:3, -11:].numpy(), 0.0)
    np.testing.assert_allclose(batch.expression[3:, -11:].numpy(), features[3:10], rtol=1e-6)
    model.module.train()
    loss = model.module.loss(batch, beta=1.0).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.module.parameters() if p.grad is not None)


def test_without_image_nothing_changes(section):
    plain = quiet_model(section, seed=0)
    assert plain.setup.image is None and plain.setup.n_input == plain.setup.n_genes
    assert [o.site for o in plain.module.observations] == ["counts"]
    with pytest.raises(ValueError, match="modality must be one of this model's \\['genes'\\]"):
        plain.train(max_epochs=1, progress=False).get_denoised_counts(modality="image")


def test_the_fitted_image_state_travels_with_the_model_file(section, tmp_path):
    model = quiet_model(section, image="lowres", seed=0).train(max_epochs=3, progress=False)
    fitted = extract_image_features(section, "lowres").subset(COLOUR_FEATURES)
    np.testing.assert_allclose(model.setup.image["mean"], fitted.mean)
    model.save(tmp_path / "model.pt")

    half = section[::2].copy()
    loaded = spavae.SpaVAE.load(tmp_path / "model.pt", half)
    np.testing.assert_allclose(loaded.setup.image["mean"], fitted.mean)  # not refitted on the half
    np.testing.assert_array_equal(loaded.get_latent_representation(), model.get_latent_representation()[::2])
    np.testing.assert_array_equal(loaded.get_denoised_counts(modality="image", seed=4),
                                  model.get_denoised_counts(modality="image", seed=4)[::2])

    # an image moved out of uns can be given at load; features standardised otherwise are refused
    bare = half.copy()
    stored = ImageFeatures.from_fitted_state(model.setup.image).apply(half)
    del bare.uns["spatial"]
    again = spavae.SpaVAE.load(tmp_path / "model.pt", bare, image=stored)
    np.testing.assert_array_equal(again.get_latent_representation(), loaded.get_latent_representation())
    refitted = extract_image_features(half, "lowres").subset(COLOUR_FEATURES)
    with pytest.raises(ValueError, match="not standardised like the model's"):
        spavae.SpaVAE.load(tmp_path / "model.pt", half, image=refitted)


def test_texture_features_are_left_out_where_a_spot_spans_few_pixels(section):
    lowres, hires = (quiet_model(section, image=key, seed=0) for key in ("lowres", "hires"))
    low, high = (m.setup.image["settings"]["diameter_px"] for m in (lowres, hires))
    assert low < TEXTURE_MIN_PIXELS <= high
    assert lowres.setup.image["names"] == list(COLOUR_FEATURES)
    assert hires.setup.image["names"] == list(extract_image_features(section, "hires").names)
    every = extract_image_features(section, "lowres")
    np.testing.assert_allclose(lowres.data.image_features, every.subset(COLOUR_FEATURES).values, rtol=1e-6)
    np.testing.assert_allclose(lowres.data.image_features[:, 0], every.values[:, every.names.index("red_mean")],
                               rtol=1e-6)


def test_given_features_and_obsm_features_are_used_as_given(section):
    features = extract_image_features(section, "hires", max_background_fraction=0.9)
    model = quiet_model(section, image=features, seed=0)
    assert model.setup.image["settings"]["max_background_fraction"] == 0.9
    np.testing.assert_allclose(model.data.image_features, features.values, rtol=1e-6)

    adata = section.copy()
    adata.obsm["X_histology"] = np.random.default_rng(0).normal(size=(adata.n_obs, 6))
    adata.obsm["X_histology"][5] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = spavae.SpaVAE(adata, image="X_histology", seed=0)
    assert model.setup.n_image_features == 6
    assert np.isnan(model.data.image_features[5]).all()
    assert np.isfinite(np.delete(model.data.image_features, 5, 0)).all()


def test_bad_image_inputs_give_one_line_errors(section):
    bare = section.copy()
    del bare.uns["spatial"]
    with pytest.raises(ValueError, match="image='auto' found no image"):
        spavae.SpaVAE(bare, image="auto")
    with pytest.raises(ValueError, match="image_weight must be a finite number > 0"):
        quiet_model(section, image="lowres", image_weight=0.0)
    plain = quiet_model(section, seed=0)
    with pytest.raises(ValueError, match="the model has no image view"):
        spavae.SpaVAE(section, setup=plain.setup, image="lowres")


def test_a_section_written_as_a_space_ranger_folder_reads_back(section, tmp_path):
    folder = write_visium(section, tmp_path / "outs")
    back = spavae.read(folder)
    np.testing.assert_array_equal(back.X.toarray(), section.X)
    np.testing.assert_allclose(back.obsm["spatial"], section.obsm["spatial"], rtol=1e-15)
    np.testing.assert_array_equal(back.obs["array_row"], section.obs["array_row"])
    library = next(iter(back.uns["spatial"].values()))
    for key in ("hires", "lowres"):  # PNG: 8 bits per channel
        np.testing.assert_allclose(library["images"][key][..., :3], section.uns["spatial"]["simulated"]["images"][key],
                                   atol=1 / 255)
    assert library["scalefactors"] == section.uns["spatial"]["simulated"]["scalefactors"]
    with pytest.raises(ValueError, match="exists; give a new folder"):
        write_visium(section, folder)
    no_rows = section.copy()
    del no_rows.obs["array_row"]
    with pytest.raises(ValueError, match="array row and column"):
        write_visium(no_rows, tmp_path / "other")


def test_spavae_run_with_the_image_of_a_space_ranger_folder(section, tmp_path, capsys):
    folder = write_visium(section, tmp_path / "outs")
    out = tmp_path / "run"
    code = main(["run", str(folder), "--image", "lowres", "--image-weight", "2", "--out", str(out), "--epochs", "2",
                 "--n-domains", "5", "--quiet", "--threads", "1"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "image: 6 colour_texture features per spot from kind=uns, image=lowres" in printed.out
    assert "(image_weight=2); 0 of 144 spots without usable features" in printed.out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["image"]["weight"] == 2.0 and metrics["image"]["features"] == list(COLOUR_FEATURES)
    assert (out / "domains_on_image.png").read_bytes()[:4] == b"\x89PNG"
    loaded = spavae.SpaVAE.load(out / "model.pt", spavae.read(folder))
    assert loaded.setup.image == spavae.SpaVAE.load(out / "model.pt", spavae.read(folder)).setup.image
    np.testing.assert_allclose(loaded.get_latent_representation(),
                               spavae.read_h5ad(out / "results.h5ad").obsm["X_spavae"], rtol=1e-5, atol=1e-6)

    assert main(["run", str(folder), "--image", "hires.png", "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    assert "image='hires.png' is neither an image of uns['spatial']" in capsys.readouterr().err
