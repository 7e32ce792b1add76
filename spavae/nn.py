"""Neural networks of spaVAE: the MLP building block, the Gaussian encoder and the decoder (ALGORITHM 4.1-4.3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS = {"elu": nn.ELU, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}


def build_mlp(
    widths: Sequence[int], *, activation: str = "elu", norm: str | None = "batchnorm", dropout: float = 0.0
) -> nn.Sequential:
    """``Linear -> norm -> activation -> dropout`` for each consecutive pair of ``widths``.

    Parameters
    ----------
    widths
        Input width followed by the hidden widths, e.g. ``[G, 128, 64]``.
    activation
        ``'elu'`` (the original), ``'relu'`` or ``'sigmoid'``.
    norm
        ``'batchnorm'`` (the original), ``'layernorm'`` or ``None``.
    dropout
        Dropout rate after each hidden layer (0 = none).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; use one of {sorted(ACTIVATIONS)}")
    if norm not in ("batchnorm", "layernorm", None):
        raise ValueError(f"unknown norm {norm!r}; use 'batchnorm', 'layernorm' or None")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    layers: list[nn.Module] = []
    for n_in, n_out in zip(widths[:-1], widths[1:]):
        layers.append(nn.Linear(n_in, n_out))
        if norm == "batchnorm":
            layers.append(nn.BatchNorm1d(n_out))
        elif norm == "layernorm":
            layers.append(nn.LayerNorm(n_out))
        layers.append(ACTIVATIONS[activation]())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class GaussianEncoder(nn.Module):
    """Encoder giving per-spot means and variances of the ``n_latent`` latent dimensions.

    The variance head is ``exp(clamp(., -15, 15))`` as in the original.
    """

    def __init__(self, n_input: int, n_latent: int, hidden: Sequence[int] = (128, 64), *, dropout: float = 0.0,
                 activation: str = "elu", norm: str | None = "batchnorm"):
        super().__init__()
        self.trunk = build_mlp([n_input, *hidden], activation=activation, norm=norm, dropout=dropout)
        width = hidden[-1] if hidden else n_input
        self.mean_head = nn.Linear(width, n_latent)
        self.var_head = nn.Linear(width, n_latent)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.mean_head(h), torch.exp(self.var_head(h).clamp(-15.0, 15.0))


class Decoder(nn.Module):
    """Decoder giving the normalised-scale mean ``clamp(exp(.), 1e-5, 1e6)`` of every gene."""

    def __init__(self, n_latent: int, n_output: int, hidden: Sequence[int] = (128,), *, dropout: float = 0.0,
                 activation: str = "elu", norm: str | None = "batchnorm"):
        super().__init__()
        self.trunk = build_mlp([n_latent, *hidden], activation=activation, norm=norm, dropout=dropout)
        self.head = nn.Linear(hidden[-1] if hidden else n_latent, n_output)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.head(self.trunk(z))).clamp(1e-5, 1e6)


class LinearPositiveDecoder(nn.Module):
    """Linear decoder with positive weights, ``mean = z @ exp(W)`` (spaLDVAE); ``z`` must be positive.

    ``W`` (``n_latent x n_output``) is initialised with ``kaiming_normal_(a=sqrt(5))`` as in the original.
    """

    def __init__(self, n_latent: int, n_output: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_latent, n_output))
        nn.init.kaiming_normal_(self.weight, a=5 ** 0.5)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z @ torch.exp(self.weight)


class ConvEncoder(GaussianEncoder):
    """:class:`GaussianEncoder` behind a 1-D convolution over the genes: ``Conv1d(1 -> channels, kernel_size)``
    then ``MaxPool1d(pool)``, flattened into the dense trunk.

    The trunk's input shrinks from ``G`` to ``channels * floor((G - kernel_size + 1) / pool)`` (the STUDENT
    extension, ALGORITHM 10 #14: with the defaults, ``2 * floor((G - 4) / 2)``), so the encoder has slightly fewer
    parameters than the dense one.
    """

    def __init__(self, n_input: int, n_latent: int, hidden: Sequence[int] = (128, 64), *, channels: int = 2,
                 kernel_size: int = 5, pool: int = 2, dropout: float = 0.0, activation: str = "elu",
                 norm: str | None = "batchnorm"):
        width = channels * ((n_input - kernel_size + 1) // pool)
        if width < 1:
            raise ValueError(f"the conv encoder needs at least {kernel_size + pool - 1} genes, got {n_input}")
        super().__init__(width, n_latent, hidden, dropout=dropout, activation=activation, norm=norm)
        self.front = nn.Sequential(nn.Unflatten(1, (1, n_input)), nn.Conv1d(1, channels, kernel_size),
                                   nn.MaxPool1d(pool), nn.Flatten())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(self.front(x))


ENCODERS = {"dense": GaussianEncoder, "conv": ConvEncoder}
"""Encoder classes by the name used in :class:`spavae.SpaVAE` (``encoder=``) and experiment configs."""
