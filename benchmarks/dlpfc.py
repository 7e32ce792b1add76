"""Accuracy, speed and memory of spavae with the package defaults on spaVAE-layout sections.

Usage: python benchmarks/dlpfc.py FILE.h5 [FILE.h5 ...] [--seeds N] [--threads T] [--max-epochs E] [--baseline]
       [--kernel cauchy|eq|matern52]

For each file it trains ``spavae.SpaVAE`` with default settings once per seed, clusters the latent with
KMeans (k = number of distinct non-NA labels, n_init 100), scores ARI/NMI on the labelled spots, then again
after the hexagonal neighbour refinement (ALGORITHM 7.6), and prints one JSON object per file on its own
line. ``peak_rss_mb`` is the peak resident memory of the process up to the end of that file.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import pandas as pd
import torch
from scipy.spatial import cKDTree
from sklearn.decomposition import PCA

import spavae
from spavae.analysis import cluster_kmeans, refine_labels, score_clustering, visium_array_to_xy
from spavae.data import filter_empty, normalize_log_scale, size_factors


def baseline_ari(adata, n_domains: int, lattice: np.ndarray) -> float:
    """PCA (10 components) averaged over each spot and its 6 spatial neighbours, then KMeans."""
    expression = normalize_log_scale(adata.X, size_factors(adata.X))
    pcs = PCA(10, random_state=0).fit_transform(expression)
    _, neighbours = cKDTree(lattice).query(lattice, k=7)
    labels = cluster_kmeans(pcs[neighbours].mean(1), n_domains)
    return score_clustering(adata.obs["ground_truth"].astype(str), labels)["ari"]


def run_file(path: str, seeds: int, threads: int, max_epochs: int | None, baseline: bool, kernel: str) -> dict:
    adata = filter_empty(spavae.read_spavae_h5(path))
    truth = adata.obs["ground_truth"].astype(str)
    n_domains = int(pd.Series(truth).loc[lambda s: s != "NA"].nunique())
    lattice = visium_array_to_xy(adata.obsm["spatial"])
    scores, seconds, epochs = [], [], []
    for seed in range(seeds):
        start = time.perf_counter()
        model = spavae.SpaVAE(adata, seed=seed, kernel=kernel)
        model.train(progress=False, **({"max_epochs": max_epochs} if max_epochs else {}))
        seconds.append(time.perf_counter() - start)
        epochs.append(len(model.history))
        labels = cluster_kmeans(model.get_latent_representation(), n_domains, seed=seed)
        raw = score_clustering(truth, labels)
        refined = score_clustering(truth, refine_labels(labels, lattice))
        scores.append({"ari": raw["ari"], "nmi": raw["nmi"], "ari_refined": refined["ari"], "nmi_refined": refined["nmi"]})
        print(json.dumps({"file": path, "seed": seed, "epochs": epochs[-1], "seconds": round(seconds[-1], 1),
                          **{k: round(v, 4) for k, v in scores[-1].items()}}), flush=True)
    frame = pd.DataFrame(scores)
    result = {"file": path, "kernel": kernel, "n_spots": adata.n_obs, "n_genes": adata.n_vars, "n_domains": n_domains, "seeds": seeds}
    for key in frame:
        result[key] = round(float(frame[key].mean()), 4)
        result[f"{key}_sd"] = round(float(frame[key].std(ddof=1)) if seeds > 1 else 0.0, 4)
    result |= {"train_seconds": round(float(np.mean(seconds)), 1), "train_seconds_sd": round(float(np.std(seconds)), 1),
               "epochs": round(float(np.mean(epochs)), 1), "seconds_per_epoch": round(sum(seconds) / sum(epochs), 3),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "threads": threads,
               "device": str(model.device), "spavae": spavae.__version__}
    if baseline:
        result["baseline_pca_neighbour_ari"] = round(baseline_ari(adata, n_domains, lattice), 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="spaVAE-layout .h5 files with labels in Y")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--max-epochs", type=int, help="override the default maximum number of epochs")
    parser.add_argument("--baseline", action="store_true", help="also score the PCA + neighbour-average baseline")
    parser.add_argument("--kernel", default="cauchy", help="GP kernel name (cauchy, eq, matern12/32/52)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for path in args.files:
        print(json.dumps(run_file(path, args.seeds, args.threads, args.max_epochs, args.baseline, args.kernel)), flush=True)


if __name__ == "__main__":
    main()
