"""Every SVGP quantity against a dense float64 computation written independently here (explicit inverses)."""

import ast
import inspect
import math

import numpy as np
import pytest
import torch
from gpytorch.kernels import MaternKernel, ScaleKernel
from gpytorch.variational import CholeskyVariationalDistribution, UnwhitenedVariationalStrategy

from spavae.gp import CauchyKernel, SpatialGP, gauss_cross_entropy, svgp

D = torch.float64
N_OBS = 400.0


def cauchy_matrix(a, b, s):
    return 1.0 / (1.0 + ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1) / s)


def dense_reference(kpp, kbp, kbb_diag, omega, phi2, n_obs):
    """Section 3 of ALGORITHM.md in numpy, one GP dimension at a time, with explicit inverses."""
    b, p = kbp.shape
    scale = n_obs / b
    kpp_inv = np.linalg.inv(kpp)
    out = {k: [] for k in ("sigma", "mu", "A", "m", "B", "ell", "kl")}
    for l in range(omega.shape[1]):
        lam_inv = np.diag(1.0 / phi2[:, l])
        sigma = kpp + scale * kbp.T @ lam_inv @ kbp
        sigma_inv = np.linalg.inv(sigma)
        mu = scale * kpp @ sigma_inv @ kbp.T @ lam_inv @ omega[:, l]
        a = kpp @ sigma_inv @ kpp
        m = kbp @ kpp_inv @ mu
        k_tilde = kbb_diag - np.einsum("ip,pq,iq->i", kbp, kpp_inv, kbp)
        trace = np.einsum("ip,pq,qr,rs,is->i", kbp, kpp_inv, a, kpp_inv, kbp)
        ell = (-0.5 * (math.log(2 * math.pi) + np.log(phi2[:, l]) + (omega[:, l] - m) ** 2 / phi2[:, l])
               - (k_tilde + trace) / (2 * phi2[:, l]))
        kl = 0.5 * (np.linalg.slogdet(kpp)[1] - np.linalg.slogdet(a)[1] - p + np.trace(kpp_inv @ a)
                    + mu @ kpp_inv @ mu)
        for key, value in zip(out, (sigma, mu, a, m, k_tilde + trace, ell, kl)):
            out[key].append(value)
    return {k: np.array(v) for k, v in out.items()}


@pytest.fixture
def problem():
    gen = torch.Generator().manual_seed(3)
    inducing = torch.rand(16, 2, generator=gen, dtype=D) * 20
    x = torch.rand(50, 2, generator=gen, dtype=D) * 20
    omega = torch.randn(50, 2, generator=gen, dtype=D)
    phi2 = torch.rand(50, 2, generator=gen, dtype=D) * 0.5 + 0.05
    return inducing, x, omega, phi2


def test_every_quantity_matches_dense_algebra(problem):
    inducing, x, omega, phi2 = problem
    gp = SpatialGP(inducing, 2, CauchyKernel(20.0), jitter=1e-10).double()
    terms = gp.batch_terms(x, omega, phi2, N_OBS)
    s = float(gp.covar_module.scale)
    ref = dense_reference(cauchy_matrix(inducing, inducing, s).numpy(), cauchy_matrix(x, inducing, s).numpy(),
                          np.ones(50), omega.numpy(), phi2.numpy(), N_OBS)
    strategy = gp.variational_strategy
    q_u = strategy.variational_distribution
    sigma = strategy._sigma_chol @ strategy._sigma_chol.transpose(-1, -2)
    np.testing.assert_allclose(sigma.detach().numpy(), ref["sigma"], rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(q_u.mean.detach().numpy(), ref["mu"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(q_u.covariance_matrix.detach().numpy(), ref["A"], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(terms.mean.T.detach().numpy(), ref["m"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(terms.var.T.detach().numpy(), ref["B"], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(terms.kl_u.detach().numpy(), ref["kl"], rtol=1e-6)
    np.testing.assert_allclose(terms.expected_log_lik.item(), ref["ell"].sum(), rtol=1e-9)
    # Pearce identity (ALGORITHM 3.4): sum C = sum ell, so KL_GP = (b/N) sum_l KL_l
    assert terms.cross_entropy.item() == pytest.approx(ref["ell"].sum(), rel=1e-9)
    assert terms.kl_gp.item() == pytest.approx(50 / N_OBS * ref["kl"].sum(), rel=1e-6)


def test_cross_entropy_formula():
    m, b, w, v = (torch.tensor([0.3], dtype=D), torch.tensor([0.2], dtype=D), torch.tensor([-0.1], dtype=D),
                  torch.tensor([0.5], dtype=D))
    expected = -0.5 * (1.8378770664093453 + math.log(0.5) + (0.2 + 0.16) / 0.5)
    assert gauss_cross_entropy(m, b, w, v).item() == pytest.approx(expected, abs=1e-14)
    # Monte-Carlo check of E_{z~N(m,B)} log N(w | z, v)
    z = m + b.sqrt() * torch.randn(400000, dtype=D, generator=torch.Generator().manual_seed(0))
    mc = torch.distributions.Normal(z, v.sqrt()).log_prob(w).mean()
    assert mc.item() == pytest.approx(expected, abs=5e-3)


def test_closed_form_is_the_batch_optimum(problem):
    """Perturbing q(u) away from (mu_hat, A_hat) lowers sum(ell) - (b/N) KL."""
    inducing, x, omega, phi2 = problem
    s = 20.000000002061
    kpp = cauchy_matrix(inducing, inducing, s).numpy()
    kbp = cauchy_matrix(x, inducing, s).numpy()
    kpp_inv = np.linalg.inv(kpp)
    ref = dense_reference(kpp, kbp, np.ones(50), omega.numpy(), phi2.numpy(), N_OBS)

    def objective(mu, a, l):
        m = kbp @ kpp_inv @ mu
        k_tilde = 1 - np.einsum("ip,pq,iq->i", kbp, kpp_inv, kbp)
        trace = np.einsum("ip,pq,qr,rs,is->i", kbp, kpp_inv, a, kpp_inv, kbp)
        w, v = omega.numpy()[:, l], phi2.numpy()[:, l]
        ell = -0.5 * (np.log(2 * np.pi) + np.log(v) + (w - m) ** 2 / v) - (k_tilde + trace) / (2 * v)
        kl = 0.5 * (np.linalg.slogdet(kpp)[1] - np.linalg.slogdet(a)[1] - len(mu) + np.trace(kpp_inv @ a)
                    + mu @ kpp_inv @ mu)
        return ell.sum() - 50 / N_OBS * kl

    rng = np.random.default_rng(0)
    for l in range(2):
        best = objective(ref["mu"][l], ref["A"][l], l)
        root = np.linalg.cholesky(ref["A"][l])
        for _ in range(20):
            mu = ref["mu"][l] + 1e-2 * rng.normal(size=16)
            r = root + 1e-3 * np.tril(rng.normal(size=(16, 16)))
            assert objective(mu, r @ r.T, l) < best


def test_any_gpytorch_kernel_plugs_in(problem):
    inducing, x, omega, phi2 = problem
    kernel = ScaleKernel(MaternKernel(nu=2.5)).double()
    kernel.base_kernel.lengthscale = 4.0
    kernel.outputscale = 1.5
    gp = SpatialGP(inducing, 2, kernel, jitter=1e-10).double()
    terms = gp.batch_terms(x, omega, phi2, N_OBS)
    with torch.no_grad():
        kpp = kernel(inducing).to_dense().numpy()
        kbp = kernel(x, inducing).to_dense().numpy()
    ref = dense_reference(kpp, kbp, np.full(50, 1.5), omega.numpy(), phi2.numpy(), N_OBS)
    np.testing.assert_allclose(terms.mean.T.detach().numpy(), ref["m"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(terms.var.T.detach().numpy(), ref["B"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(terms.kl_u.detach().numpy(), ref["kl"], rtol=1e-5)


def test_per_dimension_kernel_batch(problem):
    inducing, x, omega, phi2 = problem
    kernel = CauchyKernel(10.0, batch_shape=torch.Size([2])).double()
    kernel.raw_scale.data = torch.tensor([5.0, 30.0], dtype=D).view(2, 1, 1)
    gp = SpatialGP(inducing, 2, kernel, jitter=1e-10).double()
    terms = gp.batch_terms(x, omega, phi2, N_OBS)
    for l, raw in enumerate((5.0, 30.0)):
        s = float(torch.nn.functional.softplus(torch.tensor(raw, dtype=D)))
        ref = dense_reference(cauchy_matrix(inducing, inducing, s).numpy(), cauchy_matrix(x, inducing, s).numpy(),
                              np.ones(50), omega.numpy()[:, [l]], phi2.numpy()[:, [l]], N_OBS)
        np.testing.assert_allclose(terms.mean[:, l].detach().numpy(), ref["m"][0], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(terms.kl_u[l].item(), ref["kl"][0], rtol=1e-6)


def test_marginals_at_new_points_and_gradients(problem):
    inducing, x, omega, phi2 = problem
    omega = omega.clone().requires_grad_(True)
    gp = SpatialGP(inducing, 2, CauchyKernel(20.0), jitter=1e-10).double()
    gp.condition_on(x, omega, phi2, N_OBS)
    query = torch.rand(30, 2, dtype=D) * 20
    mean, var = gp.marginals(query)
    s = float(gp.covar_module.scale)
    kpp = cauchy_matrix(inducing, inducing, s).numpy()
    kqp = cauchy_matrix(query, inducing, s).numpy()
    q_u = gp.variational_strategy.variational_distribution
    mu, a = q_u.mean.detach().numpy(), q_u.covariance_matrix.detach().numpy()
    kpp_inv = np.linalg.inv(kpp)
    np.testing.assert_allclose(mean.T.detach().numpy(), np.einsum("qp,pr,lr->lq", kqp, kpp_inv, mu), rtol=1e-6, atol=1e-7)
    b_ref = 1 - np.einsum("ip,pq,iq->i", kqp, kpp_inv, kqp) + np.einsum("ip,pq,lqr,rs,is->li", kqp, kpp_inv, a, kpp_inv, kqp)
    np.testing.assert_allclose(var.T.detach().numpy(), b_ref, rtol=1e-6, atol=1e-8)
    mean.sum().backward()
    assert omega.grad is not None and omega.grad.abs().sum() > 0


def test_unconditioned_gp_explains_itself():
    gp = SpatialGP(torch.rand(9, 2, dtype=D), 2).double()
    with pytest.raises(RuntimeError, match="call SpatialGP.condition_on"):
        gp.marginals(torch.rand(3, 2, dtype=D))


def test_a_training_step_computes_each_kernel_matrix_once():
    """batch_terms evaluates K_pb, K_pp and diag K_bb once each: the marginals reuse the conditioning's K_pb."""
    generator = torch.Generator().manual_seed(0)
    inducing = torch.rand(9, 2, dtype=torch.float64, generator=generator) * 20
    gp = SpatialGP(inducing, 2).double()
    x = torch.rand(30, 2, dtype=torch.float64, generator=generator) * 20
    omega = torch.randn(30, 2, dtype=torch.float64, generator=generator)
    phi2 = torch.rand(30, 2, dtype=torch.float64, generator=generator) + 0.1
    calls = []
    forward = gp.covar_module.forward
    gp.covar_module.forward = lambda x1, x2, diag=False, **kw: calls.append((x1.shape[0], x2.shape[0], diag)) \
        or forward(x1, x2, diag=diag, **kw)
    terms = gp.batch_terms(x, omega, phi2, 300.0)
    assert sorted(calls) == [(9, 9, False), (9, 30, False), (30, 30, True)]
    gp.covar_module.forward = forward
    gp.condition_on(x, omega, phi2, 300.0)
    mean, var = gp.marginals(x.clone())  # another tensor: K_px is computed afresh and agrees
    torch.testing.assert_close(mean, terms.mean)
    torch.testing.assert_close(var, terms.var)


def test_the_svgp_reaches_gpytorch_through_public_names_only(problem):
    """No private member of GPyTorch's strategy or model (an underscore name that GPyTorch, not torch or spavae,
    defines) is used in spavae.gp.svgp, so that a GPyTorch release that renames one cannot break it silently; the
    closed-form q(u) that it sets through its own reference is the one GPyTorch's public property returns."""
    inducing, x, omega, phi2 = problem
    plain = UnwhitenedVariationalStrategy(SpatialGP(inducing, 2), inducing, CholeskyVariationalDistribution(16))
    gpytorch_private = {name for name in dir(plain) if name.startswith("_") and not name.startswith("__")}
    gpytorch_private -= set(dir(torch.nn.Module())) | {"_VariationalDistribution"}  # the exported base class
    tree = ast.parse(inspect.getsource(svgp))
    own = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)} | {
        node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)}
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert sorted((used & gpytorch_private) - own) == []
    gp = SpatialGP(inducing, 2, CauchyKernel(20.0)).double()
    gp.eval()
    for rows in (slice(0, 25), slice(25, 50)):  # the public property's memo is dropped at each conditioning
        gp.condition_on(x[rows], omega[rows], phi2[rows], N_OBS)
        torch.testing.assert_close(gp.variational_strategy.variational_distribution.mean,
                                   gp.posterior_state()["mean"])
