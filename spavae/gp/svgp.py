r"""The sparse variational GP of spaVAE on GPyTorch (ALGORITHM section 3).

One independent GP per GP latent dimension (``batch_shape = [L]``) over the 2-D spot locations, with
inducing points :math:`P`. The encoder's means :math:`\tilde\omega` and variances :math:`\tilde\phi^2` of a
mini-batch act as heteroscedastic pseudo-observations, and :math:`q(u_l) = N(\hat\mu_l, \hat A_l)` is their
closed-form optimum (Titsias 2009, Jazbec et al. 2021):

.. math::
    \Sigma_l = K_{pp} + \tfrac{N}{b} K_{pb}\Lambda_l^{-1}K_{bp},\quad
    \hat\mu_l = \tfrac{N}{b} K_{pp}\Sigma_l^{-1}K_{pb}\Lambda_l^{-1}\tilde\omega_l,\quad
    \hat A_l = K_{pp}\Sigma_l^{-1}K_{pp}.

:class:`BatchOptimalVariationalDistribution` returns that :math:`q(u)` to GPyTorch, and
:class:`BatchOptimalVariationalStrategy` (an unwhitened ``VariationalStrategy``) turns it into the
marginals :math:`q(z_{il}) = N(m_{il}, B_{il})` at any locations and into :math:`KL(q(u_l) \| p(u_l))`.
All the algebra uses Cholesky solves in the GP dtype (float64 by default); no explicit inverse and no
``b x p x p`` tensor is formed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from gpytorch.distributions import MultivariateNormal
from gpytorch.kernels import Kernel
from gpytorch.likelihoods import FixedNoiseGaussianLikelihood
from gpytorch.means import ZeroMean
from gpytorch.models import ApproximateGP
from gpytorch.utils.memoize import cached, clear_cache_hook
from gpytorch.variational import CholeskyVariationalDistribution, UnwhitenedVariationalStrategy, _VariationalDistribution
from linear_operator.operators import DiagLinearOperator, RootLinearOperator

LOG_2PI = math.log(2.0 * math.pi)


def gauss_cross_entropy(mean: torch.Tensor, var: torch.Tensor, omega: torch.Tensor, phi2: torch.Tensor) -> torch.Tensor:
    r"""Pearce (2020) term :math:`C = E_{z \sim N(m, B)}[\log N(\tilde\omega \mid z, \tilde\phi^2)]`, elementwise.

    This is the *negative* cross-entropy: :math:`-\tfrac12[\log 2\pi + \log\tilde\phi^2 +
    (B + (m - \tilde\omega)^2)/\tilde\phi^2]`.
    """
    return -0.5 * (LOG_2PI + phi2.log() + (var + (mean - omega).square()) / phi2)


class BatchOptimalVariationalDistribution(_VariationalDistribution):
    """:math:`q(u_l) = N(\\hat\\mu_l, \\hat A_l)` set from a batch of encoder outputs, not learned.

    It holds no parameters: :meth:`BatchOptimalVariationalStrategy.condition` stores the closed-form
    optimum, with the covariance kept as a root (:math:`\\hat A = R R^T`) so that no extra factorisation
    is needed downstream.
    """

    def __init__(self, num_inducing_points: int, batch_shape: torch.Size = torch.Size([])):
        super().__init__(num_inducing_points, batch_shape)
        self.mean: torch.Tensor | None = None
        self.covar_root: torch.Tensor | None = None

    def set_state(self, mean: torch.Tensor, covar_root: torch.Tensor) -> None:
        """Store :math:`\\hat\\mu` (``L x p``) and a root :math:`R` of :math:`\\hat A` (``L x p x p``)."""
        self.mean, self.covar_root = mean, covar_root

    def forward(self) -> MultivariateNormal:
        if self.mean is None:
            raise RuntimeError(
                "q(u) of spaVAE is the closed-form optimum for a batch of encoder outputs: call "
                "SpatialGP.condition_on(locations, omega, phi2, n_obs) before evaluating the GP"
            )
        return MultivariateNormal(self.mean, RootLinearOperator(self.covar_root))

    def initialize_variational_distribution(self, prior_dist: MultivariateNormal) -> None:
        """Nothing to initialise: q(u) is a deterministic function of the conditioning batch."""


class BatchOptimalVariationalStrategy(UnwhitenedVariationalStrategy):
    """Unwhitened variational strategy that returns only the marginal variances.

    spaVAE needs :math:`m_{il}` and :math:`B_{il}` but never the covariance between spots, so
    :meth:`forward` returns a diagonal ``MultivariateNormal`` in training and evaluation alike: memory is
    ``O(n p)`` for ``n`` query points. It works with any Gaussian :math:`q(u)`; with
    :class:`BatchOptimalVariationalDistribution` it also computes the closed-form :math:`q(u)`
    (:meth:`condition`) and its KL in a form that needs no factorisation of :math:`\\hat A`.
    """

    def __init__(self, model, inducing_points, variational_distribution, learn_inducing_locations=False, jitter_val=1e-8):
        super().__init__(model, inducing_points, variational_distribution, learn_inducing_locations, jitter_val)
        # kept from the last conditioning, so that a training step computes each kernel matrix once
        self._sigma_chol: torch.Tensor | None = None
        self._conditioned_chol: torch.Tensor | None = None  # Cholesky factor of K_pp + jitter
        self._batch_cross: tuple[torch.Tensor, torch.Tensor] | None = None  # (x, K_px) of the conditioning batch

    @property
    def q_u(self) -> _VariationalDistribution:
        """The variational distribution module (GPyTorch registers it under a private name: it is found among the
        strategy's children)."""
        return next(child for child in self.children() if isinstance(child, _VariationalDistribution))

    @property
    @cached(name="prior_distribution_memo")
    def prior_distribution(self) -> MultivariateNormal:
        """:math:`p(u) = N(0, K_{pp} + \\text{jitter} \\cdot I)` with this strategy's jitter."""
        chol = self._prior_cholesky()
        zeros = torch.zeros(chol.shape[:-1], dtype=chol.dtype, device=chol.device)
        return MultivariateNormal(zeros, RootLinearOperator(chol))

    def _prior_cholesky(self) -> torch.Tensor:
        """Cholesky factor of :math:`K_{pp}` + jitter: the one computed with the current q(u), else a fresh one."""
        if self._conditioned_chol is not None:
            return self._conditioned_chol
        return self._inducing_cholesky(self._inducing_covariance())

    @cached(name="inducing_covariance_memo")
    def _inducing_covariance(self) -> torch.Tensor:
        return self.model.covar_module(self.inducing_points).to_dense()

    def _inducing_cholesky(self, k_pp: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(k_pp.shape[-1], dtype=k_pp.dtype, device=k_pp.device)
        return torch.linalg.cholesky(k_pp + self.jitter_val * eye)

    def _cross_covariance(self, inducing_points: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """:math:`K_{px}`, reused when ``x`` is the batch q(u) was just conditioned on (the training step)."""
        if self._batch_cross is not None and self._batch_cross[0] is x and inducing_points is self.inducing_points:
            return self._batch_cross[1]
        return self.model.covar_module(inducing_points, x).to_dense()

    def _forget_batch(self) -> None:
        """Drop the kernel matrices kept from the last conditioning (before a new one, or a restored q(u))."""
        self._batch_cross = self._conditioned_chol = self._sigma_chol = None
        clear_cache_hook(self)  # GPyTorch's memos (p(u), K_pp, the q(u) of variational_distribution)

    def statistics(self, x: torch.Tensor, omega: torch.Tensor, phi2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Sufficient statistics of a batch for :math:`q(u)`: :math:`K_{pb}\Lambda^{-1}K_{bp}` and
        :math:`K_{pb}\Lambda^{-1}\tilde\omega` (``L x p x p`` and ``L x p``).

        They are sums over spots, so the statistics of several chunks add up to those of their union: the
        full-data posterior (:math:`b = N`) is computed chunk by chunk in ``O(p^2)`` memory.

        Parameters
        ----------
        x
            Batch locations, ``b x 2``.
        omega, phi2
            Encoder means and variances of the GP dimensions, ``L x b``.
        """
        precision, rhs, _ = self._statistics(x, omega, phi2)
        return precision, rhs

    def _statistics(self, x, omega, phi2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k_pb = self.model.covar_module(self.inducing_points, x).to_dense()
        weighted = k_pb / phi2.unsqueeze(-2)  # K_pb Lambda^-1, L x p x b
        precision = weighted @ k_pb.transpose(-1, -2)
        rhs = (weighted @ omega.unsqueeze(-1)).squeeze(-1)
        return precision, rhs, k_pb

    def condition_on_statistics(self, precision: torch.Tensor, rhs: torch.Tensor, scale: float) -> None:
        """Set :math:`q(u)` to the closed-form optimum (ALGORITHM 3.1) from :meth:`statistics` and ``scale = N/b``."""
        self._forget_batch()
        k_pp = self.model.covar_module(self.inducing_points).to_dense()
        eye = torch.eye(k_pp.shape[-1], dtype=k_pp.dtype, device=k_pp.device)
        self._conditioned_chol = self._inducing_cholesky(k_pp)
        sigma = k_pp + scale * precision
        sigma_chol = torch.linalg.cholesky(sigma + self.jitter_val * eye)
        mean = (k_pp @ torch.cholesky_solve(scale * rhs.unsqueeze(-1), sigma_chol)).squeeze(-1)
        root = torch.linalg.solve_triangular(sigma_chol, k_pp.expand_as(sigma), upper=False).transpose(-1, -2)
        self._sigma_chol = sigma_chol
        self.q_u.set_state(mean, root)

    def condition(self, x: torch.Tensor, omega: torch.Tensor, phi2: torch.Tensor, scale: float) -> None:
        """Set :math:`q(u)` to the closed-form optimum for the batch (ALGORITHM 3.1).

        Parameters
        ----------
        x
            Batch locations, ``b x 2``.
        omega, phi2
            Encoder means and variances of the GP dimensions, ``L x b``.
        scale
            :math:`N / b`.
        """
        precision, rhs, k_pb = self._statistics(x, omega, phi2)
        self.condition_on_statistics(precision, rhs, scale)
        self._batch_cross = (x, k_pb)

    def kl_divergence(self) -> torch.Tensor:
        r""":math:`KL(q(u_l) \| p(u_l))` for each GP dimension (shape ``L``).

        For the closed-form :math:`q(u)`, :math:`\hat A = K\Sigma^{-1}K` gives
        :math:`KL = \tfrac12[\log|\Sigma| - \log|K| - p + \mathrm{tr}(\Sigma^{-1}K) + \hat\mu^T K^{-1}\hat\mu]`,
        which needs only the Cholesky factors of :math:`\Sigma` and :math:`K`. Any other :math:`q(u)` falls back
        to GPyTorch's generic Gaussian KL.
        """
        if not isinstance(self.q_u, BatchOptimalVariationalDistribution):
            return super().kl_divergence()
        q_u = self.variational_distribution
        k_chol = self._prior_cholesky()
        sigma_chol = self._sigma_chol
        logdet_sigma = 2.0 * sigma_chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        logdet_k = 2.0 * k_chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        trace = torch.linalg.solve_triangular(sigma_chol, k_chol.expand_as(sigma_chol), upper=False).square().sum((-2, -1))
        whitened_mean = torch.linalg.solve_triangular(k_chol, q_u.mean.unsqueeze(-1), upper=False)
        return 0.5 * (logdet_sigma - logdet_k - k_chol.shape[-1] + trace + whitened_mean.square().sum((-2, -1)))

    def forward(self, x, inducing_points, inducing_values, variational_inducing_covar=None, diag=True, **kwargs):
        r"""Marginals :math:`m = K_{xp}K^{-1}\mu`, :math:`B = k_{xx} - k_x^TK^{-1}k_x + k_x^TK^{-1}AK^{-1}k_x`."""
        k_chol = self._prior_cholesky()
        k_px = self._cross_covariance(inducing_points, x)
        k_xx = self.model.covar_module(x, diag=True)
        half = torch.linalg.solve_triangular(k_chol, k_px.expand(*k_chol.shape[:-2], *k_px.shape[-2:]), upper=False)
        interp = torch.linalg.solve_triangular(k_chol.transpose(-1, -2), half, upper=True)  # K^-1 K_px
        mean = (interp * inducing_values.unsqueeze(-1)).sum(-2) + self.model.mean_module(x)
        var = k_xx - half.square().sum(-2)
        if variational_inducing_covar is not None:
            root = variational_inducing_covar.root_decomposition().root.to_dense()
            var = var + (root.transpose(-1, -2) @ interp).square().sum(-2)
        return MultivariateNormal(mean, DiagLinearOperator(var.clamp_min(0.0)))


@dataclass
class GPBatchTerms:
    """GP quantities of one batch, all in the GP dtype.

    Attributes
    ----------
    mean, var
        Posterior marginals :math:`m, B` at the batch locations (``b x L``).
    expected_log_lik
        :math:`\\sum_{i,l} \\ell_{il}` from GPyTorch's Gaussian likelihood (Hensman's data term).
    kl_u
        :math:`KL(q(u_l) \\| p(u_l))` per GP dimension (``L``).
    cross_entropy
        :math:`\\sum_{i,l} C_{il}`, the hand-written Pearce term.
    kl_gp
        :math:`C - E_b` with :math:`E_b = \\sum\\ell - (b/N) \\sum_l KL_l`: the GP part of the KL.
    evidence
        :math:`E_b`.
    """

    mean: torch.Tensor
    var: torch.Tensor
    expected_log_lik: torch.Tensor
    kl_u: torch.Tensor
    cross_entropy: torch.Tensor
    kl_gp: torch.Tensor
    evidence: torch.Tensor

    def share(self, rows: slice, parts: int) -> GPBatchTerms:
        """The marginals of ``rows`` and ``1 / parts`` of every batch sum: one rank's share of a batch split over
        ``parts`` ranks (the shares of all ranks add up to the batch's terms). ``parts = 1`` returns ``self``."""
        if parts == 1:
            return self
        return GPBatchTerms(self.mean[rows], self.var[rows], self.expected_log_lik / parts, self.kl_u / parts,
                            self.cross_entropy / parts, self.kl_gp / parts, self.evidence / parts)


class SpatialGP(ApproximateGP):
    """One independent GP per GP latent dimension over spot locations, with batch-optimal :math:`q(u)`.

    Parameters
    ----------
    inducing_points
        ``p x 2`` inducing locations (in the scaled coordinate frame).
    n_latent
        Number of GP latent dimensions ``L``.
    kernel
        Any GPyTorch kernel; one kernel is shared by all ``L`` dimensions unless its ``batch_shape`` is
        ``[L]``. Defaults to :class:`~spavae.gp.kernels.CauchyKernel` with scale 20.
    learn_inducing_locations
        Train the inducing locations (the original keeps them fixed).
    jitter
        Diagonal jitter added before each Cholesky factorisation (the original uses 1e-8 in float64).
    variational
        ``'closed_form'`` (spaVAE): q(u) is the optimum for each batch of encoder outputs, so the GP posterior is
        amortised through the encoder. ``'learned'``: an ordinary GPyTorch ``CholeskyVariationalDistribution``
        learned as a global parameter; the GP dimensions then become a smooth function of location alone and the
        encoder's GP outputs no longer shape z (they still enter the logged Hensman/Pearce terms, which cancel).
    """

    def __init__(
        self,
        inducing_points: torch.Tensor,
        n_latent: int,
        kernel: Kernel | None = None,
        *,
        learn_inducing_locations: bool = False,
        jitter: float = 1e-8,
        variational: str = "closed_form",
    ):
        if n_latent < 1:
            raise ValueError(f"the GP needs at least one latent dimension, got {n_latent}")
        if variational not in ("closed_form", "learned"):
            raise ValueError(f"variational must be 'closed_form' or 'learned', got {variational!r}")
        inducing_points = torch.as_tensor(inducing_points)
        distribution = (BatchOptimalVariationalDistribution if variational == "closed_form"
                        else CholeskyVariationalDistribution)
        q_u = distribution(inducing_points.shape[0], torch.Size([n_latent]))
        strategy = BatchOptimalVariationalStrategy(
            self, inducing_points, q_u, learn_inducing_locations=learn_inducing_locations, jitter_val=jitter
        )
        super().__init__(strategy)
        if kernel is None:
            from spavae.gp.kernels import CauchyKernel

            kernel = CauchyKernel()
        self.n_latent, self.variational = n_latent, variational
        self.mean_module = ZeroMean()
        self.covar_module = kernel
        self.likelihood = FixedNoiseGaussianLikelihood(noise=torch.ones(1), learn_additional_noise=False)

    def forward(self, x: torch.Tensor) -> MultivariateNormal:
        return MultivariateNormal(self.mean_module(x), self.covar_module(x))

    def condition_on(self, x: torch.Tensor, omega: torch.Tensor, phi2: torch.Tensor, n_obs: float) -> None:
        """Set :math:`q(u)` from encoder outputs ``omega``, ``phi2`` (``b x L``) at locations ``x`` (``b x 2``).

        ``n_obs`` is the :math:`N` of the :math:`N/b` rescaling. A learned q(u) is global: nothing to do.
        """
        if self.variational == "learned":
            return
        self.variational_strategy.condition(x, omega.T, phi2.T, float(n_obs) / x.shape[0])

    def condition_on_chunks(self, chunks) -> None:
        """Set :math:`q(u)` to the posterior given **all** spots (:math:`b = N`), from an iterable of
        ``(x, omega, phi2)`` chunks (``b_k x 2``, ``b_k x L``, ``b_k x L``); memory ``O(L p^2)`` whatever ``N``.
        A learned q(u) is global: nothing to do."""
        if self.variational == "learned":
            return
        strategy = self.variational_strategy
        precision = rhs = None
        for x, omega, phi2 in chunks:
            part = strategy.statistics(x, omega.T, phi2.T)
            precision, rhs = (part if precision is None else (precision + part[0], rhs + part[1]))
        if precision is None:
            raise ValueError("condition_on_chunks needs at least one chunk of spots")
        strategy.condition_on_statistics(precision, rhs, 1.0)

    def posterior_state(self) -> dict | None:
        """The current closed-form :math:`q(u)` (mean ``L x p`` and covariance root ``L x p x p``), or ``None``."""
        q_u = self.variational_strategy.q_u
        if self.variational == "learned" or q_u.mean is None:
            return None
        return {"mean": q_u.mean.detach().clone(), "covar_root": q_u.covar_root.detach().clone()}

    def set_posterior_state(self, state: dict | None) -> None:
        """Restore a :meth:`posterior_state` (for the marginals; the KL of a batch needs :meth:`condition_on`)."""
        if state is None or self.variational == "learned":
            return
        strategy = self.variational_strategy
        strategy._forget_batch()
        device = strategy.inducing_points.device
        strategy.q_u.set_state(state["mean"].to(device), state["covar_root"].to(device))

    def marginals(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior means and variances (``n x L`` each) at locations ``x`` under the current :math:`q(u)`."""
        q_f = self(x)
        return q_f.mean.T, q_f.variance.T

    def batch_terms(self, x: torch.Tensor, omega: torch.Tensor, phi2: torch.Tensor, n_obs: float) -> GPBatchTerms:
        """Condition on a batch and return every GP quantity of the loss (ALGORITHM 3.1-3.4)."""
        self.condition_on(x, omega, phi2, n_obs)
        q_f = self(x)
        kl_u = self.variational_strategy.kl_divergence()
        expected_log_lik = self.likelihood.expected_log_prob(omega.T, q_f, noise=phi2.T).sum()
        mean, var = q_f.mean.T, q_f.variance.T
        cross_entropy = gauss_cross_entropy(mean, var, omega, phi2).sum()
        evidence = expected_log_lik - x.shape[0] / float(n_obs) * kl_u.sum()
        return GPBatchTerms(mean, var, expected_log_lik, kl_u, cross_entropy, cross_entropy - evidence, evidence)

    @property
    def kernel_scale(self) -> float | None:
        """Mean effective scale of a spaVAE kernel (``None`` for other kernels)."""
        scale = getattr(self.covar_module, "scale", None)
        return None if scale is None else float(scale.detach().mean())
