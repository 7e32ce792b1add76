"""Small sections and whole transcriptomes: spavae's defaults against a smoothed-PCA baseline.

Usage: python benchmarks/small_sections.py [--dlpfc FILE.h5 ...] [--seeds 3] [--threads T] [--sizes 200 500]
       [--set KEY=VALUE ...] [--init KEY=VALUE ...]

Cases:

* simulated sections of 200 and 500 spots (``--sizes``) with 10,000 genes of which 300 carry 5 domains
  (:func:`spavae.data.simulate.simulate_many_genes_section`, domain log fold change ``--lfc``, 1.5), one per seed;
* each ``--dlpfc`` section randomly subsampled to 500 spots (a new subsample per seed).

For each case and seed it trains ``spavae.SpaVAE`` with its defaults (``--set`` passes ``SpaVAE.train`` options,
``--init`` model options),
clusters the latent with KMeans (k = number of true domains) and scores the ARI; the baseline is PCA (10
components) of the normalised expression averaged over each spot and its 6 nearest neighbours, then KMeans.
Prints one JSON line per case and seed, then one summary line per case (means and SDs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.spatial import cKDTree

import spavae
from spavae.analysis import cluster_kmeans, score_clustering, visium_array_to_xy
from spavae.data import filter_empty
from spavae.data.simulate import simulate_many_genes_section

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package: the baseline by path
from dlpfc import baseline_ari, key_values


def cases(sizes: list[int], lfc: float, dlpfc: list[str], seeds: int):
    """(name, seed, adata, lattice) of every case."""
    for n_spots in sizes:
        for seed in range(seeds):
            adata = simulate_many_genes_section(n_spots, 10_000, n_domain_genes=300, domain_lfc=lfc, seed=seed)
            yield f"sim_{n_spots}x10000", seed, adata, adata.obsm["spatial"]
    for path in dlpfc:
        full = filter_empty(spavae.read_spavae_h5(path))
        for seed in range(seeds):
            keep = np.sort(np.random.default_rng(seed).choice(full.n_obs, 500, replace=False))
            adata = filter_empty(full[keep].copy())
            yield f"{path.rsplit('/', 1)[-1]}_500", seed, adata, visium_array_to_xy(adata.obsm["spatial"])


def latent_ari(embedding: np.ndarray, truth: pd.Series, n_domains: int, seed: int) -> float:
    """ARI of KMeans (k = number of true domains) on an embedding."""
    return round(score_clustering(truth, cluster_kmeans(embedding, n_domains, seed=seed))["ari"], 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dlpfc", nargs="*", default=[], help="spaVAE-layout .h5 sections to subsample")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="SpaVAE.train option, VALUE read as JSON (repeatable)")
    parser.add_argument("--init", action="append", default=[], metavar="KEY=VALUE",
                        help="SpaVAE model option, VALUE read as JSON (repeatable), e.g. --init inducing_steps=12")
    parser.add_argument("--sizes", type=int, nargs="*", default=[200, 500], help="simulated section sizes")
    parser.add_argument("--lfc", type=float, default=1.5, help="domain log fold change of the simulated sections")
    parser.add_argument("--parts", action="store_true",
                        help="also the ARI of the GP dimensions alone, the Gaussian ones alone, and the latent "
                             "averaged over each spot and its 6 nearest neighbours")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options, model_options = key_values(args.set), key_values(args.init)
    rows = []
    for name, seed, adata, lattice in cases(args.sizes, args.lfc, args.dlpfc, args.seeds):
        truth = adata.obs["ground_truth"].astype(str)
        n_domains = int(truth[truth != "NA"].nunique())
        start = time.perf_counter()
        model = spavae.SpaVAE(adata, seed=seed, **model_options).train(progress=False, **options)
        seconds = time.perf_counter() - start
        latent = model.get_latent_representation()
        ari = latent_ari(latent, truth, n_domains, seed)
        parts = {}
        if args.parts:
            n_gp = model.module.n_gp
            _, neighbours = cKDTree(lattice).query(lattice, k=7)
            parts = {"ari_gp_dims": latent_ari(latent[:, :n_gp], truth, n_domains, seed),
                     "ari_gaussian_dims": latent_ari(latent[:, n_gp:], truth, n_domains, seed),
                     "ari_neighbour_averaged": latent_ari(latent[neighbours].mean(1), truth, n_domains, seed)}
        row = {"case": name, "seed": seed, "n_spots": adata.n_obs, "n_genes": adata.n_vars,
               "model_genes": model.setup.n_genes, "epochs": len(model.history), "steps": model.trainer.state.step,
               "seconds": round(seconds, 1), "stop_reason": model.trainer.state.stop_reason,
               "best_epoch": model.trainer.state.best_epoch, "kernel_scale": model.module.gp.kernel_scale,
               "ari": ari, **parts,
               "baseline_ari": round(baseline_ari(adata, n_domains, lattice, seed), 4), "domain_lfc": args.lfc,
               "model_options": model_options}
        rows.append(row)
        print(json.dumps(row), flush=True)
    frame = pd.DataFrame(rows)
    for name, group in frame.groupby("case", sort=False):
        print(json.dumps({"case": name, "seeds": len(group), "train_options": options, "model_options": model_options,
                          "ari": round(group["ari"].mean(), 4), "ari_sd": round(group["ari"].std(ddof=1), 4) if len(group) > 1 else 0.0,
                          "baseline_ari": round(group["baseline_ari"].mean(), 4),
                          "baseline_ari_sd": (round(group["baseline_ari"].std(ddof=1), 4)
                                              if len(group) > 1 else 0.0),
                          "seconds": round(group["seconds"].mean(), 1), "epochs": round(group["epochs"].mean(), 1),
                          "threads": args.threads, "spavae": spavae.__version__}), flush=True)


if __name__ == "__main__":
    main()
