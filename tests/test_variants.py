"""The model family: section kernel and batch integration, Bernoulli peaks, NB-mixture proteins, the
linear-decoder SVG variant, kernel swapping and the learned q(u), each against an independent computation."""

import numpy as np
import pytest
import torch
from gpytorch.kernels import MaternKernel, ScaleKernel
from pyro import poutine
from scipy import stats
from scipy.special import logsumexp

import spavae
from spavae.analysis import cluster_kmeans, score_clustering
from spavae.analysis.svg import spatial_scores, spatially_variable_genes
from spavae.api import VARIANTS
from spavae.data.simulate import add_protein_counts, simulate_sections, simulate_svg_counts
from spavae.gp import CauchyKernel, SectionKernel, SpatialGP
from spavae.likelihoods import BernoulliObservation, NegativeBinomialMixture
from spavae.model import Batch

D = torch.float64


def test_section_kernel_is_zero_across_sections_and_per_section_within():
    gen = torch.Generator().manual_seed(0)
    pos = torch.rand(6, 2, generator=gen, dtype=D) * 20
    onehot = torch.tensor([[1, 0], [1, 0], [1, 0], [0, 1], [0, 1], [0, 1]], dtype=D)
    x = torch.cat([pos, onehot], 1)
    kernel = SectionKernel(CauchyKernel(20.0), 2).double()
    kernel.spatials[1].raw_scale.data.fill_(5.0)
    k = kernel(x).to_dense().detach()
    assert torch.all(k[:3, 3:] == 0) and torch.all(k[3:, :3] == 0)
    torch.testing.assert_close(k[:3, :3], CauchyKernel(20.0).double()(pos[:3]).to_dense().detach())
    torch.testing.assert_close(k[3:, 3:], CauchyKernel(5.0).double()(pos[3:]).to_dense().detach())
    torch.testing.assert_close(kernel(x, diag=True).detach(), torch.ones(6, dtype=D))
    shared = SectionKernel(CauchyKernel(20.0), 2, per_section=False)
    assert len(list(shared.parameters())) == 1 and kernel.scale.shape == (2,)


def test_batch_model_scales_per_section_and_conditions_on_sections():
    adata = simulate_sections(n_rows=10, n_cols=10, n_genes=40, n_domains=3, seed=0)
    adata.obsm["spatial"][adata.obs["section"] == "section1"] *= 3.0  # another coordinate frame
    model = spavae.SpaVAE(adata, batch_key="section", device="cpu", inducing_steps=3)
    locations = model.data.locations.numpy()
    frames = [locations[locations[:, 2 + b] == 1, :2] for b in range(2)]
    for b, scaled in enumerate(frames):  # each section in its own frame, from 0 and spanning its extent
        np.testing.assert_allclose(scaled.min(0), 0, atol=1e-12)
        np.testing.assert_allclose(scaled.max(0), model.setup.frames[b].extent, rtol=1e-9)
    # the same lattice in units 3 times larger gets the same GP inputs: the frame is free of units
    np.testing.assert_allclose(frames[1], frames[0], atol=1e-9)
    assert model.module.gp.variational_strategy.inducing_points.shape[1] == 4
    assert model.module.observations[0].raw_dispersion.shape == (2, 40)
    assert model.module.encoder.trunk[0].in_features == 40 + 2
    model.train(max_epochs=2, progress=False)
    assert np.isfinite(model.get_latent_representation()).all()
    with pytest.raises(KeyError, match="no column 'slice'"):
        spavae.SpaVAE(adata, batch_key="slice")


def test_gene_batch_dispersion_picks_the_spot_section():
    adata = simulate_sections(n_rows=6, n_cols=6, n_genes=10, n_domains=2, seed=1)
    model = spavae.SpaVAE(adata, batch_key="section", device="cpu", dtype="float64")
    observation = model.module.observations[0]
    observation.raw_dispersion.data = torch.tensor([[0.0] * 10, [1.0] * 10], dtype=D)
    covariates = model.data.covariates[[0, 40]]
    torch.testing.assert_close(observation.theta(covariates), torch.tensor([[1.0] * 10, [np.e] * 10], dtype=D))


def test_bernoulli_observation_matches_binary_cross_entropy():
    torch.manual_seed(0)
    observation = BernoulliObservation(7, 3, n_input=7, decoder_layers=(8,), spot_factor_layers=(5,)).double().eval()
    observation.peak_bias.data = torch.linspace(-1, 1, 7, dtype=D)
    y = torch.bernoulli(torch.full((4, 7), 0.4, dtype=D))
    z = torch.randn(4, 3, dtype=D)
    batch = Batch(y, None, y, torch.ones(4, dtype=D))
    trace = poutine.trace(observation.model).get_trace(z, batch)
    got = trace.nodes["peaks"]["fn"].log_prob(y).detach().numpy()
    with torch.no_grad():
        h = torch.sigmoid(observation.head(observation.trunk(z)))
        p = (torch.sigmoid(observation.spot_factor(y)) * h * torch.sigmoid(observation.peak_bias)).numpy()
    expected = (y.numpy() * np.log(p) + (1 - y.numpy()) * np.log1p(-p)).sum(1)
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    np.testing.assert_allclose(observation.denoise(z, batch).detach().numpy(), h.numpy())


def test_nb_mixture_log_prob_and_sampling():
    bg, fg = torch.tensor([2.0, 5.0], dtype=D), torch.tensor([9.0, 30.0], dtype=D)
    theta, logit = torch.tensor([3.0, 1.5], dtype=D), torch.tensor([0.7, -1.2], dtype=D)
    mixture = NegativeBinomialMixture(bg, fg, theta, logit)
    y = torch.tensor([4.0, 12.0], dtype=D)
    p = torch.sigmoid(logit).numpy()
    nb = lambda m: stats.nbinom.logpmf(y.numpy(), theta.numpy(), theta.numpy() / (theta.numpy() + m))  # noqa: E731
    expected = logsumexp([np.log(p) + nb(bg.numpy()), np.log1p(-p) + nb(fg.numpy())], axis=0)
    np.testing.assert_allclose(mixture.log_prob(y).numpy(), expected, rtol=1e-10)
    torch.manual_seed(0)
    draws = mixture.sample((40000,))
    np.testing.assert_allclose(draws.mean(0).numpy(), mixture.mean.numpy(), rtol=0.03)


@pytest.fixture(scope="module")
def protein_model():
    adata = add_protein_counts(spavae.simulate_spatial_counts(n_rows=14, n_cols=14, n_genes=50, n_domains=3, seed=2),
                               n_proteins=6, seed=2)
    model = spavae.SpaVAE(adata, protein_key="protein_expression", device="cpu", dtype="float64")
    return adata, model.train(max_epochs=3, progress=False)


def test_protein_loss_terms_match_an_independent_computation(protein_model):
    adata, model = protein_model
    module = model.module
    module.eval()
    batch = model.data.batch(torch.arange(20))
    torch.manual_seed(0)
    out = module.loss(batch, beta=10.0)
    torch.manual_seed(0)  # replay: z_gp, z_gauss, then the protein background draw of the guide
    post = module.posterior(batch.expression, batch.locations)
    z = post.mean + post.var.sqrt() * torch.cat([torch.empty(20, 2, dtype=D).normal_(),
                                                 torch.empty(20, 8, dtype=D).normal_()], 1)
    proteins = module.observations[1]
    with torch.no_grad():
        h = proteins.heads(z, batch)
        v = torch.distributions.LogNormal(h["background_loc"], h["background_scale"]).rsample()
        prior = torch.distributions.Normal(proteins.prior_mean, proteins.prior_log_sd.exp())
        kl_background = torch.distributions.kl_divergence(torch.distributions.Normal(h["background_loc"],
                                                                                     h["background_scale"]), prior).sum()
        y = batch.counts[:, 50:].numpy()
        theta = proteins.theta.numpy()
        p_bg = torch.sigmoid(h["logit"]).numpy()
        log_nb = lambda m: stats.nbinom.logpmf(y, theta, theta / (theta + m))  # noqa: E731
        protein_ll = logsumexp([np.log(p_bg) + log_nb(v.numpy()),
                                np.log1p(-p_bg) + log_nb(((1 + h["alpha"]) * v).numpy())], axis=0).sum()
        genes = module.observations[0]
        gene_ll = genes.distribution(genes.denoise(z, batch), batch).log_prob(batch.counts[:, :50]).sum().item()
    assert out.kl_other.item() == pytest.approx(kl_background.item(), rel=1e-9)
    assert out.nb.item() == pytest.approx(-(protein_ll + gene_ll), rel=1e-9)
    assert out.loss.item() == pytest.approx((out.nb + 10 * (out.kl_gp + out.kl_gauss) + out.kl_other).item(), rel=1e-12)


def test_protein_outputs(protein_model):
    adata, model = protein_model
    torch.manual_seed(0)  # the background and mixing draws of the protein denoising use the global generator
    denoised = model.get_denoised_counts(n_samples=2, modality="proteins")
    assert denoised.shape == (adata.n_obs, 6) and len(np.unique(denoised)) > 100
    copy = adata.copy()
    torch.manual_seed(0)
    model.write_results(copy, n_samples=2)  # the gene layer draws from the model's own seeded generator only
    np.testing.assert_array_equal(copy.obsm["spavae_denoised_proteins"], denoised)
    np.testing.assert_array_equal(copy.layers["spavae_denoised"], model.get_denoised_counts(n_samples=2))
    with pytest.raises(ValueError, match="modality must be"):
        model.get_denoised_counts(modality="peaks")


def test_linear_decoder_and_spatial_score_formula():
    adata = simulate_svg_counts(n_rows=8, n_cols=8, n_spatial=5, n_nonspatial=5, seed=0)
    model = spavae.SpaVAE.from_variant("spaLDVAE", adata, n_gp=3, device="cpu", dtype="float64")
    assert model.module.n_gauss == 3 and model.module.gp.covar_module.lengthscale.shape == (3, 1, 1)
    model.train(max_epochs=2, progress=False, **VARIANTS["spaLDVAE"]["train"])
    mean, var = model.latent_posterior()
    weights = model.module.observations[0].decoder.weight.detach()
    with torch.no_grad():
        z = torch.randn(64, 6, dtype=D)
        batch = Batch(None, None, None, torch.ones(64, dtype=D))
        torch.testing.assert_close(model.module.denoise(z, batch), torch.exp(z) @ torch.exp(weights))
    # independent: Monte-Carlo E[exp z] instead of the closed form
    draws = torch.exp(mean + var.sqrt() * torch.randn(20000, *mean.shape, dtype=D)).mean(0)
    contribution = draws.sum(0)[:, None] * torch.exp(weights)
    expected = (contribution[:3].sum(0) / contribution.sum(0)).numpy()
    np.testing.assert_allclose(spatial_scores(model)["spatial_score"].to_numpy(), expected, rtol=1e-2)
    with pytest.raises(ValueError, match="linear-decoder variant"):
        spatial_scores(spavae.SpaVAE(adata, device="cpu").train(max_epochs=1, progress=False))


@pytest.mark.slow
def test_svg_ranking_finds_planted_spatial_genes_and_permutations_give_pvalues():
    adata = simulate_svg_counts(seed=0)
    model = spavae.SpaVAE.from_variant("spaLDVAE", adata, n_gp=5, device="cpu", inducing_steps=6)  # as docs/sweeps.md
    train = VARIANTS["spaLDVAE"]["train"] | {"beta": 1.0, "max_epochs": 120}
    model.train(progress=False, **train)
    table = spatially_variable_genes(adata, model, n_permutations=1, pooled=True, center=False)
    precision = adata.var.loc[table.index[:30], "is_spatial"].mean()
    assert precision >= 0.6, precision  # chance is 0.3
    assert {"spavae_svg_score", "spavae_svg_rank", "spavae_svg_pvalue"} <= set(adata.var.columns)
    spatial_p = adata.var.loc[adata.var["is_spatial"], "spavae_svg_pvalue"].median()
    other_p = adata.var.loc[~adata.var["is_spatial"], "spavae_svg_pvalue"].median()
    assert spatial_p < other_p


@pytest.mark.slow
def test_peaks_and_proteins_recover_planted_domains():
    peaks = spavae.simulate_spatial_counts(n_rows=20, n_cols=20, n_genes=300, n_domains=3, marker_lfc=1.5, seed=3)
    # The original's 7 x 7 inducing grid in both models: the likelihoods are the point here, and the 13 x 13 grid that
    # a 400-spot section gets by default takes twice the time.
    model = spavae.SpaVAE.from_variant("spaPeakVAE", peaks, encoder_layers=(64, 32), decoder_layers=(32, 64),
                                       device="cpu", inducing_steps=6).train(max_epochs=60, progress=False)
    every_spot = model.data.batch(np.arange(len(model.data)))
    assert set(np.unique(every_spot.counts.numpy())) == {0.0, 1.0}  # the likelihood sees binarised peaks
    torch.testing.assert_close(every_spot.expression, every_spot.counts)  # and so does the encoder
    ari = score_clustering(peaks.obs["ground_truth"], cluster_kmeans(model.get_latent_representation(), 3, n_init=10))
    assert ari["ari"] > 0.5, ari
    rna = add_protein_counts(spavae.simulate_spatial_counts(n_rows=20, n_cols=20, n_genes=60, n_domains=3, seed=4),
                             n_proteins=9, seed=4)
    model = spavae.SpaVAE.from_variant("spaMultiVAE", rna, protein_key="protein_expression", device="cpu",
                                       inducing_steps=6).train(max_epochs=60, progress=False)
    ari = score_clustering(rna.obs["ground_truth"], cluster_kmeans(model.get_latent_representation(), 3, n_init=10))
    assert ari["ari"] > 0.5, ari
    module = model.module.eval()
    mean, _ = model.latent_posterior()
    with torch.no_grad():
        background = module.observations[1].background_probability(mean, model.data.batch(np.arange(rna.n_obs))).numpy()
    foreground = rna.obsm["protein_expression_is_foreground"]
    assert background[foreground].mean() < background[~foreground].mean()


def test_any_gpytorch_kernel_and_named_kernels_train(small_adata):
    kernel = ScaleKernel(MaternKernel(nu=2.5))
    before = kernel.base_kernel.raw_lengthscale.detach().clone()
    model = spavae.SpaVAE(small_adata, kernel=kernel, device="cpu").train(max_epochs=2, progress=False)
    assert model.module.gp.covar_module is kernel and np.isfinite(model.history["train_loss"]).all()
    assert not torch.equal(kernel.base_kernel.raw_lengthscale.detach().cpu(), before)  # training moved the kernel
    for name in ("matern12", "matern32", "matern52"):
        named = spavae.SpaVAE(small_adata, kernel=name, device="cpu")
        assert isinstance(named.module.gp.covar_module, MaternKernel)
        assert named.module.gp.covar_module.lengthscale.item() == pytest.approx(20.0, rel=1e-4)


def test_learned_q_u_is_a_global_function_of_location(small_adata):
    model = spavae.SpaVAE(small_adata, variational="learned", device="cpu").train(max_epochs=2, progress=False)
    gp = model.module.gp
    strategy = gp.variational_strategy
    x = model.data.locations[:50]
    gp.condition_on(x, torch.randn(50, 2, dtype=D), torch.ones(50, 2, dtype=D), 256)  # no effect: q(u) is global
    mean_a, _ = gp.marginals(x)
    gp.condition_on(x, torch.randn(50, 2, dtype=D) * 5, torch.ones(50, 2, dtype=D), 256)
    mean_b, _ = gp.marginals(x)
    torch.testing.assert_close(mean_a, mean_b)
    q_u = strategy.variational_distribution
    kl = torch.distributions.kl_divergence(
        torch.distributions.MultivariateNormal(q_u.mean, q_u.covariance_matrix),
        torch.distributions.MultivariateNormal(torch.zeros_like(q_u.mean), strategy.prior_distribution.covariance_matrix))
    torch.testing.assert_close(strategy.kl_divergence(), kl, rtol=1e-6, atol=1e-8)
    assert any(p.requires_grad for n, p in gp.named_parameters() if "variational" in n)


def test_variant_presets_and_errors(small_adata):
    assert set(VARIANTS) == {"spaVAE", "spaVAE_Batch", "spaLDVAE", "spaPeakVAE", "spaMultiVAE"}
    with pytest.raises(ValueError, match="unknown variant"):
        spavae.SpaVAE.from_variant("spaXVAE", small_adata)
    with pytest.raises(KeyError, match="no 'proteins' with protein counts"):
        spavae.SpaVAE(small_adata, protein_key="proteins")
    with pytest.raises(ValueError, match="likelihood must be 'nb' or 'bernoulli', got 'poisson'"):
        spavae.SpaVAE(small_adata, likelihood="poisson")
    with pytest.raises(ValueError, match="single section"):
        one = small_adata.copy()
        one.obs["section"] = "a"
        spavae.SpaVAE(one, batch_key="section")
    with pytest.raises(ValueError, match="variational must be"):
        SpatialGP(torch.zeros(4, 2), 2, variational="free")


@pytest.mark.parametrize("script,args,reports", [
    ("svg_spaldvae.py", ["--epochs", "2", "--permutations", "1"], ["precision of the top 30 spatial scores:"]),
    ("batch_integration.py", ["--epochs", "2"], ["section0 {'ari':", "section1 {'ari':"]),
    ("atac_peaks.py", ["--epochs", "2"], ["{'ari':", "denoised peak probabilities: (400, 300)"]),
    ("rna_protein.py", ["--epochs", "2", "--figure", "fig.png"], ["{'ari':", "mean P(background): true background"]),
    ("kernel_swap.py", ["--epochs", "1"], ["learned q(u), cauchy: {'ari':"]),
])
def test_variant_examples_run(script, args, reports, tmp_path, monkeypatch, capsys):
    import runpy
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "variants" / script
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    runpy.run_path(str(path), run_name="__main__")
    printed = capsys.readouterr().out
    for report in reports:  # each example prints the result it is about
        assert report in printed, (report, printed)
    if script == "rna_protein.py":
        assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"
