"""Accuracy, speed and memory of spavae with the package defaults on spaVAE-layout sections.

Usage: python benchmarks/dlpfc.py FILE.h5 [FILE.h5 ...] [--seeds N] [--threads T] [--max-epochs E] [--baseline]
       [--kernel cauchy|eq|matern52] [--trajectory [--every K] [--plot PNG]] [--set KEY=VALUE ...]

FILE may also be ``sim``: the default simulated section (:func:`spavae.data.simulate_spatial_counts`, 1,024 spots,
5 domains), so that a choice can be checked on data it was not made on.

For each file it trains ``spavae.SpaVAE`` with default settings once per seed, clusters the latent with
KMeans (k = number of distinct non-NA labels, n_init 100), scores ARI/NMI on the labelled spots, then again
after the hexagonal neighbour refinement (ALGORITHM 7.6), and prints one JSON object per file on its own
line. ``peak_rss_mb`` is the peak resident memory of the process up to the end of that file.

With ``--trajectory`` every K-th epoch the latent of all spots is clustered with the same protocol and one JSON
line per file and seed records ``(epoch, training seconds, ARI)`` at each point; the training seconds are the
sum of the epochs' own times (training and validation), so the scoring is not counted. ``--plot`` draws ARI
against seconds, one panel per file and a line per seed, with the point where training stopped marked.
``--set`` passes options to ``SpaVAE.train`` (e.g. ``--set max_epochs=400 --set stop_when_stable=false``).
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
from sklearn.metrics import adjusted_rand_score

import spavae
from spavae.analysis import (
    cluster_kmeans,
    refine_labels,
    score_clustering,
    visium_array_to_xy,
)
from spavae.data import filter_empty, normalize_log_scale, size_factors
from spavae.data.genes import highly_variable_genes


def expression_pcs(adata, seed: int = 0) -> np.ndarray:
    """The first 10 principal components of the normalised expression (on 2,000 highly variable genes when there are
    more; size factors from all genes), ``spots x 10``."""
    counts = adata.X
    factors = size_factors(counts)  # library sizes over all genes: a spot may have none of the selected genes
    if adata.n_vars > 2000:
        counts = counts[:, highly_variable_genes(counts, 2000)["highly_variable"].to_numpy()]
    return PCA(10, random_state=seed).fit_transform(normalize_log_scale(counts, factors))


def baseline_ari(adata, n_domains: int, lattice: np.ndarray, seed: int = 0) -> float:
    """The principal components of :func:`expression_pcs` averaged over each spot and its 6 spatial neighbours,
    then KMeans."""
    pcs = expression_pcs(adata, seed)
    _, neighbours = cKDTree(lattice).query(lattice, k=7)
    labels = cluster_kmeans(pcs[neighbours].mean(1), n_domains, seed=seed)
    return score_clustering(adata.obs["ground_truth"].astype(str), labels)["ari"]


def key_values(items: list[str]) -> dict:
    """``KEY=VALUE`` options (``--set``, ``--init``) as a dict, each VALUE read as JSON."""
    return {key: json.loads(value) for key, value in (item.split("=", 1) for item in items)}


def load(path: str):
    """A labelled section and its neighbour lattice: a spaVAE-layout file, or ``sim`` for the simulator."""
    if path == "sim":
        adata = spavae.data.simulate_spatial_counts()
        return adata, adata.obsm["spatial"]
    adata = filter_empty(spavae.read_spavae_h5(path))
    return adata, visium_array_to_xy(adata.obsm["spatial"])


class Trajectory:
    """Training callback: every ``every`` epochs, the ARI of the current latent of all spots (KMeans protocol)."""

    def __init__(self, model: spavae.SpaVAE, truth: pd.Series, n_domains: int, seed: int, every: int):
        self.model, self.truth, self.n_domains, self.seed, self.every = model, truth, n_domains, seed, every
        self.points: list[dict] = []
        self.previous: np.ndarray | None = None

    def __call__(self, trainer, record: dict) -> None:
        if record["epoch"] % self.every and trainer.state.stop_reason is None and not trainer.budget_spent:
            return
        model = self.model
        model._gp_posterior, model.is_trained = model._full_data_posterior(), True
        labels = cluster_kmeans(model.get_latent_representation(), self.n_domains, seed=self.seed)
        model.is_trained = False
        seconds = sum(r["seconds"] for r in trainer.state.history)
        point = {"epoch": record["epoch"], "step": record["step"], "seconds": round(seconds, 2),
                 "ari": round(score_clustering(self.truth, labels)["ari"], 4)}
        if self.previous is not None:  # how much the domains moved since the last point
            point["ari_previous"] = round(adjusted_rand_score(self.previous, labels), 4)
        self.previous = labels
        self.points.append(point)


def run_file(path: str, seeds: int, threads: int, train_options: dict, baseline: bool, kernel: str,
             every: int | None, model_options: dict | None = None) -> tuple[dict, list[dict]]:
    adata, lattice = load(path)
    truth = adata.obs["ground_truth"].astype(str)
    n_domains = int(pd.Series(truth).loc[lambda s: s != "NA"].nunique())
    scores, seconds, epochs, trajectories = [], [], [], []
    for seed in range(seeds):
        start = time.perf_counter()
        model = spavae.SpaVAE(adata, seed=seed, kernel=kernel, **(model_options or {}))
        trajectory = Trajectory(model, truth, n_domains, seed, every) if every else None
        model.train(progress=False, callbacks=[trajectory] if trajectory else [], **train_options)
        seconds.append(time.perf_counter() - start)
        epochs.append(len(model.history))
        labels = cluster_kmeans(model.get_latent_representation(), n_domains, seed=seed)
        raw = score_clustering(truth, labels)
        refined = score_clustering(truth, refine_labels(labels, lattice))
        scores.append({"ari": raw["ari"], "nmi": raw["nmi"], "ari_refined": refined["ari"], "nmi_refined": refined["nmi"]})
        line = {"file": path, "seed": seed, "epochs": epochs[-1], "seconds": round(seconds[-1], 1),
                **{k: round(v, 4) for k, v in scores[-1].items()}, "stop_reason": model.trainer.state.stop_reason}
        if trajectory:
            line["train_seconds"] = round(float(model.history["seconds"].sum()), 1)
            line["trajectory"] = trajectory.points
            trajectories.append(line)
        print(json.dumps(line), flush=True)
    frame = pd.DataFrame(scores)
    result = {"file": path, "kernel": kernel, "n_spots": adata.n_obs, "n_genes": model.setup.n_genes,
              "n_domains": n_domains, "seeds": seeds, "train_options": train_options,
              "model_options": model_options or {}}
    for key in frame:
        result[key] = round(float(frame[key].mean()), 4)
        result[f"{key}_sd"] = round(float(frame[key].std(ddof=1)) if seeds > 1 else 0.0, 4)
    result |= {"train_seconds": round(float(np.mean(seconds)), 1), "train_seconds_sd": round(float(np.std(seconds)), 1),
               "epochs": round(float(np.mean(epochs)), 1), "seconds_per_epoch": round(sum(seconds) / sum(epochs), 3),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "threads": threads,
               "device": str(model.device), "spavae": spavae.__version__}
    if baseline:
        result["baseline_pca_neighbour_ari"] = round(baseline_ari(adata, n_domains, lattice), 4)
    return result, trajectories


def plot_trajectories(trajectories: list[dict], path: str) -> None:
    """ARI against training seconds, one panel per file, one line per seed; a dot where training stopped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = list(dict.fromkeys(t["file"] for t in trajectories))
    fig, axes = plt.subplots(1, len(files), figsize=(4.5 * len(files), 3.5), squeeze=False)
    for ax, file in zip(axes[0], files):
        for t in (t for t in trajectories if t["file"] == file):
            x = [p["seconds"] for p in t["trajectory"]]
            y = [p["ari"] for p in t["trajectory"]]
            line, = ax.plot(x, y, lw=1.2, label=f"seed {t['seed']}")
            ax.plot(x[-1], y[-1], "o", color=line.get_color())
        ax.set(title=file.rsplit("/", 1)[-1], xlabel="training seconds", ylabel="ARI of the latent (KMeans)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="spaVAE-layout .h5 files with labels in Y, or 'sim'")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--max-epochs", type=int, help="override the default maximum number of epochs")
    parser.add_argument("--baseline", action="store_true", help="also score the PCA + neighbour-average baseline")
    parser.add_argument("--kernel", default="cauchy", help="GP kernel name (cauchy, eq, matern12/32/52)")
    parser.add_argument("--trajectory", action="store_true", help="record the ARI of the latent during training")
    parser.add_argument("--every", type=int, default=5, help="epochs between trajectory points")
    parser.add_argument("--plot", help="PNG of the trajectories (with --trajectory)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="SpaVAE.train option, VALUE read as JSON (repeatable)")
    parser.add_argument("--init", action="append", default=[], metavar="KEY=VALUE",
                        help="SpaVAE model option, VALUE read as JSON (repeatable), e.g. --init inducing_steps=6")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options, model_options = key_values(args.set), key_values(args.init)
    if args.max_epochs:
        options["max_epochs"] = args.max_epochs
    trajectories = []
    for path in args.files:
        result, runs = run_file(path, args.seeds, args.threads, options, args.baseline, args.kernel,
                                args.every if args.trajectory else None, model_options)
        trajectories += runs
        print(json.dumps(result), flush=True)
    if args.plot and trajectories:
        plot_trajectories(trajectories, args.plot)


if __name__ == "__main__":
    main()
