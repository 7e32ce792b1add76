r"""The spaVAE generative model and its guide, as Pyro ``model``/``guide`` functions (ALGORITHM 4, 13).

Latent :math:`z_i = [z^{GP}_i, z^{N}_i]`: the first ``n_gp`` dimensions have a GP prior over the spot
locations, the other ``n_gauss`` a standard-normal prior.

* ``guide``: the encoder gives :math:`(\tilde\omega, \tilde\phi^2)`; the GP dimensions get the sparse-GP
  posterior marginals :math:`N(m, B)` (:class:`~spavae.gp.SpatialGP`), the Gaussian ones
  :math:`N(\tilde\omega, \tilde\phi^2)`.
* ``model``: standard-normal prior on :math:`z^N` (its KL weighted by ``beta`` with ``poutine.scale``) and
  the negative-binomial likelihood of the counts given the decoder mean and the size factors.

The GP site ``z_gp`` is masked out of Pyro's ELBO in both functions (as GPyTorch's own ``pyro_model`` does):
its KL is the hand-written Pearce cross-entropy term :math:`\beta (C - E_b)`, which :meth:`SpaVAEModule.loss`
adds. So the training loss is, per mini-batch,

.. math::
    \mathcal{L}_b = \mathrm{NB} + \beta\,\mathrm{KL}_{GP} + \beta\,\mathrm{KL}_{N} + [\sigma_n > 0]\,(G/L)\,R_\mathrm{noise}.

``model`` and ``guide`` take the same arguments and can be used with any Pyro inference tool, e.g.
``pyro.infer.Predictive(module.model, guide=module.guide, num_samples=10)`` to draw counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.distributions import kl_divergence

from spavae.gp import GPBatchTerms, SpatialGP
from spavae.likelihoods import NegativeBinomialLikelihood
from spavae.nn import Decoder, GaussianEncoder


@dataclass
class Batch:
    """One mini-batch: encoder input, GP-dtype locations, raw counts and size factors."""

    expression: torch.Tensor
    locations: torch.Tensor
    counts: torch.Tensor | None
    size_factors: torch.Tensor

    def args(self) -> tuple:
        """Positional arguments of ``model``/``guide``."""
        return self.expression, self.locations, self.counts, self.size_factors


@dataclass
class Posterior:
    """What the guide computes for a batch (returned by :meth:`SpaVAEModule.guide`)."""

    omega: torch.Tensor
    phi2: torch.Tensor
    gp: GPBatchTerms
    mean: torch.Tensor
    var: torch.Tensor


@dataclass
class LossOutput:
    """Named parts of one mini-batch loss (sums over the batch, like the original)."""

    loss: torch.Tensor
    nb: torch.Tensor
    kl_gp: torch.Tensor
    kl_gauss: torch.Tensor
    noise: torch.Tensor
    gp_cross_entropy: torch.Tensor
    gp_evidence: torch.Tensor
    n_spots: int

    def detached(self) -> dict[str, float]:
        """Plain floats of every part, for logging."""
        return {k: float(v.detach()) for k, v in vars(self).items() if k != "n_spots"} | {"n_spots": self.n_spots}


class SpaVAEModule(nn.Module):
    """The pure-PyTorch/Pyro spaVAE module (no AnnData here; see :class:`spavae.SpaVAE`).

    Parameters
    ----------
    n_genes
        Number of genes ``G``.
    gp
        The :class:`~spavae.gp.SpatialGP` for the GP dimensions (defines ``n_gp``).
    n_gauss
        Number of standard-normal latent dimensions.
    n_obs
        :math:`N` of the :math:`N/b` rescaling in the GP posterior.
    encoder_layers, decoder_layers
        Hidden widths.
    dropout
        Dropout rate of both networks.
    """

    def __init__(self, n_genes: int, gp: SpatialGP, n_gauss: int, n_obs: int, *, encoder_layers=(128, 64),
                 decoder_layers=(128,), dropout: float = 0.0):
        super().__init__()
        if n_gauss < 0:
            raise ValueError(f"n_gauss must be >= 0, got {n_gauss}")
        self.n_gp, self.n_gauss, self.n_genes, self.n_obs = gp.n_latent, n_gauss, n_genes, n_obs
        self.encoder = GaussianEncoder(n_genes, self.n_latent, encoder_layers, dropout=dropout)
        self.decoder = Decoder(self.n_latent, n_genes, decoder_layers, dropout=dropout)
        self.likelihood = NegativeBinomialLikelihood(n_genes)
        self.gp = gp

    @property
    def n_latent(self) -> int:
        """Total latent dimension ``D = n_gp + n_gauss``."""
        return self.n_gp + self.n_gauss

    @property
    def net_dtype(self) -> torch.dtype:
        """dtype of the neural networks."""
        return self.decoder.head.weight.dtype

    @property
    def gp_dtype(self) -> torch.dtype:
        """dtype of the GP algebra."""
        return self.gp.variational_strategy.inducing_points.dtype

    def encode(self, expression: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder means and variances (``b x D``)."""
        return self.encoder(expression)

    def gp_posterior(self, locations: torch.Tensor, omega: torch.Tensor, phi2: torch.Tensor,
                     n_obs: float | None = None) -> GPBatchTerms:
        """GP terms of the GP dimensions of ``omega``/``phi2`` at ``locations`` (in the GP dtype)."""
        gp_dtype = self.gp_dtype
        return self.gp.batch_terms(
            locations.to(gp_dtype), omega[:, : self.n_gp].to(gp_dtype), phi2[:, : self.n_gp].to(gp_dtype),
            self.n_obs if n_obs is None else n_obs,
        )

    def posterior(self, expression: torch.Tensor, locations: torch.Tensor, n_obs: float | None = None) -> Posterior:
        """Encode a batch and compute the posterior ``q(z)`` of every latent dimension."""
        omega, phi2 = self.encode(expression)
        gp = self.gp_posterior(locations, omega, phi2, n_obs)
        mean = torch.cat([gp.mean.to(omega.dtype), omega[:, self.n_gp:]], dim=1)
        var = torch.cat([gp.var.to(omega.dtype), phi2[:, self.n_gp:]], dim=1)
        return Posterior(omega, phi2, gp, mean, var)

    def guide(self, expression, locations, counts=None, size_factors=None, beta: float = 1.0) -> Posterior:
        """Pyro guide: q(z_gp) from the sparse GP, q(z_gauss) from the encoder. Returns the :class:`Posterior`."""
        pyro.module("spavae", self)
        post = self.posterior(expression, locations)
        with pyro.plate("spots", expression.shape[0]):
            pyro.sample("z_gp", dist.Normal(post.mean[:, : self.n_gp], post.var[:, : self.n_gp].sqrt())
                        .to_event(1).mask(False))
            if self.n_gauss:
                with poutine.scale(scale=beta):
                    pyro.sample("z_gauss", dist.Normal(post.mean[:, self.n_gp:], post.var[:, self.n_gp:].sqrt())
                                .to_event(1))
        return post

    def model(self, expression, locations, counts=None, size_factors=None, beta: float = 1.0) -> torch.Tensor:
        """Pyro model: GP and standard-normal priors, decoder and NB likelihood. Returns the decoder mean."""
        pyro.module("spavae", self)
        n = locations.shape[0]
        dtype, device = self.net_dtype, locations.device
        if size_factors is None:
            size_factors = torch.ones(n, dtype=dtype, device=device)
        with pyro.plate("spots", n):
            # marginal GP prior N(0, k(x, x)); the joint GP prior enters through the Pearce term instead
            prior_sd = self.gp.covar_module(locations.to(self.gp_dtype), diag=True).sqrt().to(dtype)
            z_gp = pyro.sample("z_gp", dist.Normal(torch.zeros_like(prior_sd).unsqueeze(-1).expand(n, self.n_gp),
                                                   prior_sd.unsqueeze(-1).expand(n, self.n_gp)).to_event(1).mask(False))
            parts = [z_gp]
            if self.n_gauss:
                with poutine.scale(scale=beta):
                    parts.append(pyro.sample("z_gauss", dist.Normal(torch.zeros(n, self.n_gauss, dtype=dtype, device=device),
                                                                    1.0).to_event(1)))
            mean = self.decoder(torch.cat(parts, dim=1))
            pyro.sample("counts", self.likelihood(mean, size_factors), obs=counts)
        return mean

    def loss(self, batch: Batch, beta: float, *, num_samples: int = 1, noise: float = 0.0) -> LossOutput:
        """Mini-batch loss: Pyro model/guide traces for NB and Gaussian KL, plus the Pearce GP term.

        Parameters
        ----------
        batch
            The mini-batch.
        beta
            Weight of both KL terms.
        num_samples
            Monte-Carlo samples of ``z`` for the NB term (averaged).
        noise
            Standard deviation of the denoising-noise regulariser (ALGORITHM 4.7); 0 switches it off.
        """
        nb = 0.0
        for _ in range(num_samples):
            guide_trace = poutine.trace(self.guide).get_trace(*batch.args(), beta=beta)
            model_trace = poutine.trace(poutine.replay(self.model, trace=guide_trace)).get_trace(*batch.args(), beta=beta)
            site = model_trace.nodes["counts"]
            nb = nb - site["fn"].log_prob(site["value"]).sum() / num_samples
        post: Posterior = guide_trace.nodes["_RETURN"]["value"]
        if self.n_gauss:
            kl_gauss = kl_divergence(guide_trace.nodes["z_gauss"]["fn"], model_trace.nodes["z_gauss"]["fn"]).sum()
        else:
            kl_gauss = nb.new_zeros(())
        kl_gp = post.gp.kl_gp.to(nb.dtype)
        noise_term = nb.new_zeros(())
        if noise > 0:
            noise_term = self.noise_regularizer(batch, post, noise, num_samples) * (self.n_genes / self.n_gp)
        loss = nb + beta * (kl_gp + kl_gauss) + noise_term
        return LossOutput(loss, nb, kl_gp, kl_gauss, noise_term, post.gp.cross_entropy, post.gp.expected_log_lik
                          - batch.locations.shape[0] / self.n_obs * post.gp.kl_u.sum(), batch.locations.shape[0])

    def noise_regularizer(self, batch: Batch, post: Posterior, noise: float, num_samples: int = 1) -> torch.Tensor:
        r""":math:`R = \frac1S\sum_s\sum_{i,l\le L}(m_{il} - m'^{(s)}_{il})^2` with :math:`m'` from noisy input."""
        total = 0.0
        for _ in range(num_samples):
            noisy = batch.expression + noise * torch.randn_like(batch.expression)
            omega, phi2 = self.encode(noisy)
            noisy_mean = self.gp_posterior(batch.locations, omega, phi2).mean
            total = total + (post.gp.mean - noisy_mean).square().sum()
        return (total / num_samples).to(self.net_dtype)
