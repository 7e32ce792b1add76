r"""Count likelihoods (ALGORITHM 4.4).

The negative binomial is written in Pyro/torch's ``total_count``/``logits`` form: with mean
:math:`\mu = s_i \bar\mu_{ig}` and inverse dispersion :math:`\theta_g`, ``total_count = theta`` and
``logits = log(mu) - log(theta)`` give mean :math:`\mu` and variance :math:`\mu + \mu^2/\theta`.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

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


class NegativeBinomialLikelihood(nn.Module):
    """NB likelihood with one inverse dispersion per gene, ``theta = exp(clamp(d, -15, 15))``, ``d ~ N(0, 1)`` at init."""

    def __init__(self, n_genes: int):
        super().__init__()
        self.raw_dispersion = nn.Parameter(torch.randn(n_genes))

    @property
    def theta(self) -> torch.Tensor:
        """Inverse dispersion per gene."""
        return torch.exp(self.raw_dispersion.clamp(-15.0, 15.0))

    def forward(self, normalized_mean: torch.Tensor, size_factors: torch.Tensor) -> dist.TorchDistribution:
        """The distribution of a spot's counts (event shape ``[G]``) given the decoder mean and size factors."""
        mean = normalized_mean * size_factors.unsqueeze(-1)
        theta = self.theta.to(mean.dtype)
        return dist.NegativeBinomial(total_count=theta, logits=mean.log() - theta.log()).to_event(1)
