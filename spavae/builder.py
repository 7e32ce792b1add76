"""Build the :class:`~spavae.model.SpaVAEModule` for a fitted data setup: kernel, GP, observation models, encoder.

:func:`build_module` holds every architecture option of :class:`~spavae.SpaVAE` (the data options live in
:meth:`DataSetup.fit <spavae.data.setup.DataSetup.fit>`), so the AnnData-facing class reads as "fit the data
setup, build the module, train".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from gpytorch.kernels import Kernel

from spavae.data.setup import DataSetup
from spavae.gp import SectionKernel, SpatialGP, make_kernel
from spavae.likelihoods import (
    BernoulliObservation, ImageFeatureObservation, NegativeBinomialObservation, ProteinMixtureObservation,
)
from spavae.model import SpaVAEModule
from spavae.nn import ConvEncoder
from spavae.utils import check_number

#: dtype of the GP algebra (kernel matrices, Cholesky factors, inducing points), whatever the network dtype.
GP_DTYPE = torch.float64

CHOICES = {"encoder": ("dense", "conv"), "decoder": ("mlp", "linear"), "dispersion": ("auto", "gene", "gene-batch"),
           "latent_distribution": ("normal", "lognormal"), "variational": ("closed_form", "learned")}


def build_module(
    setup: DataSetup,
    *,
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
    learn_inducing: bool = False,
    dropout: float = 0.0,
    image_weight: float = 1.0,
    n_obs: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> SpaVAEModule:
    """The spaVAE module for ``setup``, networks in ``dtype`` and the GP in float64.

    Parameters
    ----------
    setup
        The fitted data setup (genes, proteins, sections, inducing points).
    n_gp, n_gauss
        Number of GP-prior and standard-normal latent dimensions (2 and 8).
    encoder
        ``'dense'`` (the original's MLP) or ``'conv'``: a ``Conv1d(1 -> 2, k=5)`` + ``MaxPool1d(2)`` front-end
        over the input before the dense layers (:class:`~spavae.nn.ConvEncoder`).
    encoder_layers, decoder_layers, protein_layers
        Hidden widths of the encoder, the gene decoder and the protein trunks ((128, 64), (128,), (128,)).
    decoder
        ``'mlp'`` or ``'linear'`` (positive weights, spaLDVAE).
    latent_distribution, learn_gauss_prior
        ``'lognormal'`` decodes ``exp(z)`` (spaLDVAE); ``learn_gauss_prior`` learns the Gaussian dims' prior.
    dispersion
        ``'gene'``, ``'gene-batch'`` or ``'auto'`` (per gene and section for a multi-section setup).
    kernel, kernel_scale, fix_kernel_scale
        ``'cauchy'`` (default), ``'eq'``, ``'matern12/32/52'``, or any :class:`gpytorch.kernels.Kernel` on 2-D
        inputs; the initial (or fixed) scale of the built-in kernels (20).
    per_dimension_kernel, per_section_kernel
        One kernel per GP dimension (spaLDVAE), per section (spaVAE_Batch).
    variational
        ``'closed_form'`` (spaVAE's batch-optimal q(u)) or ``'learned'`` (a global GPyTorch q(u)).
    learn_inducing
        Train the inducing locations (fixed in the original).
    dropout
        Dropout rate of the networks.
    image_weight
        With the image view (a setup with image features): the weight of the image features' Gaussian
        log-likelihood relative to the counts' (:class:`~spavae.likelihoods.ImageFeatureObservation`; 1: each
        feature of a spot counts like one more observed value). Their decoder has the widths of ``decoder_layers``.
    n_obs
        ``N`` of the ``N/b`` rescaling of the GP posterior.
    dtype
        dtype of the networks.
    """
    options = {"encoder": encoder, "decoder": decoder, "dispersion": dispersion,
               "latent_distribution": latent_distribution, "variational": variational}
    for name, value in options.items():
        if value not in CHOICES[name]:
            raise ValueError(f"{name} must be one of {list(CHOICES[name])}, got {value!r}")
    for name, value, low in (("n_gp", n_gp, 1), ("n_gauss", n_gauss, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    for name, widths in (("encoder_layers", encoder_layers), ("decoder_layers", decoder_layers),
                         ("protein_layers", protein_layers)):
        if isinstance(widths, str) or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1
                                              for w in widths):
            raise ValueError(f"{name} must be a sequence of integer layer widths >= 1, e.g. (128, 64); got {widths!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    n_batch, n_latent = setup.n_sections, n_gp + n_gauss
    spatial_kernel = make_kernel(kernel, scale=kernel_scale, fixed=fix_kernel_scale,
                                 batch_shape=torch.Size([n_gp]) if per_dimension_kernel else torch.Size([]))
    if n_batch:
        spatial_kernel = SectionKernel(spatial_kernel, n_batch, per_section=per_section_kernel)
    gp = SpatialGP(torch.as_tensor(setup.inducing_points, dtype=GP_DTYPE), n_gp, spatial_kernel,
                   learn_inducing_locations=learn_inducing, variational=variational)
    if setup.binarize:
        observations = [BernoulliObservation(setup.n_genes, n_latent, setup.n_input, tuple(decoder_layers),
                                             tuple(encoder_layers), n_batch=n_batch, dropout=dropout)]
    else:
        dispersion = ("gene-batch" if n_batch else "gene") if dispersion == "auto" else dispersion
        observations = [NegativeBinomialObservation(setup.n_genes, n_latent, tuple(decoder_layers), decoder=decoder,
                                                    n_batch=n_batch, dispersion=dispersion, dropout=dropout)]
    if setup.n_proteins:
        prior_mean, prior_log_sd = (torch.as_tensor(v, dtype=torch.float32) for v in setup.protein_background)
        observations.append(ProteinMixtureObservation(
            setup.n_proteins, n_latent, tuple(protein_layers), n_batch=n_batch, prior_mean=prior_mean,
            prior_log_sd=prior_log_sd, dropout=dropout, columns=slice(setup.n_genes, setup.n_genes + setup.n_proteins)))
    if setup.n_image_features:
        check_number("image_weight", image_weight, low=0, inclusive=False)
        observations.append(ImageFeatureObservation(
            setup.n_image_features, n_latent, tuple(decoder_layers), n_batch=n_batch, weight=image_weight,
            dropout=dropout, columns=slice(setup.n_genes + setup.n_proteins, setup.n_observed)))
    custom_encoder = ConvEncoder(setup.n_input + n_batch, n_latent, tuple(encoder_layers), dropout=dropout) \
        if encoder == "conv" else None
    module = SpaVAEModule(setup.n_input, gp, n_gauss, n_obs or 1, observations,
                          encoder_layers=tuple(encoder_layers), dropout=dropout, n_batch=n_batch,
                          latent_distribution=latent_distribution, learn_gauss_prior=learn_gauss_prior,
                          encoder=custom_encoder)
    return cast_networks(module, dtype)


def cast_networks(module: SpaVAEModule, dtype: torch.dtype) -> SpaVAEModule:
    """Cast every parameter and buffer to ``dtype`` except the GP's, which stay in :data:`GP_DTYPE`.

    Casting the whole module and then the GP back would round the inducing points through float32.
    """
    for name, child in module.named_children():
        if name != "gp":
            child.to(dtype)
    for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        tensor.data = tensor.data.to(dtype)
    module.gp.to(GP_DTYPE)
    return module
