"""The AnnData-facing :class:`SpaVAE` model: counts and ``obsm['spatial']`` in, latent and denoised counts out."""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from gpytorch.kernels import Kernel

import spavae
from spavae.beta import PIController
from spavae.data.inducing import grid_inducing_points, kmeans_inducing_points
from spavae.data.preprocess import (
    LocationScaler,
    check_counts,
    check_locations,
    empty_masks,
    normalize_log_scale,
    size_factors,
)
from spavae.gp import SectionKernel, SpatialGP, make_kernel
from spavae.likelihoods import (
    BernoulliObservation,
    NegativeBinomialObservation,
    ProteinMixtureObservation,
    background_prior_from_counts,
)
from spavae.model import Batch, SpaVAEModule
from spavae.nn import ConvEncoder
from spavae.train import Trainer, TrainingData, auto_batch_size
from spavae.utils import atomic_path, resolve_device, resolve_dtype, set_seed

GP_DTYPE = torch.float64

#: The original's five models as settings of :class:`SpaVAE` (``init``) and its training defaults (``train``).
VARIANTS = {
    "spaVAE": {"init": {}, "train": {}},
    "spaVAE_Batch": {"init": {"dispersion": "gene-batch", "per_section_kernel": True}, "train": {}},
    "spaLDVAE": {"init": {"n_gp": 15, "n_gauss": 15, "decoder": "linear", "latent_distribution": "lognormal",
                          "learn_gauss_prior": True, "kernel": "matern32", "per_dimension_kernel": True},
                 "train": {"dynamic_beta": False, "beta": 10.0, "train_size": 1.0, "batch_size": 256}},
    "spaPeakVAE": {"init": {"likelihood": "bernoulli", "n_gp": 5, "n_gauss": 8, "encoder_layers": (1024, 128),
                            "decoder_layers": (128, 1024)}, "train": {"kl_target": 0.025}},
    "spaMultiVAE": {"init": {"n_gp": 2, "n_gauss": 18}, "train": {}},
}


class SpaVAE:
    """spaVAE: a VAE whose first latent dimensions have a Gaussian-process prior over spot locations.

    Parameters
    ----------
    adata
        Spots x genes AnnData with raw counts (in ``.X`` or ``layers[layer]``) and coordinates in
        ``obsm[spatial_key]``. Spots or genes with zero total count are refused: remove them with
        :func:`spavae.data.filter_empty`, which reports what it removes.
    layer
        Layer with the raw counts (``None`` = ``.X``).
    spatial_key
        ``obsm`` key of the ``n_obs x 2`` coordinates.
    batch_key
        ``obs`` column naming the section of each spot, for several sections in one model (spaVAE_Batch):
        coordinates are scaled per section, the GP kernel is zero across sections (:class:`~spavae.gp.SectionKernel`,
        one kernel copy per section with ``per_section_kernel``), inducing points are replicated per section, the
        one-hot section is fed to encoder and decoder, and the NB dispersion is per gene and section.
    protein_key
        ``obsm`` key of spots x proteins counts, modelled with the NB mixture of spaMultiVAE next to the genes.
    likelihood
        ``'nb'`` for counts or ``'bernoulli'`` for binarised peaks (spaPeakVAE; the matrix is binarised).
    n_gp, n_gauss
        Number of GP-prior and standard-normal latent dimensions (2 and 8).
    encoder
        ``'dense'`` (the original's MLP) or ``'conv'``: a ``Conv1d(1 -> 2, k=5)`` + ``MaxPool1d(2)`` front-end
        over the input before the dense layers (:class:`~spavae.nn.ConvEncoder`, slightly fewer parameters).
    encoder_layers, decoder_layers
        Hidden widths ((128, 64) and (128,)).
    decoder
        ``'mlp'`` or ``'linear'`` (positive weights, spaLDVAE); ``protein_layers`` are the protein trunks' widths.
    latent_distribution, learn_gauss_prior
        ``'lognormal'`` decodes ``exp(z)`` (spaLDVAE); ``learn_gauss_prior`` learns the Gaussian dims' prior.
    dispersion
        ``'gene'``, ``'gene-batch'`` or ``'auto'`` (per gene and section when ``batch_key`` is given).
    kernel
        ``'cauchy'`` (default), ``'eq'``, ``'matern12/32/52'``, or any :class:`gpytorch.kernels.Kernel` on 2-D inputs.
    kernel_scale, fix_kernel_scale
        Initial (or fixed) scale of the built-in kernels (20; the lengthscale for Matern).
    per_dimension_kernel, per_section_kernel
        One kernel (hyperparameters) per GP dimension (spaLDVAE), per section (spaVAE_Batch).
    variational
        ``'closed_form'`` (spaVAE's batch-optimal q(u)) or ``'learned'`` (a global GPyTorch q(u)); see
        :class:`~spavae.gp.SpatialGP`.
    inducing, inducing_steps, n_inducing
        ``'grid'`` with ``(inducing_steps + 1)**2`` points (steps 6 = 49 points) or ``'kmeans'`` with
        ``n_inducing`` centroids.
    learn_inducing
        Train the inducing locations (fixed in the original).
    loc_range
        Coordinates are min-max scaled per axis to ``[0, loc_range]`` (20).
    dropout
        Dropout rate of the networks.
    gp_n_obs
        ``N`` in the ``N/b`` rescaling: ``'all'`` spots (the original) or only the ``'train'`` split.
    dtype
        dtype of the networks (``'float32'`` default); the GP algebra always runs in float64.
    device
        ``'auto'`` (CUDA if available), ``'cpu'`` or ``'cuda'``.
    seed
        Seed for weight initialisation, the split, shuffling and sampling.
    """

    def __init__(
        self,
        adata: ad.AnnData,
        *,
        layer: str | None = None,
        spatial_key: str = "spatial",
        batch_key: str | None = None,
        protein_key: str | None = None,
        likelihood: str = "nb",
        n_gp: int = 2,
        n_gauss: int = 8,
        encoder: str = "dense",
        encoder_layers: Sequence[int] = (128, 64),
        decoder_layers: Sequence[int] = (128,),
        decoder: str = "mlp",
        protein_layers: Sequence[int] = (128,),
        latent_distribution: str = "normal",
        learn_gauss_prior: bool = False,
        dispersion: str = "auto",
        kernel: str | Kernel = "cauchy",
        kernel_scale: float = 20.0,
        fix_kernel_scale: bool = False,
        per_dimension_kernel: bool = False,
        per_section_kernel: bool = True,
        variational: str = "closed_form",
        inducing: str = "grid",
        inducing_steps: int = 6,
        n_inducing: int | None = None,
        learn_inducing: bool = False,
        loc_range: float = 20.0,
        dropout: float = 0.0,
        gp_n_obs: str = "all",
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "auto",
        seed: int = 0,
    ):
        self.init_params = {k: v for k, v in locals().items() if k not in ("self", "adata", "__class__")}
        if not isinstance(adata, ad.AnnData):
            raise TypeError(f"adata must be an AnnData, got {type(adata).__name__}")
        if not isinstance(n_gp, int) or n_gp < 1:
            raise ValueError(f"n_gp must be a positive integer, got {n_gp!r}")
        if not isinstance(n_gauss, int) or n_gauss < 0:
            raise ValueError(f"n_gauss must be a non-negative integer, got {n_gauss!r}")
        for name, value, allowed in (("gp_n_obs", gp_n_obs, ("all", "train")), ("inducing", inducing, ("grid", "kmeans")),
                                     ("encoder", encoder, ("dense", "conv")),
                                     ("likelihood", likelihood, ("nb", "bernoulli")),
                                     ("dispersion", dispersion, ("auto", "gene", "gene-batch"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        set_seed(seed)
        if adata.n_obs < 4:
            raise ValueError(f"spavae needs at least 4 spots, got {adata.n_obs}")
        self.var_names = pd.Index(adata.var_names).copy()
        self.obs_names = pd.Index(adata.obs_names).copy()
        counts = self._counts(adata, layer)
        sections = self._sections(adata, batch_key)
        gp_locations, inducing_points = self._locations(adata, spatial_key, sections, inducing, inducing_steps,
                                                        n_inducing, loc_range, seed)
        n_batch = 0 if sections is None else sections.shape[1]
        if likelihood == "bernoulli":  # spaPeakVAE: the binary matrix is both encoder input and target
            counts = (counts > 0).astype(np.float64)
            self.size_factors = np.ones(adata.n_obs)
            expression = counts
        else:
            self.size_factors = size_factors(counts)
            expression = normalize_log_scale(counts, self.size_factors)
        proteins = self._proteins(adata, protein_key)
        n_genes = counts.shape[1]
        if proteins is not None:  # spaMultiVAE: proteins are log1p + z-scored without size factors
            expression = np.hstack([expression, normalize_log_scale(proteins, np.ones(adata.n_obs))])
            counts = np.hstack([counts, proteins])

        spatial_kernel = make_kernel(kernel, scale=kernel_scale, fixed=fix_kernel_scale,
                                     batch_shape=torch.Size([n_gp]) if per_dimension_kernel else torch.Size([]))
        if sections is not None:
            spatial_kernel = SectionKernel(spatial_kernel, n_batch, per_section=per_section_kernel)
        gp = SpatialGP(torch.as_tensor(inducing_points, dtype=GP_DTYPE), n_gp, spatial_kernel,
                       learn_inducing_locations=learn_inducing, variational=variational)
        n_latent = n_gp + n_gauss
        if likelihood == "bernoulli":
            observations = [BernoulliObservation(n_genes, n_latent, expression.shape[1], tuple(decoder_layers),
                                                 tuple(encoder_layers), n_batch=n_batch, dropout=dropout)]
        else:
            dispersion = ("gene-batch" if n_batch else "gene") if dispersion == "auto" else dispersion
            observations = [NegativeBinomialObservation(n_genes, n_latent, tuple(decoder_layers), decoder=decoder,
                                                        n_batch=n_batch, dispersion=dispersion, dropout=dropout)]
        if proteins is not None:
            prior_mean, prior_log_sd = background_prior_from_counts(proteins, seed=seed)
            observations.append(ProteinMixtureObservation(
                proteins.shape[1], n_latent, tuple(protein_layers), n_batch=n_batch, prior_mean=prior_mean,
                prior_log_sd=prior_log_sd, dropout=dropout, columns=slice(n_genes, n_genes + proteins.shape[1])))
        self.module = SpaVAEModule(expression.shape[1], gp, n_gauss, adata.n_obs, observations,
                                   encoder_layers=tuple(encoder_layers), dropout=dropout, n_batch=n_batch,
                                   latent_distribution=latent_distribution, learn_gauss_prior=learn_gauss_prior,
                                   encoder=ConvEncoder(expression.shape[1] + n_batch, n_latent, tuple(encoder_layers),
                                                       dropout=dropout) if encoder == "conv" else None)
        self.module.to(self.dtype)
        self.module.gp.to(GP_DTYPE)
        self.module.to(self.device)

        def tensor(values, dtype=self.dtype):
            return None if values is None else torch.as_tensor(values, dtype=dtype, device=self.device)

        self.data = TrainingData(tensor(expression), tensor(gp_locations, GP_DTYPE), tensor(counts),
                                 tensor(self.size_factors), tensor(sections))
        self.history: pd.DataFrame = pd.DataFrame()
        self.is_trained = False
        self.train_params: dict = {}

    @classmethod
    def from_variant(cls, variant: str, adata: ad.AnnData, **kwargs) -> SpaVAE:
        """Build one of the original's models as settings of this class (see :data:`VARIANTS`).

        ``kwargs`` override the variant's settings, e.g. ``SpaVAE.from_variant('spaLDVAE', adata, n_gp=10)``.
        """
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; use one of {sorted(VARIANTS)}")
        settings = dict(VARIANTS[variant]["init"])
        if variant == "spaLDVAE" and "n_gp" in kwargs and "n_gauss" not in kwargs:
            kwargs["n_gauss"] = kwargs["n_gp"]
        return cls(adata, **(settings | kwargs))

    @staticmethod
    def _sections(adata: ad.AnnData, batch_key: str | None) -> np.ndarray | None:
        if batch_key is None:
            return None
        if batch_key not in adata.obs:
            raise KeyError(f"adata.obs has no column '{batch_key}' (batch_key); columns: {list(adata.obs.columns)}")
        labels = pd.Categorical(adata.obs[batch_key].astype(str))
        if len(labels.categories) < 2:
            raise ValueError(f"obs['{batch_key}'] has a single section; drop batch_key for one section")
        return np.eye(len(labels.categories))[labels.codes]

    def _locations(self, adata, spatial_key, sections, inducing, steps, n_inducing, loc_range, seed):
        """Scaled GP inputs (``[x, y]`` or ``[x, y, one-hot]``) and inducing points, per section when given."""
        if spatial_key not in adata.obsm:
            raise KeyError(f"adata.obsm has no '{spatial_key}' with spot coordinates; keys: {list(adata.obsm.keys())}")
        locations = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
        check_locations(locations, adata.n_obs, where=f"obsm['{spatial_key}']")
        groups = [np.ones(adata.n_obs, dtype=bool)] if sections is None else [c.astype(bool) for c in sections.T]
        scaled = np.zeros_like(locations)
        self.scalers, all_points = [], []
        for index, members in enumerate(groups):
            scaler = LocationScaler(loc_range).fit(locations[members])
            scaled[members] = scaler.transform(locations[members])
            self.scalers.append(scaler)
            if inducing == "grid":
                points = grid_inducing_points(steps, loc_range)
            else:
                points = kmeans_inducing_points(scaled[members], n_inducing if n_inducing is not None else 49, seed=seed)
            if sections is not None:
                points = np.hstack([points, np.tile(np.eye(len(groups))[index], (len(points), 1))])
            all_points.append(points)
        self.scaler = self.scalers[0] if sections is None else None
        gp_locations = scaled if sections is None else np.hstack([scaled, sections])
        return gp_locations, np.vstack(all_points)

    @staticmethod
    def _counts(adata: ad.AnnData, layer: str | None) -> np.ndarray:
        if layer is not None and layer not in adata.layers:
            raise KeyError(f"adata has no layer '{layer}'; layers: {list(adata.layers.keys())}")
        matrix = adata.X if layer is None else adata.layers[layer]
        if matrix is None:
            raise ValueError("adata.X is empty; pass layer= to name the layer with raw counts")
        where = f"layers['{layer}']" if layer else "adata.X"
        check_counts(matrix, where=where)
        empty_spots, empty_genes = empty_masks(matrix)
        if empty_spots.any() or empty_genes.any():
            raise ValueError(
                f"{where} has {int(empty_spots.sum())} spot(s) and {int(empty_genes.sum())} gene(s) with zero total "
                "count. Remove them first with `adata = spavae.data.filter_empty(adata)` (it reports what it removes "
                "and keeps locations aligned)."
            )
        return matrix.toarray() if hasattr(matrix, "toarray") else np.asarray(matrix)

    @staticmethod
    def _proteins(adata: ad.AnnData, protein_key: str | None) -> np.ndarray | None:
        if protein_key is None:
            return None
        if protein_key not in adata.obsm:
            raise KeyError(f"adata.obsm has no '{protein_key}' with protein counts; keys: {list(adata.obsm.keys())}")
        proteins = np.asarray(adata.obsm[protein_key], dtype=np.float64)
        if proteins.ndim != 2 or proteins.shape[0] != adata.n_obs:
            raise ValueError(f"obsm['{protein_key}'] must be spots x proteins, got shape {proteins.shape}")
        check_counts(proteins, where=f"obsm['{protein_key}']")
        return proteins

    # ------------------------------------------------------------------ training
    def train(
        self,
        *,
        max_epochs: int = 400,
        lr: float = 5e-3,
        weight_decay: float = 1e-6,
        batch_size: int | str = "auto",
        train_size: float = 0.95,
        patience: int = 50,
        beta: float = 10.0,
        dynamic_beta: bool = True,
        beta_min: float = 4.0,
        beta_max: float = 25.0,
        kl_target: float = 0.025,
        num_samples: int = 1,
        noise: float = 0.0,
        progress: bool = True,
        lr_scheduler: dict | None = None,
        callbacks: Sequence[Callable[[Trainer, dict], None]] = (),
        resume: dict | None = None,
    ) -> SpaVAE:
        """Train the model (AdamW, early stopping on the validation loss, PI-controlled beta).

        Parameters
        ----------
        max_epochs
            Maximum number of epochs.
        lr, weight_decay
            AdamW settings.
        batch_size
            Mini-batch size or ``'auto'`` (128/256/512 by number of spots).
        train_size
            Training fraction; the rest is held out for early stopping (1.0 = no validation).
        patience
            Early-stopping patience in epochs; the best weights are restored at the end.
        beta
            Initial (or, with ``dynamic_beta=False``, fixed) KL weight.
        dynamic_beta, beta_min, beta_max, kl_target
            PI controller toward ``kl_target * (n_gp + n_gauss)`` nats per spot, beta kept in ``[beta_min, beta_max]``.
        num_samples
            Latent samples per spot for the likelihood term.
        noise
            Standard deviation of the denoising-noise regulariser (0 = off).
        progress
            Show a progress bar with the current losses and beta.
        lr_scheduler
            ``None`` (constant learning rate) or keyword arguments of ``ReduceLROnPlateau`` (see
            :class:`~spavae.train.Trainer`).
        callbacks
            Functions ``callback(trainer, record)`` called after every epoch (see :class:`~spavae.train.Trainer`).
        resume
            A :meth:`Trainer.state_dict <spavae.train.Trainer.state_dict>` (from a checkpoint of a run with the same
            data and settings) to continue from: training runs until ``max_epochs`` epochs in total.
        """
        self.train_params = {k: v for k, v in locals().items() if k not in ("self", "callbacks", "resume")}
        set_seed(self.init_params["seed"])
        controller = (PIController(kl_target * self.module.n_latent, beta_init=beta, beta_min=beta_min, beta_max=beta_max)
                      if dynamic_beta else beta)
        generator = torch.Generator().manual_seed(self.init_params["seed"])
        trainer = Trainer(self.module, self.data, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                          train_size=train_size, patience=patience, beta=controller, num_samples=num_samples,
                          noise=noise, generator=generator, lr_scheduler=lr_scheduler, callbacks=callbacks)
        if resume is not None:
            trainer.load_state_dict(resume)
        if self.init_params["gp_n_obs"] == "train":
            self.module.n_obs = len(trainer.train_index)
        if resume is None or (trainer.state.stop_reason is None and trainer.state.epoch < max_epochs):
            trainer.fit(max_epochs - trainer.state.epoch, progress=progress)
        self.trainer = trainer
        self.history = pd.DataFrame(trainer.state.history)
        self.is_trained = True
        return self

    # ------------------------------------------------------------------ outputs
    def check_trained(self) -> None:
        """Raise a clear error unless the model has been trained (or loaded trained)."""
        if not self.is_trained:
            raise RuntimeError("the model is not trained yet: call .train() first (or SpaVAE.load a trained one)")

    def check_same_spots(self, adata: ad.AnnData) -> None:
        """Raise unless the model is trained and ``adata`` holds its spots and genes, in the same order."""
        self.check_trained()
        if list(adata.obs_names) != list(self.obs_names) or list(adata.var_names) != list(self.var_names):
            raise ValueError(
                "adata does not hold the spots and genes the model was trained on (names or order differ); "
                "pass the AnnData the model was built from"
            )

    def _batch(self, rows) -> Batch:
        covariates = None if self.data.covariates is None else self.data.covariates[rows]
        return Batch(self.data.expression[rows], self.data.locations[rows], None, self.data.size_factors[rows],
                     covariates)

    @torch.no_grad()
    def encode_all(self, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder means and variances of every training spot (``n_obs x D``), in eval mode and in chunks."""
        batch_size = batch_size or auto_batch_size(len(self.data))
        self.module.eval()
        outs = [self.module.encode(b.expression, b.covariates)
                for b in (self._batch(slice(i, i + batch_size)) for i in range(0, len(self.data), batch_size))]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    @torch.no_grad()
    def latent_posterior(self, *, mode: str = "full", batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Means and variances of ``q(z)`` for every spot (``n_obs x D`` tensors).

        Parameters
        ----------
        mode
            ``'full'``: the exact sparse-GP posterior given the encoder outputs of all spots (``b = N``).
            ``'chunked'``: the original's approximation, one mini-batch posterior per contiguous chunk of
            ``batch_size`` spots with ``N/|chunk|`` rescaling.
        batch_size
            Chunk size (memory bound; ``'auto'`` rule by default).
        """
        self.check_trained()
        if mode not in ("full", "chunked"):
            raise ValueError(f"mode must be 'full' or 'chunked', got {mode!r}")
        batch_size = batch_size or auto_batch_size(len(self.data))
        omega, phi2 = self.encode_all(batch_size)
        self.module.eval()
        n_gp, locs = self.module.n_gp, self.data.locations
        means, variances = [], []
        if mode == "full":
            self.module.gp.condition_on(locs, omega[:, :n_gp].to(GP_DTYPE), phi2[:, :n_gp].to(GP_DTYPE), len(locs))
        for start in range(0, len(locs), batch_size):
            rows = slice(start, start + batch_size)
            if mode == "chunked":
                self.module.gp.condition_on(locs[rows], omega[rows, :n_gp].to(GP_DTYPE), phi2[rows, :n_gp].to(GP_DTYPE),
                                            self.module.n_obs)
            mean, var = self.module.gp.marginals(locs[rows])
            means.append(mean), variances.append(var)
        gp_mean = torch.cat(means).to(omega.dtype)
        gp_var = torch.cat(variances).to(omega.dtype)
        return torch.cat([gp_mean, omega[:, n_gp:]], 1), torch.cat([gp_var, phi2[:, n_gp:]], 1)

    def get_latent_representation(self, *, mode: str = "full", batch_size: int | None = None) -> np.ndarray:
        """The latent embedding: GP posterior means then the Gaussian encoder means (``n_obs x D``)."""
        return self.latent_posterior(mode=mode, batch_size=batch_size)[0].cpu().numpy()

    @torch.no_grad()
    def get_denoised_counts(self, *, n_samples: int = 25, library_size: str = "observed", mode: str = "full",
                            batch_size: int | None = None, modality: str = "genes", seed: int = 0) -> np.ndarray:
        """Denoised values: the decoder output averaged over ``n_samples`` draws of ``q(z)``.

        Parameters
        ----------
        n_samples
            Latent draws per spot (25 as in the original scripts).
        library_size
            Genes only. ``'observed'``: counts at each spot's observed library size (mean times size factor);
            ``'normalized'``: the normalised scale (size factor 1, the original's output).
        mode, batch_size
            As in :meth:`latent_posterior`.
        modality
            ``'genes'`` (or peaks: the probabilities ``h`` of spaPeakVAE, without spot and peak factors; always on
            the normalised scale) or ``'proteins'`` (foreground counts ``(1 - pi~)(1 + alpha) v`` of spaMultiVAE).
        seed
            Seed of the latent draws (the same seed gives the same result).
        """
        if library_size not in ("observed", "normalized"):
            raise ValueError(f"library_size must be 'observed' or 'normalized', got {library_size!r}")
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        observation = {"genes": 0, "proteins": 1}.get(modality)
        if observation is None or observation >= len(self.module.observations):
            raise ValueError(f"modality must be 'genes' or, for a model with proteins, 'proteins'; got {modality!r}")
        mean, var = self.latent_posterior(mode=mode, batch_size=batch_size)
        out = self.module.decode_posterior(mean, var, covariates=self.data.covariates, n_samples=n_samples,
                                           batch_size=batch_size or auto_batch_size(len(self.data)), seed=seed,
                                           observation=observation)
        if library_size == "observed" and isinstance(self.module.observations[observation], NegativeBinomialObservation):
            out = out * self.data.size_factors[:, None]
        return out.cpu().numpy()

    def write_results(self, adata: ad.AnnData, *, key_added: str = "spavae", denoise: bool = True,
                      n_samples: int = 25) -> None:
        """Write the results into ``adata`` (which must hold the training spots in the same order).

        * ``obsm['X_<key>']``: the latent; ``obsm['X_<key>_gp']`` and ``obsm['X_<key>_gauss']`` its two parts;
        * ``layers['<key>_denoised']``: denoised counts at the observed library size (with ``denoise``);
        * ``uns['<key>']``: the model and training parameters, package versions and the final kernel scale.
        """
        self.check_same_spots(adata)
        latent = self.get_latent_representation()
        n_gp = self.module.n_gp
        adata.obsm[f"X_{key_added}"] = latent
        adata.obsm[f"X_{key_added}_gp"] = latent[:, :n_gp]
        adata.obsm[f"X_{key_added}_gauss"] = latent[:, n_gp:]
        if denoise:
            adata.layers[f"{key_added}_denoised"] = self.get_denoised_counts(n_samples=n_samples)
            if len(self.module.observations) > 1:
                adata.obsm[f"{key_added}_denoised_proteins"] = self.get_denoised_counts(n_samples=n_samples,
                                                                                        modality="proteins")
        adata.uns[key_added] = {"params": self.summary()}

    def summary(self) -> dict:
        """Model and training parameters, versions and fitted kernel scale (JSON/h5ad friendly)."""
        init = {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                for k, v in self.init_params.items()}
        init["encoder_layers"] = list(self.init_params["encoder_layers"])
        init["decoder_layers"] = list(self.init_params["decoder_layers"])
        versions = {name: importlib.metadata.version(name) for name in ("torch", "gpytorch", "pyro-ppl", "anndata")}
        versions["spavae"] = spavae.__version__
        out = {"init": init, "train": dict(self.train_params), "versions": versions,
               "kernel_scale": self.module.gp.kernel_scale, "n_epochs": int(len(self.history))}
        if "beta" in self.history:
            out["final_beta"] = float(self.history["beta"].iloc[-1])
        return {k: v for k, v in out.items() if v is not None}

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Save weights, init parameters, gene and spot names and history to one file (written atomically)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        payload = {"state_dict": self.module.state_dict(), "init_params": self.init_params,
                   "train_params": self.train_params, "var_names": list(self.var_names),
                   "obs_names": list(self.obs_names), "history": self.history.to_dict("list"),
                   "is_trained": self.is_trained, "version": spavae.__version__}
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)

    @classmethod
    def load(cls, path: str | os.PathLike, adata: ad.AnnData, *, device: str | torch.device | None = None) -> SpaVAE:
        """Load a model saved with :meth:`save` for ``adata`` (same genes, in the same order).

        The file is unpickled (it may hold a custom GPyTorch kernel): load only files you trust.
        """
        payload = torch.load(path, map_location="cpu", weights_only=False)
        if list(adata.var_names) != payload["var_names"]:
            raise ValueError(f"adata's genes differ from the {len(payload['var_names'])} genes the model was trained on")
        params = dict(payload["init_params"])
        if device is not None:
            params["device"] = device
        model = cls(adata, **params)
        model.module.load_state_dict(payload["state_dict"])
        model.train_params, model.is_trained = payload["train_params"], payload["is_trained"]
        model.history = pd.DataFrame(payload["history"])
        return model
