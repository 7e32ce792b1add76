"""The Pyro model/guide and the total loss against a plain-torch computation of ALGORITHM section 13; seeding."""

import math
import random

import numpy as np
import pytest
import torch
from pyro.infer import Predictive, TraceMeanField_ELBO

from spavae import SpaVAE
from spavae.gp import CauchyKernel, SpatialGP
from spavae.likelihoods import NegativeBinomialObservation, nb_log_prob
from spavae.data.batch import Batch
from spavae.model import SpaVAEModule

D = torch.float64


def make_module(n_genes=30, n_obs=500, n_gauss=3, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    inducing = torch.cartesian_prod(torch.linspace(0, 20, 4, dtype=D), torch.linspace(0, 20, 4, dtype=D))
    gp = SpatialGP(inducing, 2, CauchyKernel(20.0), jitter=1e-10)
    observations = [NegativeBinomialObservation(n_genes, 2 + n_gauss, (16,))]
    return SpaVAEModule(n_genes, gp, n_gauss, n_obs, observations, encoder_layers=(16, 8), dropout=dropout).double()


def make_batch(n=40, n_genes=30, seed=1):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.poisson(torch.full((n, n_genes), 3.0, dtype=D), generator=gen)
    sf = counts.sum(1) / counts.sum(1).median()
    expr = torch.randn(n, n_genes, generator=gen, dtype=D)
    return Batch(expr, torch.rand(n, 2, generator=gen, dtype=D) * 20, counts, sf)


def reference_posterior(module, batch):
    """Section 13's q(z) and KL terms in plain torch with explicit inverses, given the module's encoder.

    Returns ``(mean, var, kl_gp, kl_gauss)`` with ``mean``/``var`` of width D (GP dimensions first).
    """
    omega, phi2 = module.encoder(batch.expression)
    w, v = omega[:, :2], phi2[:, :2]
    s = module.gp.covar_module.scale.reshape(())
    sq = lambda a, b: ((a[:, None] - b[None]) ** 2).sum(-1)  # noqa: E731
    p = module.gp.variational_strategy.inducing_points
    kpp, kbp = 1 / (1 + sq(p, p) / s), 1 / (1 + sq(batch.locations, p) / s)
    kpp_inv = torch.linalg.inv(kpp)
    b, n_obs = len(w), module.n_obs
    ms, bs, kls = [], [], []
    for l in range(2):
        sigma_inv = torch.linalg.inv(kpp + n_obs / b * kbp.T @ torch.diag(1 / v[:, l]) @ kbp)
        mu = n_obs / b * kpp @ sigma_inv @ kbp.T @ (w[:, l] / v[:, l])
        a = kpp @ sigma_inv @ kpp
        ms.append(kbp @ kpp_inv @ mu)
        bs.append(1 - ((kbp @ kpp_inv) * kbp).sum(1) + ((kbp @ kpp_inv @ a @ kpp_inv) * kbp).sum(1))
        kls.append(0.5 * (torch.logdet(kpp) - torch.logdet(a) - len(p) + torch.trace(kpp_inv @ a)
                          + mu @ kpp_inv @ mu))
    m, bb = torch.stack(ms, 1), torch.stack(bs, 1)
    ce = (-0.5 * (math.log(2 * math.pi) + v.log() + (bb + (m - w) ** 2) / v)).sum()
    evidence = ce - b / n_obs * sum(kls)  # ell == C on the batch (ALGORITHM 3.4)
    kl_gp = ce - evidence
    kl_gauss = 0.5 * (phi2[:, 2:] + omega[:, 2:] ** 2 - 1 - phi2[:, 2:].log()).sum()
    return torch.cat([m, omega[:, 2:]], 1), torch.cat([bb, phi2[:, 2:]], 1), kl_gp, kl_gauss


def reference_nb(module, batch, mean, var, eps):
    """NB negative log-likelihood of the counts at ``z = mean + sqrt(var) * eps``, decoded in plain torch."""
    z = mean + var.sqrt() * eps
    rate = module.decoder(z) * batch.size_factors[:, None]
    return -nb_log_prob(batch.counts, rate, module.observations[0].theta()).sum()


def reference_loss(module, batch, beta, eps_gp, eps_gauss):
    """Section 13 in plain torch with explicit inverses, given the module's networks and fixed noise."""
    mean, var, kl_gp, kl_gauss = reference_posterior(module, batch)
    nb = reference_nb(module, batch, mean, var, torch.cat([eps_gp, eps_gauss], 1))
    return nb + beta * (kl_gp + kl_gauss), nb, kl_gp, kl_gauss


def test_total_loss_matches_plain_torch_reference():
    module, batch = make_module(), make_batch()
    module.train()
    torch.manual_seed(7)
    out = module.loss(batch, beta=12.5)
    torch.manual_seed(7)  # the guide draws z_gp then z_gauss with Normal.rsample
    eps_gp, eps_gauss = torch.empty(40, 2, dtype=D).normal_(), torch.empty(40, 3, dtype=D).normal_()
    ref = reference_loss(module, batch, 12.5, eps_gp, eps_gauss)
    for got, want in zip((out.loss, out.nb, out.kl_gp, out.kl_gauss), ref):
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert out.gp_cross_entropy.item() == pytest.approx(out.gp_evidence.item() + out.kl_gp.item(), rel=1e-9)


def test_loss_parts_agree_with_pyro_elbo():
    """Nothing counted twice: Pyro's mean-field ELBO on model/guide gives NB + beta * KL_gauss."""
    module, batch = make_module(), make_batch()
    torch.manual_seed(3)
    out = module.loss(batch, beta=7.0)
    torch.manual_seed(3)
    elbo_loss = TraceMeanField_ELBO().differentiable_loss(module.model, module.guide, *batch.args(), beta=7.0)
    assert elbo_loss.item() == pytest.approx((out.nb + 7.0 * out.kl_gauss).item(), rel=1e-9)
    assert out.loss.item() == pytest.approx(elbo_loss.item() + 7.0 * out.kl_gp.item(), rel=1e-9)


def test_gradients_reach_every_part():
    module, batch = make_module(), make_batch()
    module.loss(batch, beta=10.0, noise=0.5).loss.backward()
    for name, param in module.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert module.gp.covar_module.raw_scale.grad.abs().item() > 0


def test_noise_regulariser_is_weighted_by_genes_over_gp_dims():
    module, batch = make_module(), make_batch()
    module.eval()
    torch.manual_seed(0)
    out = module.loss(batch, beta=10.0, noise=1.0)
    assert out.noise.item() > 0
    torch.manual_seed(0)
    plain = module.loss(batch, beta=10.0)
    post = module.posterior(batch.expression, batch.locations)
    torch.manual_seed(0)  # replay the draws of loss(): z_gp, z_gauss, then the input noise
    torch.empty(40, 2, dtype=D).normal_(), torch.empty(40, 3, dtype=D).normal_()
    raw = module.noise_regularizer(batch, post, 1.0)
    assert out.noise.item() == pytest.approx(30 / 2 * raw.item(), rel=1e-9)
    assert out.loss.item() == pytest.approx(plain.loss.item() + out.noise.item(), rel=1e-9)


def test_predictive_draws_counts_from_model_and_guide():
    module, batch = make_module(), make_batch()
    module.eval()
    predictive = Predictive(module.model, guide=module.guide, num_samples=4, return_sites=["counts", "z_gp"])
    with torch.no_grad():
        draws = predictive(batch.expression, batch.locations, None, batch.size_factors)
    assert draws["counts"].shape == (4, 40, 30)
    assert (draws["counts"] >= 0).all() and (draws["counts"] == draws["counts"].round()).all()
    assert draws["z_gp"].shape == (4, 40, 2)


def test_parameter_count_of_the_original_architecture():
    inducing = torch.zeros(49, 2, dtype=D)
    module = SpaVAEModule(3000, SpatialGP(inducing, 2, CauchyKernel(20.0)), 8, 3639,
                          [NegativeBinomialObservation(3000, 10)])
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == 785_733


def global_random_state() -> tuple:
    """The global generators of Python, NumPy and torch (Pyro draws from these), comparable with ``==``."""
    name, keys, *rest = np.random.get_state()
    return random.getstate(), (name, keys.tolist(), *rest), torch.get_rng_state().tolist()


def test_building_training_and_loading_leave_the_global_random_state_alone(small_adata, tmp_path):
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    before = global_random_state()
    model = SpaVAE(small_adata, seed=0, device="cpu")
    assert global_random_state() == before
    model.train(max_epochs=1, progress=False)
    assert global_random_state() == before
    model.save(tmp_path / "model.pt")
    SpaVAE.load(tmp_path / "model.pt", small_adata)
    assert global_random_state() == before


def test_the_same_seed_gives_the_same_model_and_training_whatever_the_global_state(small_adata):
    def trained(seed, global_seed):
        torch.manual_seed(global_seed), np.random.seed(global_seed), random.seed(global_seed)
        model = SpaVAE(small_adata, seed=seed, device="cpu")
        initial = {k: v.clone() for k, v in model.module.state_dict().items()}
        model.train(max_epochs=2, progress=False)
        return initial, model

    (first_init, first), (second_init, second) = trained(0, 1), trained(0, 2)
    other_init, _ = trained(1, 1)
    for key, value in first_init.items():
        assert torch.equal(value, second_init[key]), key
    assert any(not torch.equal(value, other_init[key]) for key, value in first_init.items())
    assert first.history["train_loss"].tolist() == second.history["train_loss"].tolist()
    np.testing.assert_array_equal(first.get_latent_representation(), second.get_latent_representation())
