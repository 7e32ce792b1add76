"""Downstream analyses on the latent embedding."""

from spavae.analysis.clustering import cluster_kmeans, refine_labels, score_clustering, visium_array_to_xy
from spavae.analysis.denoise import denoise, denoised_samples
from spavae.analysis.differential import differential_expression, lfc_threshold, rank_genes_domains
from spavae.analysis.domains import (
    Domains,
    choose_n_domains,
    cluster_domains,
    count_leiden_communities,
    domain_colors,
    find_domains,
    leiden_n_domains,
    set_category_colors,
    spatial_coherence,
)
from spavae.analysis.embedding import umap
from spavae.analysis.enhance import enhance, enhancement_locations
from spavae.analysis.latent_activity import active_dimensions
from spavae.analysis.prediction import predict, predict_latent
from spavae.analysis.runs import TrainedRun, open_run
from spavae.analysis.spatial_stats import knn_weights, morans_i, spatial_autocorr

__all__ = [
    "Domains",
    "TrainedRun",
    "active_dimensions",
    "choose_n_domains",
    "cluster_domains",
    "cluster_kmeans",
    "count_leiden_communities",
    "denoise",
    "denoised_samples",
    "differential_expression",
    "domain_colors",
    "enhance",
    "enhancement_locations",
    "find_domains",
    "knn_weights",
    "lfc_threshold",
    "leiden_n_domains",
    "morans_i",
    "open_run",
    "predict",
    "predict_latent",
    "rank_genes_domains",
    "refine_labels",
    "score_clustering",
    "set_category_colors",
    "spatial_coherence",
    "spatial_autocorr",
    "umap",
    "visium_array_to_xy",
]
