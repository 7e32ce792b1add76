r"""The spaVAE generative model and its guide, as Pyro ``model``/``guide`` functions (ALGORITHM 4, 13).

Latent :math:`z_i = [z^{GP}_i, z^{N}_i]`: the first ``n_gp`` dimensions have a GP prior over the spot
locations, the other ``n_gauss`` a standard-normal prior.

* ``guide``: the encoder gives :math:`(\tilde\omega, \tilde\phi^2)`; the GP dimensions get the sparse-GP
  posterior marginals :math:`N(m, B)` (:class:`~spavae.gp.SpatialGP`), the Gaussian ones
  :math:`N(\tilde\omega, \tilde\phi^2)`.
* ``model``: standard-normal (or learnable Gaussian) prior on :math:`z^N` (its KL weighted by ``beta`` with
  ``poutine.scale``) and the likelihood of every observation model (:mod:`spavae.likelihoods`: NB genes,
  Bernoulli peaks, NB-mixture proteins, Gaussian image features) given the decoder(s). With
  ``latent_distribution='lognormal'`` (spaLDVAE) the decoders see :math:`\exp(z)`.

The GP site ``z_gp`` is masked out of Pyro's ELBO in both functions (as GPyTorch's own ``pyro_model`` does):
its KL is the hand-written Pearce cross-entropy term :math:`\beta (C - E_b)`, which :meth:`SpaVAEModule.loss`
adds. So the training loss is, per mini-batch,

.. math::
    \mathcal{L}_b = -\log p(y \mid z) + \beta\,\mathrm{KL}_{GP} + \beta\,\mathrm{KL}_{N} + \mathrm{KL}_\mathrm{other}
    + [\sigma_n > 0]\,(G/L)\,R_\mathrm{noise},

where :math:`\mathrm{KL}_\mathrm{other}` collects the unweighted KLs of observation-level latents (the protein
background of spaMultiVAE).

``model`` and ``guide`` take the same arguments and can be used with any Pyro inference tool, e.g.
``pyro.infer.Predictive(module.model, guide=module.guide, num_samples=10)`` to draw counts; they register the
module's parameters under a name unique to the instance (:attr:`SpaVAEModule.pyro_name`). The training loss
traces their bodies (:meth:`SpaVAEModule.sample_latent`, :meth:`SpaVAEModule.generate`) without registering
anything, encoding each batch once whatever the number of latent samples.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import nn
from torch.distributions import kl_divergence

from spavae.data.batch import Batch
from spavae.distributed import Communicator
from spavae.gp import GPBatchTerms, SpatialGP
from spavae.likelihoods import Observation
from spavae.nn import GaussianEncoder

GP_SITE, GAUSS_SITE = "z_gp", "z_gauss"
_PYRO_NAMES = (f"spavae{i}" for i in itertools.count())


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
    """Named parts of one mini-batch loss (sums over the batch, like the original).

    ``nb`` is the reconstruction negative log-likelihood of all observation models (the NB term for genes).
    """

    loss: torch.Tensor
    nb: torch.Tensor
    kl_gp: torch.Tensor
    kl_gauss: torch.Tensor
    kl_other: torch.Tensor
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
    n_input
        Width of the encoder input (genes, or genes + proteins), without section covariates.
    gp
        The :class:`~spavae.gp.SpatialGP` for the GP dimensions (defines ``n_gp``).
    n_gauss
        Number of Gaussian latent dimensions.
    n_obs
        :math:`N` of the :math:`N/b` rescaling in the GP posterior.
    observations
        Observation models (:mod:`spavae.likelihoods`), each reading its own count columns.
    encoder_layers
        Hidden widths of the default dense encoder.
    dropout
        Dropout rate of the default encoder.
    n_batch
        Number of sections; their one-hot vector is appended to the encoder input (and passed to the decoders).
    latent_distribution
        ``'normal'`` (spaVAE) or ``'lognormal'`` (spaLDVAE: decoders see ``exp(z)``).
    learn_gauss_prior
        Learn the mean and log-sd of the Gaussian dimensions' prior (spaLDVAE) instead of N(0, 1).
    encoder
        A custom encoder module returning ``(mean, var)`` of width ``n_gp + n_gauss``.

    Attributes
    ----------
    pyro_name
        Name under which :meth:`model` and :meth:`guide` register the parameters in Pyro's global parameter store
        (``pyro.module``), unique to this instance (``'spavae0'``, ``'spavae1'``, ...), so that two modules in one
        session never share or overwrite each other's parameters there. :meth:`loss` registers nothing.
    communicator
        How the GP sees a batch split over processes (:mod:`spavae.distributed`): the single-process identity by
        default; a data-parallel :class:`~spavae.train.Trainer` sets it.
    """

    def __init__(self, n_input: int, gp: SpatialGP, n_gauss: int, n_obs: int, observations: Sequence[Observation], *,
                 encoder_layers: Sequence[int] = (128, 64), dropout: float = 0.0, n_batch: int = 0,
                 latent_distribution: str = "normal", learn_gauss_prior: bool = False,
                 encoder: nn.Module | None = None):
        super().__init__()
        if n_gauss < 0:
            raise ValueError(f"n_gauss must be >= 0, got {n_gauss}")
        if latent_distribution not in ("normal", "lognormal"):
            raise ValueError(f"latent_distribution must be 'normal' or 'lognormal', got {latent_distribution!r}")
        if not observations:
            raise ValueError("the model needs at least one observation model")
        self.n_gp, self.n_gauss, self.n_input, self.n_obs, self.n_batch = gp.n_latent, n_gauss, n_input, n_obs, n_batch
        self.latent_distribution = latent_distribution
        self.pyro_name = next(_PYRO_NAMES)
        self.communicator = Communicator()
        self.encoder = encoder or GaussianEncoder(n_input + n_batch, self.n_latent, encoder_layers, dropout=dropout)
        self.observations = nn.ModuleList(observations)
        self.gp = gp
        for name in ("gauss_prior_mean", "gauss_prior_log_sd"):  # N(0, 1) unless learned (spaLDVAE)
            if learn_gauss_prior:
                self.register_parameter(name, nn.Parameter(torch.zeros(n_gauss)))
            else:
                self.register_buffer(name, torch.zeros(n_gauss))

    @property
    def n_latent(self) -> int:
        """Total latent dimension ``D = n_gp + n_gauss``."""
        return self.n_gp + self.n_gauss

    @property
    def decoder(self) -> nn.Module:
        """Decoder of the first observation model (the gene decoder of spaVAE)."""
        return self.observations[0].decoder

    @property
    def net_dtype(self) -> torch.dtype:
        """dtype of the neural networks."""
        return next(self.encoder.parameters()).dtype

    @property
    def gp_dtype(self) -> torch.dtype:
        """dtype of the GP algebra."""
        return self.gp.variational_strategy.inducing_points.dtype

    def encode(self, expression: torch.Tensor, covariates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder means and variances (``b x D``)."""
        if covariates is not None:
            expression = torch.cat([expression, covariates.to(expression.dtype)], dim=-1)
        return self.encoder(expression)

    def gp_posterior(self, locations: torch.Tensor, omega: torch.Tensor, phi2: torch.Tensor,
                     n_obs: float | None = None) -> GPBatchTerms:
        """GP terms of the GP dimensions of ``omega``/``phi2`` at ``locations`` (in the GP dtype).

        With a data-parallel :attr:`communicator`, q(u) is conditioned on the rows of every process (gathered with
        gradients) and the result is this process's share (:meth:`~spavae.gp.GPBatchTerms.share`): the marginals of
        its own rows and ``1 / world_size`` of the batch sums.
        """
        gp_dtype = self.gp_dtype
        (x, omega, phi2), rows = self.communicator.gather_rows(
            locations.to(gp_dtype), omega[:, : self.n_gp].to(gp_dtype), phi2[:, : self.n_gp].to(gp_dtype))
        terms = self.gp.batch_terms(x, omega, phi2, self.n_obs if n_obs is None else n_obs)
        return terms.share(rows, self.communicator.world_size)

    def posterior(self, expression: torch.Tensor, locations: torch.Tensor, covariates: torch.Tensor | None = None,
                  n_obs: float | None = None) -> Posterior:
        """Encode a batch and compute the posterior ``q(z)`` of every latent dimension."""
        omega, phi2 = self.encode(expression, covariates)
        gp = self.gp_posterior(locations, omega, phi2, n_obs)
        mean = torch.cat([gp.mean.to(omega.dtype), omega[:, self.n_gp:]], dim=1)
        var = torch.cat([gp.var.to(omega.dtype), phi2[:, self.n_gp:]], dim=1)
        return Posterior(omega, phi2, gp, mean, var)

    def decoder_input(self, z: torch.Tensor) -> torch.Tensor:
        """What the decoders see: ``z``, or ``exp(z)`` for log-normal latents."""
        return torch.exp(z) if self.latent_distribution == "lognormal" else z

    def denoise(self, z: torch.Tensor, batch: Batch, observation: int = 0) -> torch.Tensor:
        """Denoised signal of one observation model at latent values ``z`` (normalised scale)."""
        return self.observations[observation].denoise(self.decoder_input(z), batch)

    @torch.no_grad()
    def decode_posterior(self, mean: torch.Tensor, var: torch.Tensor, *, covariates: torch.Tensor | None = None,
                         n_samples: int = 25, average: bool = True, batch_size: int = 512, seed: int = 0,
                         observation: int = 0) -> torch.Tensor:
        """Denoised values at draws :math:`z \\sim N(\\mathrm{mean}, \\mathrm{var})`, on the normalised scale.

        Each draw goes through :meth:`denoise` of one observation model (log-normal latents are exponentiated).

        Parameters
        ----------
        mean, var
            ``n x D`` posterior means and variances of the latent.
        covariates
            ``n x B`` one-hot sections of the rows for a multi-section model (``None`` otherwise).
        n_samples
            Latent draws per row.
        average
            Return the average over draws (``n x G``) instead of every draw (``n_samples x n x G``).
        batch_size
            Rows decoded at once (bounds the memory).
        seed
            Seed of the latent draws (a private generator: the global torch RNG is left alone).
        observation
            Which observation model (0: genes or peaks; 1: proteins of a spaMultiVAE model).
        """
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        if mean.shape != var.shape or mean.ndim != 2 or mean.shape[1] != self.n_latent:
            raise ValueError(f"mean and var must both be n x {self.n_latent}, got {tuple(mean.shape)} and "
                             f"{tuple(var.shape)}")
        self.eval()
        dtype = self.net_dtype
        mean, sd = mean.to(dtype), var.to(dtype).clamp_min(0.0).sqrt()
        generator = torch.Generator(device=mean.device).manual_seed(seed)
        chunks = []
        for start in range(0, len(mean), batch_size):
            rows = slice(start, start + batch_size)
            m, s = mean[rows], sd[rows]
            batch = Batch(None, None, None, None, None if covariates is None else covariates[rows])
            draws = [self.denoise(m + s * torch.randn(m.shape, generator=generator, dtype=dtype, device=m.device),
                                  batch, observation) for _ in range(n_samples)]
            chunks.append(sum(draws) / n_samples if average else torch.stack(draws))
        return torch.cat(chunks, dim=-2)

    def guide(self, expression, locations, counts=None, size_factors=None, covariates=None, beta: float = 1.0) -> Posterior:
        """Pyro guide: q(z_gp) from the sparse GP, q(z_gauss) from the encoder. Returns the :class:`Posterior`.

        Registers the module's parameters in Pyro's parameter store under :attr:`pyro_name`.
        """
        pyro.module(self.pyro_name, self)
        post = self.posterior(expression, locations, covariates)
        self.sample_latent(post, Batch(expression, locations, counts, size_factors, covariates), beta)
        return post

    def sample_latent(self, post: Posterior, batch: Batch, beta: float = 1.0) -> None:
        """The guide's sample statements given a computed posterior (nothing is encoded or conditioned here)."""
        with pyro.plate("spots", post.mean.shape[0]):
            z_gp = pyro.sample(GP_SITE, dist.Normal(post.mean[:, : self.n_gp], post.var[:, : self.n_gp].sqrt())
                               .to_event(1).mask(False))
            parts = [z_gp]
            if self.n_gauss:
                with poutine.scale(scale=beta):
                    parts.append(pyro.sample(GAUSS_SITE, dist.Normal(post.mean[:, self.n_gp:],
                                                                     post.var[:, self.n_gp:].sqrt()).to_event(1)))
            z = self.decoder_input(torch.cat(parts, dim=1))
            for observation in self.observations:
                observation.guide(z, batch)

    def model(self, expression, locations, counts=None, size_factors=None, covariates=None, beta: float = 1.0) -> None:
        """Pyro model: GP and Gaussian priors, decoders and the likelihood of every observation model.

        Registers the module's parameters in Pyro's parameter store under :attr:`pyro_name`.
        """
        pyro.module(self.pyro_name, self)
        self.generate(Batch(expression, locations, counts, size_factors, covariates), beta)

    def generate(self, batch: Batch, beta: float = 1.0) -> None:
        """The model's sample statements: priors of ``z`` and the likelihood of every observation model."""
        n = batch.locations.shape[0]
        dtype = self.net_dtype
        if batch.size_factors is None:
            batch = replace(batch, size_factors=torch.ones(n, dtype=dtype, device=batch.locations.device))
        with pyro.plate("spots", n):
            # marginal GP prior N(0, k(x, x)); the joint GP prior enters through the Pearce term instead
            prior_var = self.gp.covar_module(batch.locations.to(self.gp_dtype), diag=True).to(dtype)
            prior_var = prior_var.T if prior_var.dim() == 2 else prior_var.unsqueeze(-1)  # per-dimension kernels: L x n
            prior_sd = prior_var.expand(n, self.n_gp).sqrt()
            parts = [pyro.sample(GP_SITE, dist.Normal(torch.zeros_like(prior_sd), prior_sd).to_event(1).mask(False))]
            if self.n_gauss:
                with poutine.scale(scale=beta):
                    loc = self.gauss_prior_mean.to(dtype).expand(n, self.n_gauss)
                    scale = self.gauss_prior_log_sd.to(dtype).exp().expand(n, self.n_gauss)
                    parts.append(pyro.sample(GAUSS_SITE, dist.Normal(loc, scale).to_event(1)))
            z = self.decoder_input(torch.cat(parts, dim=1))
            for observation in self.observations:
                observation.model(z, batch)

    def loss(self, batch: Batch, beta: float, *, num_samples: int = 1, noise: float = 0.0) -> LossOutput:
        """Mini-batch loss: Pyro model/guide traces for the likelihoods and local KLs, plus the Pearce GP term.

        The batch is encoded and the GP conditioned once; ``num_samples`` draws of ``z`` from that one posterior
        are each decoded (as in the original spaVAE), so the KL terms are exact and the reconstruction term is the
        average over the draws. The traces use :meth:`sample_latent` and :meth:`generate`, which register nothing
        in Pyro's parameter store: the training loop optimises ``module.parameters()`` directly.

        With a data-parallel :attr:`communicator`, ``batch`` is this process's share of the global batch and the
        parts are its share of the global loss (its spots' terms and ``1 / world_size`` of the GP terms): their sum
        over the processes is the loss of the whole batch.

        Parameters
        ----------
        batch
            The mini-batch.
        beta
            Weight of both KL terms of ``z``.
        num_samples
            Monte-Carlo samples of ``z`` for the likelihood (averaged).
        noise
            Standard deviation of the denoising-noise regulariser (ALGORITHM 4.7); 0 switches it off.
        """
        post = self.posterior(batch.expression, batch.locations, batch.covariates)
        reconstruction, kl_other = 0.0, 0.0
        for _ in range(num_samples):
            guide_trace = poutine.trace(self.sample_latent).get_trace(post, batch, beta)
            model_trace = poutine.trace(poutine.replay(self.generate, trace=guide_trace)).get_trace(batch, beta)
            for name, site in model_trace.nodes.items():
                if site["type"] != "sample" or site_is_subsample(site):
                    continue
                if site["is_observed"]:  # scaled as Pyro's ELBO scales it (the image view's weight)
                    log_likelihood = site["fn"].log_prob(site["value"]).sum() * site["scale"]
                    reconstruction = reconstruction - log_likelihood / num_samples
                elif name not in (GP_SITE, GAUSS_SITE):
                    kl = kl_divergence(guide_trace.nodes[name]["fn"], site["fn"])
                    kl_other = kl_other + kl.sum() / num_samples
        zero = reconstruction.new_zeros(())
        kl_gauss = (kl_divergence(guide_trace.nodes[GAUSS_SITE]["fn"], model_trace.nodes[GAUSS_SITE]["fn"]).sum()
                    if self.n_gauss else zero)
        kl_other = kl_other if torch.is_tensor(kl_other) else zero
        kl_gp = post.gp.kl_gp.to(reconstruction.dtype)
        noise_term = zero
        if noise > 0:
            noise_term = self.noise_regularizer(batch, post, noise, num_samples) * (self.n_input / self.n_gp)
        loss = reconstruction + beta * (kl_gp + kl_gauss) + kl_other + noise_term
        return LossOutput(loss, reconstruction, kl_gp, kl_gauss, kl_other, noise_term, post.gp.cross_entropy,
                          post.gp.evidence, batch.locations.shape[0])

    def noise_regularizer(self, batch: Batch, post: Posterior, noise: float, num_samples: int = 1) -> torch.Tensor:
        r""":math:`R = \frac1S\sum_s\sum_{i,l\le L}(m_{il} - m'^{(s)}_{il})^2` with :math:`m'` from noisy input."""
        total = 0.0
        for _ in range(num_samples):
            noisy = batch.expression + noise * torch.randn_like(batch.expression)
            omega, phi2 = self.encode(noisy, batch.covariates)
            noisy_mean = self.gp_posterior(batch.locations, omega, phi2).mean
            total = total + (post.gp.mean - noisy_mean).square().sum()
        return (total / num_samples).to(self.net_dtype)
