"""One mini-batch of spots as the model reads it: what the data layer hands to the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """One mini-batch: encoder input, GP locations, raw counts, size factors and one-hot sections.

    ``counts`` holds every observed value, one block of columns per observation model: the gene counts, then the
    protein counts and the standardised image features (NaN for a spot without usable ones) when the model has them.

    ``gene_nonzero`` optionally holds the flat positions (``row * n_genes + column``) of the nonzero gene counts,
    known from the sparse rows the batch was built from, and ``gene_width`` the number of gene columns ``n_genes``
    they count in (the count tensor may hold proteins after them); the NB log-probability of exactly that gene block
    then needs no search for them.
    """

    expression: torch.Tensor
    locations: torch.Tensor
    counts: torch.Tensor | None
    size_factors: torch.Tensor | None
    covariates: torch.Tensor | None = None
    gene_nonzero: torch.Tensor | None = None
    gene_width: int | None = None

    def args(self) -> tuple:
        """Positional arguments of ``model``/``guide``."""
        return self.expression, self.locations, self.counts, self.size_factors, self.covariates
