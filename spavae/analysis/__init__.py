"""Downstream analyses on the latent embedding."""

from spavae.analysis.clustering import cluster_kmeans, refine_labels, score_clustering, visium_array_to_xy
from spavae.analysis.denoise import denoise, denoised_samples
from spavae.analysis.differential import differential_expression, lfc_threshold, rank_genes_domains
from spavae.analysis.domains import find_domains, leiden_n_domains
from spavae.analysis.embedding import umap
from spavae.analysis.enhance import enhance, enhancement_locations
from spavae.analysis.prediction import predict, predict_latent
from spavae.analysis.spatial_stats import knn_weights, morans_i, spatial_autocorr

__all__ = [
    "cluster_kmeans",
    "denoise",
    "denoised_samples",
    "differential_expression",
    "enhance",
    "enhancement_locations",
    "find_domains",
    "knn_weights",
    "lfc_threshold",
    "leiden_n_domains",
    "morans_i",
    "predict",
    "predict_latent",
    "rank_genes_domains",
    "refine_labels",
    "score_clustering",
    "spatial_autocorr",
    "umap",
    "visium_array_to_xy",
]
