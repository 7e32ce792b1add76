"""Spatial interpolation (ALGORITHM 7.4): predict held-out spots' latents from their locations alone.

Usage: python benchmarks/interpolation.py FILE.h5 [FILE.h5 ...] [--seeds N] [--threads T] [--max-epochs E]
       [--mask-fraction F]

For each file and seed: mask a seeded random 10% of the spots, train ``spavae.SpaVAE`` with the package defaults
on the other 90% (its location scaling fitted on them), predict the masked spots' latents from their locations
alone (:func:`spavae.analysis.predict_latent`: GP dims from the GP posterior given all training spots, Gaussian
dims from the nearest training spot), then

* ``knn_accuracy``: an 11-nearest-neighbour classifier trained on the training spots' latents and layers
  predicts the masked spots' layers ('NA' spots left out on both sides), as in the original tutorial;
* ``test_ari``: KMeans (k = number of layers, n_init 100) fitted on the training latents assigns the masked
  spots; ARI against their layers ('NA' left out);
* baselines without the model: ``spatial_knn_accuracy`` (11-NN on the hexagonal-lattice locations) and
  ``nearest_latent_knn_accuracy`` (the 11-NN classifier on the latent of the nearest training spot).

Prints one JSON object per file on its own line (means and sample SDs over seeds); per-seed results go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import pandas as pd
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import KNeighborsClassifier

import spavae
from spavae.analysis import predict_latent, visium_array_to_xy
from spavae.data import filter_empty

N_NEIGHBOURS = 11


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Accuracy of an 11-NN classifier; spots labelled 'NA' are left out of both sides."""
    keep_train, keep_test = train_y != "NA", test_y != "NA"
    classifier = KNeighborsClassifier(N_NEIGHBOURS).fit(train_x[keep_train], train_y[keep_train])
    return float((classifier.predict(test_x[keep_test]) == test_y[keep_test]).mean())


def run_seed(adata, truth: np.ndarray, n_domains: int, seed: int, mask_fraction: float,
             max_epochs: int | None) -> dict:
    rng = np.random.default_rng(seed)
    order = rng.permutation(adata.n_obs)
    test, train = np.sort(order[: int(mask_fraction * adata.n_obs)]), np.sort(order[int(mask_fraction * adata.n_obs):])
    train_data = filter_empty(adata[train].copy())
    if train_data.n_obs != len(train):
        raise RuntimeError("filter_empty removed training spots; the benchmark assumes none has zero counts")
    start = time.perf_counter()
    model = spavae.SpaVAE(train_data, seed=seed)
    model.train(progress=False, **({"max_epochs": max_epochs} if max_epochs else {}))
    seconds = time.perf_counter() - start
    train_latent = model.get_latent_representation()
    test_latent, _, nearest = predict_latent(model, adata.obsm["spatial"][test])
    test_latent = test_latent.cpu().numpy()
    train_y, test_y = truth[train], truth[test]
    labelled = train_y != "NA"
    kmeans = KMeans(n_domains, n_init=100, random_state=seed).fit(train_latent[labelled])
    test_labelled = test_y != "NA"
    lattice = visium_array_to_xy(adata.obsm["spatial"])
    return {
        "seed": seed, "n_train": len(train), "n_test": len(test), "n_test_labelled": int(test_labelled.sum()),
        "epochs": len(model.history), "seconds": round(seconds, 1),
        "knn_accuracy": knn_accuracy(train_latent, train_y, test_latent, test_y),
        "test_ari": float(adjusted_rand_score(test_y[test_labelled], kmeans.predict(test_latent[test_labelled]))),
        "train_ari": float(adjusted_rand_score(train_y[labelled], kmeans.labels_)),
        "spatial_knn_accuracy": knn_accuracy(lattice[train], train_y, lattice[test], test_y),
        "nearest_latent_knn_accuracy": knn_accuracy(train_latent, train_y, train_latent[nearest], test_y),
    }


def run_file(path: str, seeds: int, threads: int, mask_fraction: float, max_epochs: int | None) -> dict:
    adata = filter_empty(spavae.read_spavae_h5(path))
    truth = adata.obs["ground_truth"].astype(str).to_numpy()
    n_domains = int(pd.Series(truth).loc[lambda s: s != "NA"].nunique())
    rows = []
    for seed in range(seeds):
        rows.append(run_seed(adata, truth, n_domains, seed, mask_fraction, max_epochs))
        print(json.dumps({"file": path, **{k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}}),
              file=sys.stderr, flush=True)
    frame = pd.DataFrame(rows)
    result = {"file": path, "n_spots": adata.n_obs, "n_genes": adata.n_vars, "n_domains": n_domains, "seeds": seeds,
              "mask_fraction": mask_fraction}
    for key in ("knn_accuracy", "test_ari", "train_ari", "spatial_knn_accuracy", "nearest_latent_knn_accuracy",
                "seconds", "epochs"):
        result[key] = round(float(frame[key].mean()), 4)
        result[f"{key}_sd"] = round(float(frame[key].std(ddof=1)) if seeds > 1 else 0.0, 4)
    result |= {"threads": threads, "spavae": spavae.__version__}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="spaVAE-layout .h5 files with labels in Y")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1): mask, weights, shuffling")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--max-epochs", type=int, help="override the default maximum number of epochs")
    parser.add_argument("--mask-fraction", type=float, default=0.1, help="fraction of spots held out")
    args = parser.parse_args()
    if not 0 < args.mask_fraction < 1:
        parser.error(f"--mask-fraction must be in (0, 1), got {args.mask_fraction}")
    torch.set_num_threads(args.threads)
    for path in args.files:
        print(json.dumps(run_file(path, args.seeds, args.threads, args.mask_fraction, args.max_epochs)), flush=True)


if __name__ == "__main__":
    main()
