"""The AnnData-facing :class:`SpaVAE` model: counts and ``obsm['spatial']`` in, latent and denoised counts out."""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Sequence
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
from spavae.gp import SpatialGP, make_kernel
from spavae.model import SpaVAEModule
from spavae.train import Trainer, TrainingData, auto_batch_size
from spavae.utils import atomic_path, resolve_device, resolve_dtype, set_seed

GP_DTYPE = torch.float64


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
    n_gp, n_gauss
        Number of GP-prior and standard-normal latent dimensions (2 and 8).
    encoder_layers, decoder_layers
        Hidden widths ((128, 64) and (128,)).
    kernel
        ``'cauchy'`` (default), ``'eq'``, or any :class:`gpytorch.kernels.Kernel` on 2-D inputs.
    kernel_scale, fix_kernel_scale
        Initial (or fixed) scale of the built-in kernels (20).
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
        n_gp: int = 2,
        n_gauss: int = 8,
        encoder_layers: Sequence[int] = (128, 64),
        decoder_layers: Sequence[int] = (128,),
        kernel: str | Kernel = "cauchy",
        kernel_scale: float = 20.0,
        fix_kernel_scale: bool = False,
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
        if gp_n_obs not in ("all", "train"):
            raise ValueError(f"gp_n_obs must be 'all' or 'train', got {gp_n_obs!r}")
        if inducing not in ("grid", "kmeans"):
            raise ValueError(f"inducing must be 'grid' or 'kmeans', got {inducing!r}")
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        set_seed(seed)
        counts = self._counts(adata, layer)
        if spatial_key not in adata.obsm:
            raise KeyError(f"adata.obsm has no '{spatial_key}' with spot coordinates; keys: {list(adata.obsm.keys())}")
        locations = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
        check_locations(locations, adata.n_obs, where=f"obsm['{spatial_key}']")
        if adata.n_obs < 4:
            raise ValueError(f"spavae needs at least 4 spots, got {adata.n_obs}")
        self.var_names = pd.Index(adata.var_names).copy()
        self.obs_names = pd.Index(adata.obs_names).copy()
        self.size_factors = size_factors(counts)
        self.scaler = LocationScaler(loc_range).fit(locations)
        scaled = self.scaler.transform(locations)
        if inducing == "grid":
            points = grid_inducing_points(inducing_steps, loc_range)
        else:
            points = kmeans_inducing_points(scaled, n_inducing if n_inducing is not None else 49, seed=seed)
        gp = SpatialGP(torch.as_tensor(points, dtype=GP_DTYPE), n_gp,
                       make_kernel(kernel, scale=kernel_scale, fixed=fix_kernel_scale), learn_inducing_locations=learn_inducing)
        self.module = SpaVAEModule(adata.n_vars, gp, n_gauss, adata.n_obs, encoder_layers=tuple(encoder_layers),
                                   decoder_layers=tuple(decoder_layers), dropout=dropout)
        self.module.encoder.to(self.dtype), self.module.decoder.to(self.dtype), self.module.likelihood.to(self.dtype)
        self.module.gp.to(GP_DTYPE)
        self.module.to(self.device)
        self.data = TrainingData(
            torch.as_tensor(normalize_log_scale(counts, self.size_factors), dtype=self.dtype, device=self.device),
            torch.as_tensor(scaled, dtype=GP_DTYPE, device=self.device),
            torch.as_tensor(counts, dtype=self.dtype, device=self.device),
            torch.as_tensor(self.size_factors, dtype=self.dtype, device=self.device),
        )
        self.history: pd.DataFrame = pd.DataFrame()
        self.is_trained = False
        self.train_params: dict = {}

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
        """
        self.train_params = {k: v for k, v in locals().items() if k != "self"}
        set_seed(self.init_params["seed"])
        controller = (PIController(kl_target * self.module.n_latent, beta_init=beta, beta_min=beta_min, beta_max=beta_max)
                      if dynamic_beta else beta)
        generator = torch.Generator().manual_seed(self.init_params["seed"])
        trainer = Trainer(self.module, self.data, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                          train_size=train_size, patience=patience, beta=controller, num_samples=num_samples,
                          noise=noise, generator=generator)
        if self.init_params["gp_n_obs"] == "train":
            self.module.n_obs = len(trainer.train_index)
        trainer.fit(max_epochs, progress=progress)
        self.trainer = trainer
        self.history = pd.DataFrame(trainer.state.history)
        self.is_trained = True
        return self

    # ------------------------------------------------------------------ outputs
    def _check_trained(self) -> None:
        if not self.is_trained:
            raise RuntimeError("the model is not trained yet: call .train() first (or SpaVAE.load a trained one)")

    @torch.no_grad()
    def _encode_all(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.module.eval()
        outs = [self.module.encode(self.data.expression[i:i + batch_size])
                for i in range(0, len(self.data), batch_size)]
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
        self._check_trained()
        if mode not in ("full", "chunked"):
            raise ValueError(f"mode must be 'full' or 'chunked', got {mode!r}")
        batch_size = batch_size or auto_batch_size(len(self.data))
        omega, phi2 = self._encode_all(batch_size)
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
                            batch_size: int | None = None) -> np.ndarray:
        """Denoised expression: decoder means averaged over ``n_samples`` draws of ``q(z)``.

        Parameters
        ----------
        n_samples
            Latent draws per spot (25 as in the original scripts).
        library_size
            ``'observed'``: counts at each spot's observed library size (mean times size factor);
            ``'normalized'``: the normalised scale (size factor 1, the original's output).
        mode, batch_size
            As in :meth:`latent_posterior`.
        """
        if library_size not in ("observed", "normalized"):
            raise ValueError(f"library_size must be 'observed' or 'normalized', got {library_size!r}")
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        mean, var = self.latent_posterior(mode=mode, batch_size=batch_size)
        batch_size = batch_size or auto_batch_size(len(self.data))
        out = []
        for start in range(0, len(mean), batch_size):
            m, sd = mean[start:start + batch_size], var[start:start + batch_size].sqrt()
            draws = sum(self.module.decoder(m + sd * torch.randn_like(m)) for _ in range(n_samples)) / n_samples
            if library_size == "observed":
                draws = draws * self.data.size_factors[start:start + batch_size, None]
            out.append(draws)
        return torch.cat(out).cpu().numpy()

    def write_results(self, adata: ad.AnnData, *, key_added: str = "spavae", denoise: bool = True,
                      n_samples: int = 25) -> None:
        """Write the results into ``adata`` (which must hold the training spots in the same order).

        * ``obsm['X_<key>']``: the latent; ``obsm['X_<key>_gp']`` and ``obsm['X_<key>_gauss']`` its two parts;
        * ``layers['<key>_denoised']``: denoised counts at the observed library size (with ``denoise``);
        * ``uns['<key>']``: the model and training parameters, package versions and the final kernel scale.
        """
        self._check_trained()
        if list(adata.obs_names) != list(self.obs_names) or list(adata.var_names) != list(self.var_names):
            raise ValueError("adata does not hold the spots and genes the model was trained on (names or order differ)")
        latent = self.get_latent_representation()
        n_gp = self.module.n_gp
        adata.obsm[f"X_{key_added}"] = latent
        adata.obsm[f"X_{key_added}_gp"] = latent[:, :n_gp]
        adata.obsm[f"X_{key_added}_gauss"] = latent[:, n_gp:]
        if denoise:
            adata.layers[f"{key_added}_denoised"] = self.get_denoised_counts(n_samples=n_samples)
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
