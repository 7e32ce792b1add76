"""Binarised spatial ATAC peaks with the Bernoulli likelihood (spaPeakVAE) on simulated data.

Usage: python examples/variants/atac_peaks.py [--epochs 60]
"""

import argparse

import spavae
from spavae.analysis import cluster_kmeans, score_clustering

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--epochs", type=int, default=60)
args = parser.parse_args()

peaks = spavae.simulate_spatial_counts(n_rows=20, n_cols=20, n_genes=300, n_domains=3, marker_lfc=1.5, seed=3)
model = spavae.SpaVAE.from_variant("spaPeakVAE", peaks, encoder_layers=(64, 32), decoder_layers=(32, 64), seed=0)
model.train(max_epochs=args.epochs, progress=False)  # the matrix is binarised (X > 0) inside
labels = cluster_kmeans(model.get_latent_representation(), 3, n_init=10)
print(score_clustering(peaks.obs["ground_truth"], labels))
print("denoised peak probabilities:", model.get_denoised_counts(n_samples=5).shape)
