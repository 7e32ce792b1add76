r"""Observation models: a decoder plus a likelihood for one modality (ALGORITHM 4.3-4.4, 8.1, 8.3, 8.4).

A spaVAE variant is a choice of observation model(s), not a copy of the model. Each observation model reads
its own columns of the count matrix and adds Pyro sample statements to the generative model (and, when it has
local latent variables of its own, to the guide):

* :class:`NegativeBinomialObservation`: gene counts, ``NB(s_i * decoder(z), theta)`` with a per-gene (or
  per-gene-and-section) inverse dispersion; MLP decoder (spaVAE) or linear positive decoder (spaLDVAE).
* :class:`BernoulliObservation`: binarised ATAC peaks, ``p = sigmoid(l_i) * h(z) * sigmoid(b_j)`` (spaPeakVAE).
* :class:`ProteinMixtureObservation`: surface proteins, a two-component NB mixture with a log-normal background
  (spaMultiVAE).
* :class:`ImageFeatureObservation`: standardised per-spot image features (:mod:`spavae.image`), Gaussian with a
  learned scale per feature and a weight relative to the counts; spots without usable features are masked out.

The negative binomial is written in Pyro/torch's ``total_count``/``logits`` form: with mean :math:`\mu` and inverse
dispersion :math:`\theta`, ``total_count = theta`` and ``logits = log(mu) - log(theta)`` give mean :math:`\mu` and
variance :math:`\mu + \mu^2/\theta`.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.distributions import constraints
from torch import nn

from spavae.nn import Decoder, LinearPositiveDecoder, build_mlp

EPS = 1e-10


def nb_log_prob(counts: torch.Tensor, mean: torch.Tensor, theta: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Elementwise NB log-probability in the original's epsilon form (a reference for tests and parity)."""
    return -(
        torch.lgamma(theta + eps)
        + torch.lgamma(counts + 1.0)
        - torch.lgamma(counts + theta + eps)
        + (theta + counts) * torch.log1p(mean / (theta + eps))
        + counts * (torch.log(theta + eps) - torch.log(mean + eps))
    )


def negative_binomial(mean: torch.Tensor, theta: torch.Tensor) -> dist.NegativeBinomial:
    """``NegativeBinomial`` with the given mean and inverse dispersion."""
    return dist.NegativeBinomial(total_count=theta, logits=mean.log() - theta.log())


class GeneNegativeBinomial(dist.NegativeBinomial):
    r"""The NB of spots x genes counts, with a log-probability that costs little where counts are zero.

    The same distribution as :func:`negative_binomial`. With :math:`l = \log(\mu/\theta)` (the logits),

    .. math::
        \log p(y) = y\,l - (\theta + y)\,\mathrm{softplus}(l)
        + [y > 0]\,\big(\log\Gamma(\theta + y) - \log\Gamma(y + 1) - \log\Gamma(\theta)\big),

    because the three log-gamma terms cancel at :math:`y = 0`. Spatial count matrices are mostly zeros, so the
    log-gamma terms (and their digamma gradients), which dominated a training step, are computed only at the
    nonzero counts, :math:`\log\Gamma(\theta)` once per gene; the dense part needs one ``softplus`` per count
    instead of two ``logsigmoid``. Values are not
    re-validated (the counts are checked once, when the data setup is fitted).

    Parameters
    ----------
    mean
        ``b x G`` means.
    theta
        Inverse dispersion broadcastable to ``mean`` (``G``, or ``b x G`` for per-section dispersion).
    observed_nonzero
        ``(counts, positions)``: the observed counts and the flat positions (``row * G + column``) of their nonzero
        entries, when the caller knows them (from the sparse rows of a mini-batch). :meth:`log_prob` of exactly
        that tensor then skips the search for nonzero entries; any other value is searched as usual.
    """

    def __init__(self, mean: torch.Tensor, theta: torch.Tensor,
                 observed_nonzero: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.theta, self.mu, self.observed_nonzero = theta, mean, observed_nonzero
        super().__init__(total_count=theta.expand_as(mean), logits=mean.log() - theta.log(), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        """The same distribution over a broadcast batch shape (Pyro's plates call this on every sample site)."""
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        return GeneNegativeBinomial(self.mu.expand(batch_shape), self.theta)

    def _nonzero_positions(self, value: torch.Tensor) -> torch.Tensor:
        if self.observed_nonzero is not None and value is self.observed_nonzero[0]:
            return self.observed_nonzero[1]
        return value.reshape(-1).nonzero().squeeze(1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        logits, theta = self.logits, self.total_count
        if value.shape != logits.shape:
            value, logits, theta = torch.broadcast_tensors(value, logits, theta)
        log_prob = value * logits - (theta + value) * F.softplus(logits)
        flat = self._nonzero_positions(value)
        y = value.reshape(-1).index_select(0, flat)  # index_select: its backward is far cheaper than indexing's
        per_gene = self.theta.dim() == 1 and self.theta.shape[0] == value.shape[-1]
        if per_gene:  # lgamma(theta) once per gene; the nonzero entries' genes are their columns
            genes = flat % value.shape[-1]
            t, lgamma_theta = self.theta.index_select(0, genes), torch.lgamma(self.theta).index_select(0, genes)
        else:
            t = theta.reshape(-1).index_select(0, flat)
            lgamma_theta = torch.lgamma(t)
        terms = torch.lgamma(t + y) - torch.lgamma(y + 1.0) - lgamma_theta
        return log_prob.reshape(-1).index_add(0, flat, terms).view_as(log_prob)


class NegativeBinomialMixture(dist.TorchDistribution):
    r"""Two-component NB mixture of spaMultiVAE: :math:`\sigma(\pi) NB(y; v, \theta) + (1 - \sigma(\pi)) NB(y; (1 + \alpha) v, \theta)`.

    Parameters
    ----------
    background_mean, foreground_mean
        Means of the background and foreground components.
    theta
        Shared inverse dispersion.
    background_logit
        :math:`\pi`, the logit of the probability of the background component.
    """

    arg_constraints = {"background_mean": constraints.positive, "foreground_mean": constraints.positive,
                       "theta": constraints.positive, "background_logit": constraints.real}
    support = constraints.nonnegative_integer
    has_rsample = False

    def __init__(self, background_mean, foreground_mean, theta, background_logit, validate_args=None):
        self.background_mean, self.foreground_mean, self.theta, self.background_logit = torch.broadcast_tensors(
            background_mean, foreground_mean, theta, background_logit)
        super().__init__(self.background_mean.shape, validate_args=validate_args)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        log_background = negative_binomial(self.background_mean, self.theta).log_prob(value)
        log_foreground = negative_binomial(self.foreground_mean, self.theta).log_prob(value)
        return torch.logaddexp(log_background + F.logsigmoid(self.background_logit),
                               log_foreground + F.logsigmoid(-self.background_logit))

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            is_background = torch.bernoulli(torch.sigmoid(self.background_logit).expand(sample_shape + self.batch_shape))
            mean = torch.where(is_background.bool(), self.background_mean, self.foreground_mean)
            return negative_binomial(mean, self.theta.expand_as(mean)).sample()

    @property
    def mean(self) -> torch.Tensor:
        p = torch.sigmoid(self.background_logit)
        return p * self.background_mean + (1 - p) * self.foreground_mean


class Observation(nn.Module):
    """Base class: one modality, reading ``counts[:, columns]`` and writing Pyro site ``site``.

    Subclasses implement :meth:`model` (sample statements of the generative model), :meth:`denoise` (the
    denoised signal) and, when they have local latents of their own, :meth:`guide`.
    """

    site = "counts"

    def __init__(self, columns: slice):
        super().__init__()
        self.columns = columns

    def observed(self, batch) -> torch.Tensor | None:
        """This modality's columns of the batch counts (``None`` when sampling)."""
        return None if batch.counts is None else batch.counts[:, self.columns]

    def guide(self, z: torch.Tensor, batch) -> None:
        """Guide statements of this modality's local latents (none by default)."""

    def model(self, z: torch.Tensor, batch) -> None:
        raise NotImplementedError

    def denoise(self, z: torch.Tensor, batch) -> torch.Tensor:
        raise NotImplementedError


def _conditioned(z: torch.Tensor, covariates: torch.Tensor | None) -> torch.Tensor:
    return z if covariates is None else torch.cat([z, covariates.to(z.dtype)], dim=-1)


class NegativeBinomialObservation(Observation):
    """Counts ~ NB(mean = s_i * decoder(z), theta); the spaVAE and spaLDVAE gene likelihood.

    Parameters
    ----------
    n_features
        Number of genes.
    n_latent
        Latent dimension feeding the decoder.
    decoder_layers
        Hidden widths of the MLP decoder.
    decoder
        ``'mlp'`` (spaVAE: ``clamp(exp(MLP(z)), 1e-5, 1e6)``) or ``'linear'`` (spaLDVAE: ``z @ exp(W)``).
    n_batch
        Number of sections; the one-hot section is appended to the decoder input and, with
        ``dispersion='gene-batch'``, picks a per-section dispersion.
    dispersion
        ``'gene'`` (one theta per gene) or ``'gene-batch'`` (one per gene and section, spaVAE_Batch).
    use_size_factors
        Multiply the mean by the spot's size factor.
    columns
        Columns of the count matrix this modality reads.
    """

    site = "counts"

    def __init__(self, n_features: int, n_latent: int, decoder_layers: Sequence[int] = (128,), *, decoder: str = "mlp",
                 n_batch: int = 0, dispersion: str = "gene", use_size_factors: bool = True, dropout: float = 0.0,
                 columns: slice | None = None):
        super().__init__(columns if columns is not None else slice(0, n_features))
        if decoder not in ("mlp", "linear"):
            raise ValueError(f"decoder must be 'mlp' or 'linear', got {decoder!r}")
        if dispersion not in ("gene", "gene-batch"):
            raise ValueError(f"dispersion must be 'gene' or 'gene-batch', got {dispersion!r}")
        if dispersion == "gene-batch" and n_batch < 1:
            raise ValueError("dispersion='gene-batch' needs sections (n_batch >= 1)")
        self.n_batch, self.use_size_factors = n_batch, use_size_factors
        if decoder == "mlp":
            self.decoder = Decoder(n_latent + n_batch, n_features, decoder_layers, dropout=dropout)
        else:
            if n_batch:
                raise ValueError("the linear decoder does not take section covariates")
            self.decoder = LinearPositiveDecoder(n_latent, n_features)
        shape = (n_batch, n_features) if dispersion == "gene-batch" else (n_features,)
        self.raw_dispersion = nn.Parameter(torch.randn(*shape))

    def theta(self, covariates: torch.Tensor | None = None) -> torch.Tensor:
        """Inverse dispersion ``exp(clamp(d, -15, 15))``: per gene, or per spot's section (``b x G``)."""
        raw = self.raw_dispersion.clamp(-15.0, 15.0)
        if raw.dim() == 2:
            raw = covariates.to(raw.dtype) @ raw
        return torch.exp(raw)

    def denoise(self, z: torch.Tensor, batch) -> torch.Tensor:
        """Normalised-scale mean (size factor 1)."""
        return self.decoder(_conditioned(z, batch.covariates))

    def distribution(self, normalized_mean: torch.Tensor, batch,
                     observed: torch.Tensor | None = None) -> dist.TorchDistribution:
        """NB of a spot's counts (event shape ``[G]``) given the normalised mean.

        ``observed``: the counts it will score. The batch's ``gene_nonzero`` positions (those of its gene block,
        ``row * gene_width + column``) spare the NB a search only when ``observed`` is exactly that block: from
        column 0, ``gene_width`` wide, every row. Any other block (part of the genes, columns from elsewhere, genes
        and proteins together) has other flat positions, which are then searched.
        """
        mean = normalized_mean * batch.size_factors.unsqueeze(-1) if self.use_size_factors else normalized_mean
        gene_block = (observed is not None and batch.gene_nonzero is not None and self.columns.start in (0, None)
                      and observed.shape == (batch.counts.shape[0], batch.gene_width))
        observed_nonzero = (observed, batch.gene_nonzero) if gene_block else None
        return GeneNegativeBinomial(mean, self.theta(batch.covariates).to(mean.dtype), observed_nonzero).to_event(1)

    def model(self, z: torch.Tensor, batch) -> None:
        observed = self.observed(batch)
        pyro.sample(self.site, self.distribution(self.denoise(z, batch), batch, observed), obs=observed)


class BernoulliObservation(Observation):
    r"""Binary peaks ~ Bernoulli(:math:`\sigma(l_i) h_{ij}(z) \sigma(b_j)`) (spaPeakVAE).

    :math:`h = \mathrm{sigmoid}(\mathrm{MLP}(z))`, the spot factor :math:`l_i` comes from a network on the spot's input
    (``batch.expression``) and :math:`b_j` is a per-peak bias initialised to 0.
    """

    site = "peaks"

    def __init__(self, n_features: int, n_latent: int, n_input: int, decoder_layers: Sequence[int] = (128, 1024),
                 spot_factor_layers: Sequence[int] = (1024, 128), *, n_batch: int = 0, dropout: float = 0.0,
                 columns: slice | None = None):
        super().__init__(columns if columns is not None else slice(0, n_features))
        self.trunk = build_mlp([n_latent + n_batch, *decoder_layers], dropout=dropout)
        self.head = nn.Linear(decoder_layers[-1] if decoder_layers else n_latent + n_batch, n_features)
        self.spot_factor = nn.Sequential(build_mlp([n_input, *spot_factor_layers], dropout=dropout),
                                         nn.Linear(spot_factor_layers[-1] if spot_factor_layers else n_input, 1))
        self.peak_bias = nn.Parameter(torch.zeros(n_features))

    def denoise(self, z: torch.Tensor, batch) -> torch.Tensor:
        """:math:`h_{ij}` only (the original's denoised peaks, without spot and peak factors)."""
        return torch.sigmoid(self.head(self.trunk(_conditioned(z, batch.covariates))))

    def log_probability(self, z: torch.Tensor, batch) -> torch.Tensor:
        """``log p`` of a peak being open, summed stably from the three log-sigmoid factors."""
        return (F.logsigmoid(self.head(self.trunk(_conditioned(z, batch.covariates))))
                + F.logsigmoid(self.spot_factor(batch.expression)) + F.logsigmoid(self.peak_bias))

    def model(self, z: torch.Tensor, batch) -> None:
        log_p = self.log_probability(z, batch).clamp(max=-1e-7)
        logits = log_p - torch.log(-torch.expm1(log_p))
        pyro.sample(self.site, dist.Bernoulli(logits=logits).to_event(1), obs=self.observed(batch))


class ProteinMixtureObservation(Observation):
    r"""Protein counts ~ two-component NB mixture with a log-normal background (spaMultiVAE, ALGORITHM 8.4).

    The background :math:`v_{ip}` is a local latent with prior LogNormal(:math:`\mu^0_p`, :math:`e^{\rho^0_p}`) and an
    amortised posterior LogNormal(:math:`\mu^b(z)`, :math:`e^{s^b(z)}`); its KL is not weighted by beta. The foreground
    mean is :math:`(1 + \alpha)v` with :math:`\alpha = \mathrm{softplus}(\cdot) \ge 0`, and :math:`\pi` is the logit of
    the background probability. No size factors.

    Parameters
    ----------
    n_features
        Number of proteins.
    n_latent
        Latent dimension feeding the three decoder trunks.
    layers
        Hidden widths of each trunk.
    prior_mean, prior_log_sd
        Initial background prior (per protein), e.g. from :func:`background_prior_from_counts`.
    """

    site = "proteins"
    background_site = "protein_background"

    def __init__(self, n_features: int, n_latent: int, layers: Sequence[int] = (128,), *, n_batch: int = 0,
                 prior_mean: torch.Tensor | None = None, prior_log_sd: torch.Tensor | None = None,
                 dropout: float = 0.0, columns: slice | None = None):
        super().__init__(columns if columns is not None else slice(0, n_features))
        width_in = n_latent + n_batch
        width = layers[-1] if layers else width_in
        self.foreground_trunk = build_mlp([width_in, *layers], dropout=dropout)
        self.foreground_head = nn.Linear(width, n_features)
        self.background_trunk = build_mlp([width_in, *layers], dropout=dropout)
        self.background_mean_head = nn.Linear(width, n_features)
        self.background_log_sd_head = nn.Linear(width, n_features)
        self.logit_trunk = build_mlp([width_in, *layers], dropout=dropout)
        self.logit_head = nn.Linear(width, n_features)
        self.raw_dispersion = nn.Parameter(torch.randn(n_features))
        self.prior_mean = nn.Parameter(torch.zeros(n_features) if prior_mean is None else torch.as_tensor(prior_mean))
        self.prior_log_sd = nn.Parameter(torch.zeros(n_features) if prior_log_sd is None
                                         else torch.as_tensor(prior_log_sd))

    @property
    def theta(self) -> torch.Tensor:
        """Inverse dispersion per protein."""
        return torch.exp(self.raw_dispersion.clamp(-15.0, 15.0))

    def heads(self, z: torch.Tensor, batch) -> dict[str, torch.Tensor]:
        """Foreground increment, background posterior parameters and background logit."""
        zc = _conditioned(z, batch.covariates)
        background = self.background_trunk(zc)
        return {"alpha": F.softplus(self.foreground_head(self.foreground_trunk(zc))),
                "background_loc": self.background_mean_head(background),
                "background_scale": torch.exp(self.background_log_sd_head(background).clamp(-15.0, 15.0)),
                "logit": self.logit_head(self.logit_trunk(zc))}

    def guide(self, z: torch.Tensor, batch) -> None:
        h = self.heads(z, batch)
        pyro.sample(self.background_site, dist.LogNormal(h["background_loc"], h["background_scale"]).to_event(1))

    def model(self, z: torch.Tensor, batch) -> None:
        n = z.shape[0]
        prior = dist.LogNormal(self.prior_mean.to(z.dtype), self.prior_log_sd.to(z.dtype).exp())
        background = pyro.sample(self.background_site, prior.expand([n, len(self.prior_mean)]).to_event(1))
        h = self.heads(z, batch)
        mixture = NegativeBinomialMixture(background, (1 + h["alpha"]) * background, self.theta.to(z.dtype), h["logit"])
        pyro.sample(self.site, mixture.to_event(1), obs=self.observed(batch))

    def denoise(self, z: torch.Tensor, batch, *, sample_mixing: bool = True) -> torch.Tensor:
        """Denoised foreground ``(1 - pi~)(1 + alpha) v`` with ``v`` drawn from its posterior (ALGORITHM 8.4)."""
        h = self.heads(z, batch)
        background = dist.LogNormal(h["background_loc"], h["background_scale"]).sample()
        p_background = torch.sigmoid(h["logit"])
        mixing = torch.bernoulli(p_background) if sample_mixing else p_background
        return (1 - mixing) * (1 + h["alpha"]) * background

    def background_probability(self, z: torch.Tensor, batch) -> torch.Tensor:
        """:math:`\\sigma(\\pi)`, the probability that a count is background."""
        return torch.sigmoid(self.heads(z, batch)["logit"])


class ImageFeatureObservation(Observation):
    r"""Standardised image features ~ Normal(:math:`\mu(z)`, :math:`\sigma`), weighted by ``weight`` (the image view).

    :math:`\mu = \mathrm{MLP}(z)` and one learned scale :math:`\sigma_f = e^{s_f}` per feature (initially 1, the
    features' SD after standardisation). The log-likelihood enters the ELBO multiplied by ``weight``
    (``poutine.scale``): 1 counts each feature of a spot like one more observed value next to its gene counts.
    The observed values are this modality's columns of ``batch.counts``; a spot whose features are NaN there (no
    usable patch: off the image or on the background) is masked out of the likelihood.

    Parameters
    ----------
    n_features
        Number of image features.
    n_latent
        Latent dimension feeding the decoder.
    layers
        Hidden widths of the decoder MLP.
    n_batch
        Number of sections (their one-hot vector is appended to the decoder input).
    weight
        Weight of the image log-likelihood in the ELBO (> 0).
    dropout
        Dropout rate of the decoder.
    columns
        The columns of ``batch.counts`` holding the features.
    """

    site = "image"

    def __init__(self, n_features: int, n_latent: int, layers: Sequence[int] = (128,), *, n_batch: int = 0,
                 weight: float = 1.0, dropout: float = 0.0, columns: slice | None = None):
        super().__init__(columns if columns is not None else slice(0, n_features))
        if not weight > 0:
            raise ValueError(f"the image weight must be > 0, got {weight}")
        self.weight = float(weight)
        width_in = n_latent + n_batch
        self.trunk = build_mlp([width_in, *layers], dropout=dropout)
        self.head = nn.Linear(layers[-1] if layers else width_in, n_features)
        self.log_scale = nn.Parameter(torch.zeros(n_features))

    @property
    def scale(self) -> torch.Tensor:
        """Learned SD of each standardised feature."""
        return torch.exp(self.log_scale.clamp(-7.0, 7.0))

    def denoise(self, z: torch.Tensor, batch) -> torch.Tensor:
        """Decoded feature means (standardised scale)."""
        return self.head(self.trunk(_conditioned(z, batch.covariates)))

    def model(self, z: torch.Tensor, batch) -> None:
        normal = dist.Normal(self.denoise(z, batch), self.scale.to(z.dtype)).to_event(1)
        observed = self.observed(batch)
        if observed is not None:
            usable = torch.isfinite(observed).all(dim=-1)
            normal, observed = normal.mask(usable), torch.where(usable[:, None], observed, torch.zeros_like(observed))
        with poutine.scale(scale=self.weight):
            pyro.sample(self.site, normal, obs=observed)


def background_prior_from_counts(protein_counts, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial background prior per protein from a 2-component GMM on ``log1p`` counts (ALGORITHM 8.4).

    Returns ``(mu0, rho0)`` with ``mu0 = log(expm1(m))`` and ``rho0 = log(sqrt(var))`` of the lower component.
    """
    import numpy as np
    from sklearn.mixture import GaussianMixture

    logged = np.log1p(np.asarray(protein_counts, dtype=np.float64))
    means, log_sds = [], []
    for column in logged.T:
        gmm = GaussianMixture(2, covariance_type="diag", n_init=20, random_state=seed).fit(column[:, None])
        low = int(np.argmin(gmm.means_[:, 0]))
        m, var = float(gmm.means_[low, 0]), float(gmm.covariances_[low, 0])
        means.append(np.log(np.expm1(max(m, 1e-3))))
        log_sds.append(0.5 * np.log(max(var, 1e-6)))
    return torch.tensor(means, dtype=torch.float32), torch.tensor(log_sds, dtype=torch.float32)
