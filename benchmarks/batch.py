"""Batch integration: train jointly on several sections with and without section handling.

Usage: python benchmarks/batch.py FILE.h5 FILE.h5 [...] [--seed S] [--threads T] [--max-epochs E]

Genes are intersected. "With batch" is ``SpaVAE(batch_key='section')`` (per-section scaling, section kernel,
per-section inducing points and dispersion, one-hot section into encoder and decoder); "no batch" is the core
model on the concatenated data (every section's coordinates scaled on their own and placed side by side so that
sections do not overlap in space). Prints one JSON object: KMeans (k = distinct non-NA labels) ARI per section on
the joint latent, and ``mixing``: the entropy of section labels among each spot's 30 nearest latent neighbours,
divided by log(number of sections), averaged within each ground-truth domain and then over domains (1 = perfectly
mixed, 0 = separated).
"""

from __future__ import annotations

import argparse
import json
import time

import anndata as ad
import numpy as np
import pandas as pd
import torch
from sklearn.neighbors import NearestNeighbors

import spavae
from spavae.analysis import cluster_kmeans, score_clustering
from spavae.data import filter_empty


def mixing_score(latent: np.ndarray, sections: np.ndarray, domains: np.ndarray, k: int = 30) -> float:
    """Mean over domains of the normalised entropy of section labels among each spot's k latent neighbours."""
    names, codes = np.unique(sections, return_inverse=True)
    _, neighbours = NearestNeighbors(n_neighbors=k + 1).fit(latent).kneighbors(latent)
    counts = np.stack([(codes[neighbours[:, 1:]] == c).sum(1) for c in range(len(names))], 1) / k
    entropy = -(counts * np.log(np.where(counts > 0, counts, 1))).sum(1) / np.log(len(names))
    labelled = domains != "NA"
    return float(pd.Series(entropy[labelled]).groupby(domains[labelled]).mean().mean())


def load(paths: list[str]) -> ad.AnnData:
    sections = [filter_empty(spavae.read_spavae_h5(p)) for p in paths]
    genes = sorted(set.intersection(*(set(s.var_names) for s in sections)))
    for i, section in enumerate(sections):
        section.obs["section"] = f"section{i}"
        section.obs_names = [f"{i}_{n}" for n in section.obs_names]
    joint = ad.concat([s[:, genes] for s in sections], merge="same")
    joint.obs["section"] = pd.Categorical(joint.obs["section"])
    return filter_empty(joint)


def side_by_side(adata: ad.AnnData) -> np.ndarray:
    """Each section's coordinates scaled to [0, 1] and shifted along x so sections do not overlap."""
    out = np.zeros_like(adata.obsm["spatial"], dtype=float)
    for i, section in enumerate(adata.obs["section"].cat.categories):
        rows = np.asarray(adata.obs["section"] == section)
        xy = adata.obsm["spatial"][rows].astype(float)
        out[rows] = (xy - xy.min(0)) / np.ptp(xy, axis=0) + np.array([1.2 * i, 0.0])
    return out


def evaluate(model, adata: ad.AnnData, n_domains: int, seed: int) -> tuple[list[float], float]:
    latent = model.get_latent_representation()
    labels = cluster_kmeans(latent, n_domains, seed=seed)
    truth = adata.obs["ground_truth"].astype(str).to_numpy()
    sections = adata.obs["section"].astype(str).to_numpy()
    aris = [round(score_clustering(truth[sections == s], labels[sections == s])["ari"], 4) for s in np.unique(sections)]
    return aris, round(mixing_score(latent, sections, truth), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--max-epochs", type=int, default=400)
    args = parser.parse_args()
    if len(args.files) < 2:
        parser.error("give at least two sections")
    torch.set_num_threads(args.threads)
    adata = load(args.files)
    truth = adata.obs["ground_truth"].astype(str)
    n_domains = int(truth[truth != "NA"].nunique())
    result = {"files": args.files, "n_spots": adata.n_obs, "n_genes": adata.n_vars, "seed": args.seed,
              "threads": args.threads}
    start = time.perf_counter()
    model = spavae.SpaVAE(adata, batch_key="section", seed=args.seed).train(max_epochs=args.max_epochs, progress=False)
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["ari_per_section"], result["mixing"] = evaluate(model, adata, n_domains, args.seed)
    plain = adata.copy()
    plain.obsm["spatial"] = side_by_side(adata)
    start = time.perf_counter()
    model = spavae.SpaVAE(plain, seed=args.seed).train(max_epochs=args.max_epochs, progress=False)
    result["seconds_no_batch"] = round(time.perf_counter() - start, 1)
    result["ari_per_section_no_batch"], result["mixing_no_batch"] = evaluate(model, plain, n_domains, args.seed)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
