"""The Gaussian-process half: spaVAE kernels and the GPyTorch sparse variational GP."""

from spavae.gp.kernels import CauchyKernel, EQKernel, SectionKernel, make_kernel
from spavae.gp.svgp import (
    BatchOptimalVariationalDistribution,
    BatchOptimalVariationalStrategy,
    GPBatchTerms,
    SpatialGP,
    gauss_cross_entropy,
)

__all__ = [
    "BatchOptimalVariationalDistribution",
    "BatchOptimalVariationalStrategy",
    "CauchyKernel",
    "EQKernel",
    "GPBatchTerms",
    "SectionKernel",
    "SpatialGP",
    "gauss_cross_entropy",
    "make_kernel",
]
