"""Swap the GP kernel: built-in names or any GPyTorch kernel, and a learned (global) q(u) instead of the
closed-form batch optimum.

Usage: python examples/variants/kernel_swap.py [--epochs 100]
"""

import argparse

from gpytorch.kernels import MaternKernel, PeriodicKernel, ProductKernel, ScaleKernel

import spavae
from spavae.analysis import cluster_kmeans, score_clustering

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--epochs", type=int, default=100)
args = parser.parse_args()

adata = spavae.simulate_spatial_counts(seed=0)
kernels = {
    "cauchy": "cauchy",
    "eq": "eq",
    "matern52 (name)": "matern52",
    "ScaleKernel(Matern 2.5)": ScaleKernel(MaternKernel(nu=2.5)),
    "Matern 1.5 x Periodic": ProductKernel(MaternKernel(nu=1.5), PeriodicKernel()),
}
for name, kernel in kernels.items():
    model = spavae.SpaVAE(adata, kernel=kernel, seed=0).train(max_epochs=args.epochs, progress=False)
    print(f"{name:>24}: {score_clustering(adata.obs['ground_truth'], cluster_kmeans(model.get_latent_representation(), 5, n_init=10))}")
learned = spavae.SpaVAE(adata, variational="learned", seed=0).train(max_epochs=args.epochs, progress=False)
print(f"{'learned q(u), cauchy':>24}: "
      f"{score_clustering(adata.obs['ground_truth'], cluster_kmeans(learned.get_latent_representation(), 5, n_init=10))}")
