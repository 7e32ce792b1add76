"""Downstream analyses on the latent embedding."""

from spavae.analysis.clustering import cluster_kmeans, refine_labels, score_clustering, visium_array_to_xy

__all__ = ["cluster_kmeans", "refine_labels", "score_clustering", "visium_array_to_xy"]
