"""spavae: spatially aware variational autoencoders for spatial omics (spaVAE on GPyTorch and Pyro)."""

__version__ = "0.2.0"

from spavae.api import SpaVAE  # noqa: E402
from spavae.data import read, read_h5ad, read_spavae_h5, simulate_spatial_counts  # noqa: E402

__all__ = ["SpaVAE", "read", "read_h5ad", "read_spavae_h5", "simulate_spatial_counts", "__version__"]
