"""The spots of an AnnData as a model sees them, and the mini-batches made from them.

:class:`SpotData` applies a fitted :class:`~spavae.data.setup.DataSetup` to an AnnData. Per-spot vectors (size
factors, GP inputs, one-hot sections) live on the model's device: ``O(N)``. The counts stay sparse on the host
(or on disk, :class:`~spavae.data.counts.CountRows`); :meth:`SpotData.batch` densifies only the rows of a
mini-batch, moves them to the device (pinned memory and a non-blocking copy on CUDA) and computes the encoder
input there from the fitted statistics. No ``N x G`` array is ever formed.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import torch

from spavae.data.batch import Batch
from spavae.data.counts import CountRows
from spavae.data.setup import DataSetup, protein_matrix, spot_locations
from spavae.image.features import image_features_for


class SpotData:
    """Spots of ``adata`` prepared with ``setup`` (see the module doc).

    Parameters
    ----------
    adata
        Spots x genes AnnData with the model's genes (any order; extra genes are ignored), raw counts in the
        setup's layer, coordinates in ``obsm[setup.spatial_key]`` and, for a multi-section model, the section of
        each spot in ``obs[setup.batch_key]``. An AnnData opened with ``backed='r'`` is read from disk per batch.
    setup
        The fitted setup.
    device, dtype
        Device and network dtype of the tensors; GP inputs are kept in ``gp_dtype``.
    image
        For a setup with the image view: where the spots' image features come from
        (:func:`spavae.image.image_features_for`; ``None``: the image source stored in the setup).

    Attributes
    ----------
    image_features
        ``n x F`` float32 standardised image features (NaN for spots without usable ones), ``None`` without the
        image view. A batch appends them to the encoder input (0 where NaN) and to the observed values.
    """

    def __init__(self, adata: ad.AnnData, setup: DataSetup, *, device: torch.device, dtype: torch.dtype,
                 gp_dtype: torch.dtype = torch.float64, image=None):
        if not isinstance(adata, ad.AnnData):
            raise TypeError(f"adata must be an AnnData, got {type(adata).__name__}")
        self.setup, self.device, self.dtype = setup, device, dtype
        self.obs_names = pd.Index(adata.obs_names).copy()
        if not self.obs_names.is_unique:
            raise ValueError("adata has duplicated spot names; make them unique first (adata.obs_names_make_unique())")
        self.counts = CountRows.from_anndata(adata, setup.layer, setup.gene_columns(adata))
        totals = setup.library_sizes(adata)
        if setup.batch_key is not None and setup.batch_key not in adata.obs:
            raise KeyError(f"adata.obs has no column '{setup.batch_key}' with the section of each spot (the model "
                           f"was fitted on the sections {setup.sections})")
        codes = setup.section_codes(adata.obs[setup.batch_key]) if setup.batch_key is not None else None
        self.section_codes = codes
        self.scaled_locations = setup.scale_locations(spot_locations(adata, setup.spatial_key), codes)
        self.locations = torch.as_tensor(setup.gp_inputs(self.scaled_locations, codes), dtype=gp_dtype, device=device)
        factors = np.ones(len(totals)) if setup.binarize else totals / setup.library_median
        self.size_factors = torch.as_tensor(factors, dtype=dtype, device=device)
        self.covariates = None if codes is None else \
            torch.as_tensor(np.eye(setup.n_sections)[codes], dtype=dtype, device=device)
        proteins = protein_matrix(adata, setup.protein_key)
        if proteins is not None and proteins.shape[1] != setup.n_proteins:
            raise ValueError(f"obsm['{setup.protein_key}'] has {proteins.shape[1]} proteins; the model has "
                             f"{setup.n_proteins}")
        self.proteins = None if proteins is None else proteins.astype(np.float32)
        self.image_features = None
        if setup.image is not None:
            features = image_features_for(setup.image, adata, image)
            self.image_features = np.where(features.mask[:, None], features.values, np.nan).astype(np.float32)
        elif image is not None:
            raise ValueError("image= was given but the model has no image view; fit one with SpaVAE(adata, image=...)")
        self._mean = torch.as_tensor(setup.expression_mean, dtype=dtype, device=device)
        self._sd = torch.as_tensor(setup.expression_sd, dtype=dtype, device=device)
        self._axes = None if setup.input_axes is None else \
            torch.as_tensor(setup.input_axes, dtype=dtype, device=device)

    def __len__(self) -> int:
        return self.counts.shape[0]

    @property
    def nbytes(self) -> int:
        """Host memory of the counts (the device tensors are ``O(N)``)."""
        return self.counts.nbytes

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, dtype=self.dtype, non_blocking=True)
        return tensor.to(self.dtype)

    def normalize(self, counts: torch.Tensor, size_factors: torch.Tensor) -> torch.Tensor:
        """Encoder input of gene counts: ``(log1p(counts / s) - mean) / sd`` with the fitted statistics, projected
        onto the setup's principal axes when it has them (:mod:`spavae.data.input_axes`)."""
        if self.setup.binarize:
            return counts
        n = self.setup.n_genes
        scaled = (torch.log1p(counts / size_factors[:, None]) - self._mean[:n]) / self._sd[:n]
        return scaled if self._axes is None else scaled @ self._axes

    def batch(self, index) -> Batch:
        """The mini-batch of the spots at positions ``index`` (tensor or array), on the device."""
        rows = index.cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
        on_device = torch.as_tensor(rows, device=self.device)
        sparse = self.counts.take_sparse(rows)
        counts = self._to_device(sparse.toarray())
        nonzero = None
        if self.setup.binarize:
            counts = (counts > 0).to(self.dtype)
        else:  # flat positions of the nonzero counts, read off the sparse rows (cheaper than searching the dense ones)
            spot = np.repeat(np.arange(len(rows), dtype=np.int64), np.diff(sparse.indptr))
            nonzero = torch.from_numpy(spot * sparse.shape[1] + sparse.indices).to(self.device, non_blocking=True)
        factors = self.size_factors[on_device]
        expression = self.normalize(counts, factors)
        if self.proteins is not None:
            proteins = self._to_device(self.proteins[rows])
            n = self.setup.n_genes
            expression = torch.cat([expression, (torch.log1p(proteins) - self._mean[n:]) / self._sd[n:]], dim=1)
            counts = torch.cat([counts, proteins], dim=1)
        if self.image_features is not None:
            features = self._to_device(self.image_features[rows])
            expression = torch.cat([expression, torch.nan_to_num(features)], dim=1)
            counts = torch.cat([counts, features], dim=1)
        covariates = None if self.covariates is None else self.covariates[on_device]
        return Batch(expression, self.locations[on_device], counts, factors, covariates, nonzero,
                     sparse.shape[1])

    def gene_counts(self, positions: np.ndarray) -> np.ndarray:
        """Raw counts of a few model genes (by position) for every spot, ``N x len(positions)``, read in chunks."""
        positions = np.asarray(positions)
        out = np.empty((len(self), len(positions)), dtype=np.float32)
        for start, block in self.counts.chunks():
            out[start:start + block.shape[0]] = block[:, positions].toarray()
        return out

    def chunks(self, batch_size: int):
        """Consecutive mini-batches over all spots (for encoding and decoding everything in order)."""
        for start in range(0, len(self), batch_size):
            yield self.batch(np.arange(start, min(start + batch_size, len(self))))
