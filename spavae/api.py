"""The AnnData-facing :class:`SpaVAE` model: counts and ``obsm['spatial']`` in, latent and denoised counts out."""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import torch

from spavae import __version__
from spavae.beta import PIController
from spavae.builder import GP_DTYPE, build_module
from spavae.data.batch import Batch
from spavae.data.setup import DataSetup
from spavae.data.spots import SpotData
from spavae.image.features import fit_image_features
from spavae.likelihoods import NegativeBinomialObservation
from spavae.train import Trainer, auto_batch_size
from spavae.utils import atomic_path, check_number, check_output_file, resolve_device, resolve_dtype, seeded

logger = logging.getLogger("spavae")

#: The architecture options of :func:`~spavae.builder.build_module` and their defaults (recorded in ``init_params``).
MODULE_DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(build_module).parameters.items()
                   if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("n_obs", "dtype")}
#: Version of the model-file layout written by :meth:`SpaVAE.save` (2: the fitted data setup and q(u) inside).
MODEL_FORMAT = 2
#: ``write_results`` writes the denoised counts in memory only up to this many values (spots x the model's genes and
#: proteins; 200 MB in float32); above, it says so and :meth:`SpaVAE.write_denoised` streams them to disk instead.
DENSE_OUTPUT_LIMIT = 50_000_000

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

    Building a model takes three steps, each in its own place: fit the data setup
    (:meth:`DataSetup.fit <spavae.data.setup.DataSetup.fit>`: genes, size-factor reference, encoder-input statistics,
    location frames, inducing points), prepare the spots (:class:`~spavae.data.spots.SpotData`: sparse counts, no
    dense copy) and build the module (:func:`~spavae.builder.build_module`). Then :meth:`train`.

    Parameters
    ----------
    adata
        Spots x genes AnnData with raw integer counts (in ``.X`` or ``layers[layer]``; dense, sparse, or on disk
        with ``backed='r'``) and coordinates in ``obsm[spatial_key]``. Spots or genes with zero total count are
        refused: remove them with :func:`spavae.data.filter_empty`, which reports what it removes. At least
        20 spots and 2 genes.
    layer
        Layer with the raw counts (``None`` = ``.X``).
    spatial_key
        ``obsm`` key of the ``n_obs x 2`` coordinates.
    batch_key
        ``obs`` column naming the section of each spot, for several sections in one model (spaVAE_Batch):
        coordinates are scaled per section, the GP kernel is zero across sections (:class:`~spavae.gp.SectionKernel`),
        every section has inducing points of its own (a grid over each section, or a share of one k-means budget:
        see ``n_inducing``), the one-hot section is fed to encoder and decoder, and the NB dispersion is per gene
        and section. Highly variable genes are then ranked within each section (``n_top_genes``).
    protein_key
        ``obsm`` key of spots x proteins counts, modelled with the NB mixture of spaMultiVAE next to the genes.
    image
        The tissue image as a second view of the same latent (``None``: no image view). Per-spot image features
        (:mod:`spavae.image`) are appended to the encoder input and decoded from the latent with a Gaussian
        likelihood weighted by ``image_weight`` (:class:`~spavae.likelihoods.ImageFeatureObservation`); spots
        whose patch is off the image or on background are left out of that likelihood. ``'auto'`` (the hires
        image of ``uns['spatial']``, else lowres), ``'hires'``, ``'lowres'``, the path of a full-resolution
        (OME-)TIFF, a key of ``obsm`` with features computed elsewhere, an :class:`~spavae.image.ImageSource`, or an
        :class:`~spavae.image.ImageFeatures` from :func:`~spavae.image.extract_image_features` (to choose its
        options). Image coordinates are ``obsm['spatial_fullres']`` when present, else ``obsm[spatial_key]``
        (:func:`~spavae.image.fit_image_features`). The extractor settings and the features' mean and SD are
        kept in the data setup and the model file, so :meth:`load` and every analysis compute the features of
        new spots the same way (from the stored image key, ``obsm`` key or file; when ``setup`` is given,
        ``image`` only says where the image is, for a source that cannot be stored).
    likelihood
        ``'nb'`` for counts or ``'bernoulli'`` for binarised peaks (spaPeakVAE; the matrix is binarised).
    n_top_genes
        Keep this many highly variable genes (count-based Seurat v3, :func:`spavae.data.genes.highly_variable_genes`);
        ``'auto'`` keeps 2,000 when the input has more than 6,000 genes (whole transcriptomes) and every gene
        otherwise (targeted panels, the preselected DLPFC genes); ``None`` keeps every gene. With ``batch_key`` the
        genes are ranked within each section and the ranks combined, as scanpy's ``seurat_v3`` with ``batch_key``.
        When genes are selected, a spot's library size (the numerator of its size factor) still sums all the genes of
        ``adata`` (:meth:`DataSetup.library_sizes <spavae.data.setup.DataSetup.library_sizes>`).
    input_axes
        What the encoder reads of the genes. ``'auto'`` (default): when the model has more than twice as many genes
        as spots (a few-hundred-spot ST section with 2,000 genes), the z-scored gene input projected onto its first
        10 principal axes, fitted on the training spots; otherwise the genes themselves
        (:func:`spavae.data.input_axes.auto_input_axes`). An integer: that many axes, always; ``None``: the genes,
        always. The decoder models every gene either way; the axes are kept in the data setup and the model file,
        so new spots are projected onto the training axes. Not for binarised peaks.
    loc_range, location_frame
        How spot coordinates become GP inputs, per section (:class:`~spavae.data.frame.LocationFrame`).
        ``'aligned'`` (default): Visium array indices are put on their hexagonal lattice; where the variances along
        the spots' principal axes differ by a factor 2 or more the spots are turned onto those axes, else they keep
        the input axes; one isotropic scale from the spots' covariance gives the tissue an area of
        ``loc_range**2`` (a square section gets ``[0, 20]^2``). So the frame does not depend on the units or the
        spot pitch (docs/model.md, Location frame). ``'minmax'``: the original's per-axis min-max scaling to
        ``[0, loc_range]``.
    inducing, inducing_steps, n_inducing
        ``'grid'``: ``(inducing_steps + 1)**2`` points (steps 6 = 49 points), one grid per section; without
        ``inducing_steps``, 13 x 13 on a section of up to 2,000 spots and the original's 7 x 7 above
        (:func:`spavae.data.setup.auto_grid_steps`); ``'kmeans'``:
        ``n_inducing`` centroids of the scaled locations (default 49); ``'auto'``: the grid up to 20,000 spots, else
        ``n_spots / 500`` k-means centroids (49 to 300) that follow the tissue
        (:func:`spavae.data.setup.auto_inducing`). With several sections the k-means count (``n_inducing``, or the
        ``'auto'`` count from all the spots) is the **total** over the sections, shared in proportion to their
        spots (:func:`spavae.data.inducing.split_inducing`): at least one point per section when ``n_inducing`` is
        given (it is then kept exactly), at least 4 (or the section's distinct locations) when the model chooses.
    gp_n_obs
        ``N`` in the ``N/b`` rescaling: ``'all'`` spots (the original) or only the ``'train'`` split.
    dtype
        dtype of the networks (``'float32'`` default); the GP algebra always runs in float64.
    device
        ``'auto'`` (CUDA if available), ``'cpu'`` or ``'cuda'``.
    seed
        Seed for weight initialisation, the split, shuffling and sampling. Building, loading and training a model
        draw from generators seeded with it and leave the global random state of the session (Python, NumPy,
        torch, Pyro) as they found it.
    setup
        A fitted :class:`~spavae.data.setup.DataSetup` to use instead of fitting one on ``adata`` (how
        :meth:`load` applies a saved model to new spots); the data options above are then taken from it.
    **module_options
        Architecture options of :func:`~spavae.builder.build_module`: ``n_gp`` and ``n_gauss`` (2 and 8),
        ``encoder`` (``'dense'``/``'conv'``), ``encoder_layers``, ``decoder_layers``, ``decoder``
        (``'mlp'``/``'linear'``), ``protein_layers``, ``latent_distribution``, ``learn_gauss_prior``,
        ``dispersion``, ``kernel`` (``'cauchy'``, ``'eq'``, ``'matern12/32/52'`` or any GPyTorch kernel),
        ``kernel_scale``, ``fix_kernel_scale``, ``per_dimension_kernel``, ``per_section_kernel``,
        ``variational`` (``'closed_form'``/``'learned'``), ``learn_inducing``, ``dropout``, ``image_weight``.
    """

    def __init__(
        self,
        adata: ad.AnnData,
        *,
        layer: str | None = None,
        spatial_key: str = "spatial",
        batch_key: str | None = None,
        protein_key: str | None = None,
        image=None,
        likelihood: str = "nb",
        n_top_genes: int | str | None = "auto",
        input_axes: int | str | None = "auto",
        loc_range: float = 20.0,
        location_frame: str = "aligned",
        inducing: str = "auto",
        inducing_steps: int | None = None,
        n_inducing: int | None = None,
        gp_n_obs: str = "all",
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "auto",
        seed: int = 0,
        setup: DataSetup | None = None,
        **module_options,
    ):
        unknown = sorted(set(module_options) - set(MODULE_DEFAULTS))
        if unknown:
            raise TypeError(f"SpaVAE got unknown option(s) {unknown}; the architecture options are "
                            f"{sorted(MODULE_DEFAULTS)}")
        module_options = MODULE_DEFAULTS | module_options
        self.init_params = {k: v for k, v in locals().items()
                            if k not in ("self", "adata", "image", "setup", "module_options", "unknown", "__class__")
                            } | module_options
        if gp_n_obs not in ("all", "train"):
            raise ValueError(f"gp_n_obs must be one of ['all', 'train'], got {gp_n_obs!r}")
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        image_features = None if image is None or setup is not None else \
            fit_image_features(adata, image, spatial_key=spatial_key)
        with seeded(seed, self.device):  # the weights depend on the seed alone; the caller's generators are untouched
            self.setup = setup if setup is not None else DataSetup.fit(
                adata, layer=layer, spatial_key=spatial_key, batch_key=batch_key, protein_key=protein_key,
                likelihood=likelihood, n_top_genes=n_top_genes, loc_range=loc_range, location_frame=location_frame,
                inducing=inducing, inducing_steps=inducing_steps, n_inducing=n_inducing, input_axes=input_axes,
                seed=seed, image_features=image_features)
            self.data = SpotData(adata, self.setup, device=self.device, dtype=self.dtype, gp_dtype=GP_DTYPE,
                                 image=image if image_features is None else image_features)
            self.module = build_module(self.setup, n_obs=len(self.data), dtype=self.dtype, **module_options)
            self.module.to(self.device)
        self.history: pd.DataFrame = pd.DataFrame()
        self.is_trained = False
        self.train_params: dict = {}
        self._gp_posterior: dict | None = None

    @property
    def var_names(self) -> pd.Index:
        """The model's genes, in the order of its outputs."""
        return pd.Index(self.setup.genes)

    @property
    def latent_names(self) -> list[str]:
        """Names of the latent dimensions, in order: ``gp0``, ``gp1``, ..., then ``gauss0``, ``gauss1``, ..."""
        return [f"gp{i}" for i in range(self.module.n_gp)] + [f"gauss{i}" for i in range(self.module.n_gauss)]

    @property
    def obs_names(self) -> pd.Index:
        """The spots the model's outputs refer to (those of the AnnData it was built or loaded with)."""
        return self.data.obs_names

    @property
    def size_factors(self) -> np.ndarray:
        """Size factor of each of the model's spots (library size / the setup's median; 1 for binarised peaks)."""
        return self.data.size_factors.cpu().numpy().astype(np.float64)

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

    # ------------------------------------------------------------------ training
    def train(
        self,
        *,
        max_epochs: int = 400,
        max_steps: int | str | None = "auto",
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

        Training ends at ``max_epochs``, at ``max_steps``, on early stopping or on a numerical failure (a NaN loss
        or a failed Cholesky factorisation: a warning with advice); in every case with the best validation weights
        (or, without validation, the last good ones). Then the GP posterior q(u) given all spots is computed once
        and kept: latents, denoising, prediction and the saved model use it.

        In a process of an initialised ``torch.distributed`` group (e.g. started by ``torchrun``), every rank of the
        group trains this one model data-parallel on its share of each mini-batch (``batch_size`` is the global
        batch; see :mod:`spavae.distributed`); build it with the same data, setup and seed on every rank.

        Parameters
        ----------
        max_epochs
            Maximum number of epochs. An epoch is one pass over the training spots, or
            :data:`~spavae.train.MAX_STEPS_PER_EPOCH` steps on a fresh random sample of them for large sections,
            so that validation, early stopping and the history keep their rhythm whatever the number of spots.
        max_steps
            Budget of optimisation steps; ``'auto'`` is :data:`~spavae.train.AUTO_MAX_STEPS` (5,000: it binds only
            above about 6,500 spots, where it caps the training time) and ``None`` means no budget.
        lr, weight_decay
            AdamW settings.
        batch_size
            Mini-batch size or ``'auto'`` (128/256/512 by number of spots).
        train_size
            Training fraction; the rest (at most :data:`~spavae.train.MAX_VALIDATION` spots, and none if that would
            be a single spot) is held out for early stopping (1.0 = no validation).
        patience
            Early-stopping patience in epochs.
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
        check_number("max_epochs", max_epochs, integer=True, low=1)
        check_number("beta", beta, low=0, inclusive=False)
        if dynamic_beta:
            check_number("beta_min", beta_min, low=0, inclusive=False)
            check_number("kl_target", kl_target, low=0, inclusive=False)
        if resume is not None and not (isinstance(resume, dict) and {"module", "split", "state"} <= set(resume)):
            raise ValueError("resume must be a Trainer.state_dict() (the 'trainer' entry of a checkpoint-epoch*.pth)")
        # the dropout masks and latent draws depend on the seed alone; the caller's generators are untouched
        with seeded(self.init_params["seed"], self.device):
            controller = (PIController(kl_target * self.module.n_latent, beta_init=beta, beta_min=beta_min,
                                       beta_max=beta_max) if dynamic_beta else beta)
            generator = torch.Generator().manual_seed(self.init_params["seed"])
            trainer = Trainer(self.module, self.data, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                              train_size=train_size, patience=patience, beta=controller, num_samples=num_samples,
                              noise=noise, generator=generator, lr_scheduler=lr_scheduler, callbacks=callbacks,
                              max_steps=max_steps)
            if resume is not None:
                trainer.load_state_dict(resume)
            if self.init_params["gp_n_obs"] == "train":
                self.module.n_obs = len(trainer.train_index)
            self.trainer, self._gp_posterior = trainer, None
            try:
                if not trainer.finished(max_epochs):
                    trainer.fit(max_epochs - trainer.state.epoch, progress=progress)
            finally:
                trainer.restore_best()
                self.history = pd.DataFrame(trainer.state.history)
            self.is_trained = True
            self.refresh_gp_posterior()
        return self

    # ------------------------------------------------------------------ outputs
    def check_trained(self) -> None:
        """Raise a clear error unless the model has been trained (or loaded trained)."""
        if not self.is_trained:
            raise RuntimeError("the model is not trained yet: call .train() first (or SpaVAE.load a trained one)")

    def check_same_spots(self, adata: ad.AnnData) -> None:
        """Raise unless the model is trained and ``adata`` holds its spots, in the same order, and its genes."""
        self.check_trained()
        if list(adata.obs_names) != list(self.obs_names):
            raise ValueError("adata does not hold the spots of the model (names or order differ); pass the AnnData "
                             "the model was built or loaded with")
        self.setup.gene_columns(adata)

    def _spots(self, adata: ad.AnnData | None) -> SpotData:
        """The model's own spots, or those of ``adata`` prepared with the fitted setup."""
        if adata is None:
            return self.data
        return SpotData(adata, self.setup, device=self.device, dtype=self.dtype, gp_dtype=GP_DTYPE)

    def _batch_size(self, batch_size: int | None, spots: SpotData) -> int:
        if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        return int(batch_size or auto_batch_size(len(spots)))

    @torch.no_grad()
    def encode_all(self, batch_size: int | None = None, *, adata: ad.AnnData | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder means and variances of every spot (``n_obs x D``), in eval mode and in chunks."""
        spots = self._spots(adata)
        self.module.eval()
        outs = [self.module.encode(b.expression, b.covariates) for b in spots.chunks(self._batch_size(batch_size, spots))]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def refresh_gp_posterior(self, batch_size: int | None = None) -> None:
        """Recompute the kept q(u) from the model's current spots and weights (done at the end of :meth:`train`).

        A model from :meth:`load` keeps the q(u) saved with it, given its training spots; this conditions it on the
        spots it was loaded with instead. The permutation null of the SVG test does so after loading a null model's
        weights onto the spots at their true locations (:func:`~spavae.analysis.svg.permutation_null`)."""
        self._gp_posterior = self._full_data_posterior(batch_size)

    @torch.no_grad()
    def _full_data_posterior(self, batch_size: int | None = None) -> dict | None:
        """q(u) given the encoder outputs of all of the model's spots (b = N), computed chunk by chunk."""
        self.module.eval()
        n_gp, gp = self.module.n_gp, self.module.gp

        def chunks():
            for b in self.data.chunks(self._batch_size(batch_size, self.data)):
                omega, phi2 = self.module.encode(b.expression, b.covariates)
                yield b.locations, omega[:, :n_gp].to(GP_DTYPE), phi2[:, :n_gp].to(GP_DTYPE)

        gp.condition_on_chunks(chunks())
        return gp.posterior_state()

    @torch.no_grad()
    def latent_posterior(self, *, mode: str = "full", batch_size: int | None = None,
                         adata: ad.AnnData | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Means and variances of ``q(z)`` for every spot (``n_obs x D`` tensors).

        Parameters
        ----------
        mode
            ``'full'``: the sparse-GP posterior given the encoder outputs of all training spots (``b = N``), fitted
            once after training and saved with the model, so a spot's latent does not depend on which other spots
            are passed. ``'chunked'``: the original's approximation, one mini-batch posterior per contiguous chunk of
            ``batch_size`` spots with ``N/|chunk|`` rescaling.
        batch_size
            Chunk size (memory bound; ``'auto'`` rule by default).
        adata
            Spots to embed, prepared with the model's fitted setup (default: the model's own spots).
        """
        self.check_trained()
        if mode not in ("full", "chunked"):
            raise ValueError(f"mode must be 'full' or 'chunked', got {mode!r}")
        spots = self._spots(adata)
        batch_size = self._batch_size(batch_size, spots)
        omega, phi2 = self.encode_all(batch_size, adata=adata)
        self.module.eval()
        n_gp, gp, locs = self.module.n_gp, self.module.gp, spots.locations
        means, variances = [], []
        if mode == "full":
            gp.set_posterior_state(self._gp_posterior)
        for start in range(0, len(locs), batch_size):
            rows = slice(start, start + batch_size)
            if mode == "chunked":
                gp.condition_on(locs[rows], omega[rows, :n_gp].to(GP_DTYPE), phi2[rows, :n_gp].to(GP_DTYPE),
                                self.module.n_obs)
            mean, var = gp.marginals(locs[rows])
            means.append(mean), variances.append(var)
        gp_mean = torch.cat(means).to(omega.dtype)
        gp_var = torch.cat(variances).to(omega.dtype)
        return torch.cat([gp_mean, omega[:, n_gp:]], 1), torch.cat([gp_var, phi2[:, n_gp:]], 1)

    def get_latent_representation(self, *, mode: str = "full", batch_size: int | None = None,
                                  adata: ad.AnnData | None = None) -> np.ndarray:
        """The latent embedding: GP posterior means then the Gaussian encoder means (``n_obs x D``)."""
        return self.latent_posterior(mode=mode, batch_size=batch_size, adata=adata)[0].cpu().numpy()

    def _gene_positions(self, genes: Sequence[str] | None) -> np.ndarray | None:
        if genes is None:
            return None
        genes = [genes] if isinstance(genes, str) else list(genes)
        if not genes:
            raise ValueError("genes= is empty; give at least one of the model's genes, or None for all of them")
        positions = self.var_names.get_indexer(genes)
        missing = [g for g, p in zip(genes, positions) if p < 0]
        if missing:
            raise KeyError(f"gene(s) {missing[:5]} are not among the model's {len(self.var_names)} genes")
        return positions

    def _observation_index(self, modality: str) -> int:
        """Position of a modality's observation model: ``'genes'`` (or peaks), ``'proteins'``, ``'image'``."""
        sites = {"genes": ("counts", "peaks"), "proteins": ("proteins",), "image": ("image",)}
        for index, observation in enumerate(self.module.observations):
            if observation.site in sites.get(modality, ()):
                return index
        available = [name for name, names in sites.items()
                     if any(o.site in names for o in self.module.observations)]
        raise ValueError(f"modality must be one of this model's {available}; got {modality!r}")

    @torch.no_grad()
    def iter_denoised(self, *, n_samples: int = 25, library_size: str = "observed", mode: str = "full",
                      batch_size: int | None = None, modality: str = "genes", genes: Sequence[str] | None = None,
                      seed: int = 0, adata: ad.AnnData | None = None):
        """Denoised values chunk by chunk: yields ``(start, block)`` with ``block`` a ``float32`` array of the
        spots ``start:start + len(block)`` (see :meth:`get_denoised_counts` for the parameters).

        Memory is one chunk of spots x genes at a time, so the whole matrix can be written to disk
        (:meth:`write_denoised`) without ever being held.
        """
        if library_size not in ("observed", "normalized"):
            raise ValueError(f"library_size must be 'observed' or 'normalized', got {library_size!r}")
        if not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
            raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
        observation = self._observation_index(modality)
        if genes is not None and modality != "genes":
            raise ValueError(f"genes= selects model genes; it cannot be used with modality={modality!r}")
        self._gene_positions(genes)  # unknown genes fail before any work
        spots = self._spots(adata)
        batch_size = self._batch_size(batch_size, spots)
        mean, var = self.latent_posterior(mode=mode, batch_size=batch_size, adata=adata)
        scale_by_library = library_size == "observed" and \
            isinstance(self.module.observations[observation], NegativeBinomialObservation)
        for start, block in self.decode_latent(mean, var, covariates=spots.covariates, n_samples=n_samples,
                                               genes=genes, seed=seed, batch_size=batch_size,
                                               observation=observation):
            if scale_by_library:
                block *= spots.size_factors[start:start + len(block)].cpu().numpy()[:, None]
            yield start, block

    @torch.no_grad()
    def decode_latent(self, mean: torch.Tensor, var: torch.Tensor, *, covariates: torch.Tensor | None = None,
                      n_samples: int = 25, genes: Sequence[str] | None = None, seed: int = 0,
                      batch_size: int | None = None, observation: int = 0):
        """Decoder means averaged over ``n_samples`` draws of ``N(mean, var)``, chunk by chunk (normalised scale).

        Yields ``(start, block)``: ``float32`` arrays of rows ``start:start + len(block)`` and the model's genes (or
        ``genes``, in that order). The draws are common random numbers (draw ``s`` of every row is
        ``mean + sd * noise[s]``), so a row's result depends only on its own posterior and the seed, whatever other
        rows are decoded with it. Used by denoising, prediction and enhancement.
        """
        positions = self._gene_positions(genes)
        batch_size = batch_size or auto_batch_size(len(mean))
        generator = torch.Generator(device=mean.device).manual_seed(seed)
        noise = torch.randn((n_samples, mean.shape[1]), generator=generator, dtype=mean.dtype, device=mean.device)
        columns = None if positions is None else torch.as_tensor(positions, device=mean.device)
        self.module.eval()
        for start in range(0, len(mean), batch_size):
            rows = slice(start, start + batch_size)
            batch = Batch(None, None, None, None, None if covariates is None else covariates[rows])
            sd = var[rows].clamp_min(0.0).sqrt()
            out = sum(self.module.denoise(mean[rows] + sd * draw, batch, observation) for draw in noise) / n_samples
            if columns is not None:
                out = out[:, columns]
            yield start, out.cpu().numpy().astype(np.float32, copy=False)

    def get_denoised_counts(self, *, n_samples: int = 25, library_size: str = "observed", mode: str = "full",
                            batch_size: int | None = None, modality: str = "genes", genes: Sequence[str] | None = None,
                            seed: int = 0, adata: ad.AnnData | None = None) -> np.ndarray:
        """Denoised values: the decoder output averaged over ``n_samples`` draws of ``q(z)`` (``float32``).

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
            the normalised scale), ``'proteins'`` (foreground counts ``(1 - pi~)(1 + alpha) v`` of spaMultiVAE) or
            ``'image'`` (the decoded image features of a model with the image view, standardised).
        genes
            Only these genes (columns in this order): ``n_obs x len(genes)`` in memory. For every gene of a large
            section, stream to disk with :meth:`write_denoised` instead.
        seed
            Seed of the latent draws. The draws are common random numbers (the same standard-normal draws for
            every spot), so a spot's result depends only on its own posterior and the seed, whatever other spots
            are denoised with it.
        adata
            Spots to denoise, prepared with the model's fitted setup (default: the model's own spots).
        """
        blocks = [block for _, block in self.iter_denoised(
            n_samples=n_samples, library_size=library_size, mode=mode, batch_size=batch_size, modality=modality,
            genes=genes, seed=seed, adata=adata)]
        return np.concatenate(blocks) if len(blocks) > 1 else blocks[0]

    def write_denoised(self, path: str | os.PathLike, *, key: str = "spavae_denoised", n_samples: int = 25,
                       library_size: str = "observed", batch_size: int | None = None, seed: int = 0,
                       adata: ad.AnnData | None = None, overwrite: bool = False) -> Path:
        """Write the denoised counts of every spot and gene to ``layers[key]`` of a new ``.h5ad``, chunk by chunk.

        The file holds the spots (``obs_names``, ``obsm['spatial']``) and the model's genes; the layer is written
        block by block of spots, so no ``N x G`` array is ever in memory. Open it with
        ``anndata.read_h5ad(path, backed='r')`` or read the layer's rows with h5py. The file appears only once
        complete.
        """
        path = Path(path)
        if path.suffix != ".h5ad":
            raise ValueError(f"{path}: the denoised layer is written to an .h5ad file; give a path ending in .h5ad")
        path = check_output_file(path, overwrite=overwrite)
        if not isinstance(key, str) or not key or "/" in key:
            raise ValueError(f"key must be a non-empty layer name without '/', got {key!r}")
        spots = self._spots(adata)
        shell = ad.AnnData(obs=pd.DataFrame(index=spots.obs_names.astype(str)),
                           var=pd.DataFrame(index=self.var_names.astype(str)))
        shell.obsm["spatial"] = self.setup.unscale_locations(spots.scaled_locations, spots.section_codes)
        with atomic_path(path) as tmp:
            shell.write_h5ad(tmp)
            with h5py.File(tmp, "r+") as handle:
                layers = handle.require_group("layers")
                layers.attrs.setdefault("encoding-type", "dict")
                layers.attrs.setdefault("encoding-version", "0.1.0")
                shape = (len(spots), len(self.var_names))
                dataset = layers.create_dataset(key, shape=shape, dtype="float32",
                                                chunks=(min(shape[0], 1024), min(shape[1], 1024)))
                dataset.attrs["encoding-type"], dataset.attrs["encoding-version"] = "array", "0.2.0"
                for start, block in self.iter_denoised(n_samples=n_samples, library_size=library_size,
                                                       batch_size=batch_size, seed=seed, adata=adata):
                    dataset[start:start + len(block)] = block
        return path

    def write_results(self, adata: ad.AnnData, *, key_added: str = "spavae", denoise: bool | str = "auto",
                      n_samples: int = 25) -> None:
        """Write the results into ``adata`` (which must hold the model's spots in the same order).

        * ``obsm['X_<key>']``: the latent; ``obsm['X_<key>_gp']`` and ``obsm['X_<key>_gauss']`` its two parts;
        * with ``denoise``: the denoised counts of the model's genes at the observed library size, and of nothing
          else: genes the model never saw get no values, rather than zeros that would look like predictions.
          When ``adata``'s genes are the model's genes (in any order; e.g. every gene was kept), they go to
          ``layers['<key>_denoised']``; when ``adata`` has other genes too (e.g. the model kept the highly variable
          ones), to ``obsm['<key>_denoised']`` (spots x model genes), with the genes, in its column order, in
          ``uns['<key>']['denoised_genes']``. A model with proteins adds ``obsm['<key>_denoised_proteins']``.
          ``'auto'`` writes them up to 50 million values (spots x model genes and proteins) and otherwise says to
          use :meth:`write_denoised`, which streams them to disk;
        * ``uns['<key>']['params']``: the model and training parameters, package versions and the final kernel scale.
        """
        self.check_same_spots(adata)
        latent = self.get_latent_representation()
        n_gp = self.module.n_gp
        adata.obsm[f"X_{key_added}"] = latent
        adata.obsm[f"X_{key_added}_gp"] = latent[:, :n_gp]
        adata.obsm[f"X_{key_added}_gauss"] = latent[:, n_gp:]
        info: dict = {"params": self.summary()}
        if denoise == "auto":
            n_values = len(self.obs_names) * (len(self.var_names) + self.setup.n_proteins)
            denoise = n_values <= DENSE_OUTPUT_LIMIT
            if not denoise:
                logger.warning("not writing the denoised counts: %d spots x %d genes%s; use model.write_denoised(path) "
                               "to stream them to disk, or get_denoised_counts(genes=[...]) for a few genes",
                               len(self.obs_names), len(self.var_names),
                               f" and {self.setup.n_proteins} proteins" if self.setup.n_proteins else "")
        if denoise:
            genes = self.store_denoised(adata, self.get_denoised_counts(n_samples=n_samples), f"{key_added}_denoised")
            if genes is not None:
                info["denoised_genes"] = genes
            if self.setup.n_proteins:
                adata.obsm[f"{key_added}_denoised_proteins"] = self.get_denoised_counts(n_samples=n_samples,
                                                                                        modality="proteins")
        adata.uns[key_added] = info

    def store_denoised(self, adata: ad.AnnData, denoised: np.ndarray, key: str) -> list[str] | None:
        """Put ``denoised`` (spots x the model's genes) into ``adata`` without values for genes the model never saw.

        When ``adata``'s genes are the model's (in any order) it becomes ``layers[key]`` in ``adata``'s gene order
        and ``None`` is returned; otherwise it goes to ``obsm[key]`` in the model's gene order, and the model's gene
        names (that order) are returned for the caller to record in ``uns``.
        """
        columns = self.setup.gene_columns(adata)
        if columns is None:
            adata.layers[key] = denoised
        elif len(columns) == adata.n_vars:  # the model's genes in another order: adata's order
            adata.layers[key] = denoised[:, np.argsort(columns)]
        else:
            adata.obsm[key] = denoised
            return list(self.var_names)
        return None

    def summary(self) -> dict:
        """Model and training parameters, versions and fitted kernel scale (JSON/h5ad friendly)."""
        init = {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                for k, v in self.init_params.items()}
        for key in ("encoder_layers", "decoder_layers", "protein_layers"):
            if key in self.init_params:
                init[key] = list(self.init_params[key])
        versions = {name: importlib.metadata.version(name) for name in ("torch", "gpytorch", "pyro-ppl", "anndata")}
        versions["spavae"] = __version__
        train = {k: v for k, v in self.train_params.items() if v is not None}
        out = {"init": init, "train": train, "versions": versions, "n_genes": len(self.var_names),
               "n_inducing": int(len(self.setup.inducing_points)),
               "kernel_scale": self.module.gp.kernel_scale, "n_epochs": int(len(self.history))}
        if self.setup.gene_selection:
            out["gene_selection"] = dict(self.setup.gene_selection)
        if self.setup.image is not None:
            settings = self.setup.image["settings"]
            out["image"] = {"features": list(self.setup.image["names"]), "extractor": settings["extractor"],
                            "source": {k: str(v) for k, v in settings["source"].items()},
                            "weight": float(self.init_params["image_weight"])}
        if "beta" in self.history:
            out["final_beta"] = float(self.history["beta"].iloc[-1])
        return {k: v for k, v in out.items() if v is not None}

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Save weights, settings, the fitted data setup, the full-data q(u) and the history to one file.

        The file is written atomically: a crash leaves any previous file untouched and no partial file.
        """
        path = check_output_file(path, overwrite=overwrite)
        posterior = self._gp_posterior if self._gp_posterior is not None else self._full_data_posterior()
        payload = {"format": MODEL_FORMAT, "version": __version__, "state_dict": self.module.state_dict(),
                   "init_params": self.init_params, "setup": self.setup.to_dict(), "gp_posterior": posterior,
                   "train_params": self.train_params, "history": self.history.to_dict("list"), "n_spots": len(self.data),
                   "is_trained": self.is_trained}
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)

    @classmethod
    def load(cls, path: str | os.PathLike, adata: ad.AnnData, *, device: str | torch.device | None = None,
             image=None) -> SpaVAE:
        """Load a model saved with :meth:`save` and apply it to the spots of ``adata``.

        A model with the image view computes ``adata``'s image features with its stored extractor settings and
        standardisation, from the stored image key, ``obsm`` key or file, or from ``image`` (an image source, e.g.
        the slide's new path, or :class:`~spavae.image.ImageFeatures` made with the model's state).

        ``adata`` needs the model's genes (any order; extra genes are ignored) and coordinates; for a
        multi-section model, the section column. It is prepared with the **saved** data setup (genes,
        size-factor reference, encoder statistics, location frames) and the saved q(u) gives the GP posterior,
        so a spot's latent, denoised counts and predictions do not depend on which other spots are passed.
        The file is unpickled (it may hold a custom GPyTorch kernel): load only files you trust.
        """
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"{path} is a folder; give the model file (e.g. a run's checkpoint/model_best.pth)")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such model file")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a model file"
            raise ValueError(f"{path} is not a readable spavae model file ({type(err).__name__}: truncated, damaged "
                             "or another kind of file); give a file written by SpaVAE.save") from None
        if isinstance(payload, dict) and "trainer" in payload and "state_dict" not in payload:
            raise ValueError(f"{path} is a training checkpoint, not a model file; load the run's "
                             "checkpoint/model_best.pth, or continue training with `spavae resume RUN_DIR`")
        if not isinstance(payload, dict) or "state_dict" not in payload:
            raise ValueError(f"{path} is not a spavae model file; give a file written by SpaVAE.save")
        if isinstance(payload.get("format"), int) and payload["format"] > MODEL_FORMAT:
            raise ValueError(f"{path} was written by spavae {payload.get('version', '?')} (model format "
                             f"{payload['format']}), newer than this spavae {__version__} (format "
                             f"{MODEL_FORMAT}); upgrade spavae to load it")
        if payload.get("format") != MODEL_FORMAT:
            raise ValueError(f"{path} was written by spavae {payload.get('version', '?')} without the fitted data "
                             f"setup that spavae {__version__} needs (model format {MODEL_FORMAT}); "
                             "train the model again with this version")
        params = dict(payload["init_params"])
        if device is not None:
            params["device"] = device
        model = cls(adata, setup=DataSetup.from_dict(payload["setup"]), image=image, **params)
        model.module.load_state_dict(payload["state_dict"])
        model.train_params, model.is_trained = payload["train_params"], payload["is_trained"]
        model.history = pd.DataFrame(payload["history"])
        model._gp_posterior = payload["gp_posterior"]
        return model
