"""RNA + surface proteins (spaMultiVAE): genes with the NB likelihood, proteins with the two-component NB mixture
(background / foreground) on simulated data; saves a figure of the background/foreground separation.

Usage: python examples/variants/rna_protein.py [--epochs 100] [--figure protein_background.png]
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import spavae  # noqa: E402
from spavae.analysis import cluster_kmeans, score_clustering  # noqa: E402
from spavae.data.simulate import add_protein_counts  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--epochs", type=int, default=100)
parser.add_argument("--figure", default="protein_background.png")
args = parser.parse_args()

adata = add_protein_counts(spavae.simulate_spatial_counts(n_rows=20, n_cols=20, n_genes=60, n_domains=3, seed=4),
                           n_proteins=9, seed=4)
model = spavae.SpaVAE.from_variant("spaMultiVAE", adata, protein_key="protein_expression", seed=0)
model.train(max_epochs=args.epochs, progress=False)
print(score_clustering(adata.obs["ground_truth"], cluster_kmeans(model.get_latent_representation(), 3, n_init=10)))
mean, _ = model.latent_posterior()
with torch.no_grad():
    every_spot = model.data.batch(np.arange(len(model.data)))
    background = model.module.observations[1].background_probability(mean, every_spot).cpu().numpy()
foreground = adata.obsm["protein_expression_is_foreground"]
raw = adata.obsm["protein_expression"]
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
axes[0].hist([background[~foreground], background[foreground]], bins=30, label=["true background", "true foreground"])
axes[0].set_xlabel("P(background) from the mixture"), axes[0].legend()
axes[1].scatter(raw.ravel(), background.ravel(), c=foreground.ravel(), s=3, cmap="coolwarm")
axes[1].set_xlabel("raw protein count"), axes[1].set_ylabel("P(background)")
fig.tight_layout()
fig.savefig(args.figure, dpi=110)
print(f"mean P(background): true background {background[~foreground].mean():.2f}, "
      f"true foreground {background[foreground].mean():.2f}; figure in {args.figure}")
