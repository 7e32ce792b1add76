"""Command line: ``spavae run [INPUT]`` trains spaVAE and writes the latent, domains and a plot.

Without INPUT it runs on the embedded default, a simulated section with planted domains.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import spavae
from spavae.analysis import cluster_kmeans, refine_labels, score_clustering
from spavae.data import filter_empty, read, simulate_spatial_counts
from spavae.data.readers import LABEL_KEY
from spavae.plot import plot_spatial_domains, plot_training_curves
from spavae.utils import atomic_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spavae", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"spavae {spavae.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train on a file (or the simulated default) and write results",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                         description="Train spaVAE, cluster the latent into spatial domains and write results: "
                                     "results.h5ad (latent in obsm['X_spavae'], domains in obs, denoised counts in "
                                     "layers), latent.csv, domains.png, training.png, model.pt and metrics.json.")
    run.add_argument("input", nargs="?", help="spaVAE-layout .h5 (X, pos[, Y, gene, cell]) or .h5ad with raw counts; "
                                              "omitted: a simulated 32 x 32 section with 5 planted domains")
    run.add_argument("--out", default="spavae_out", help="output folder")
    run.add_argument("--layer", help=".h5ad only: layer with raw counts (default .X)")
    run.add_argument("--spatial-key", default="spatial", help=".h5ad only: obsm key of the coordinates")
    run.add_argument("--label-key", help=".h5ad only: obs column with ground-truth labels for scoring")
    run.add_argument("--n-domains", type=int, help="number of domains for KMeans (default: number of distinct "
                                                   "non-NA ground-truth labels)")
    run.add_argument("--epochs", type=int, default=400, help="maximum training epochs")
    run.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate")
    run.add_argument("--patience", type=int, default=50, help="early-stopping patience (epochs)")
    run.add_argument("--kernel", default="cauchy", choices=["cauchy", "eq"], help="GP kernel")
    run.add_argument("--inducing-steps", type=int, default=6, help="grid inducing points: (steps+1)^2 points")
    run.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="network dtype")
    run.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    run.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    run.add_argument("--seed", type=int, default=0, help="random seed (same seed, same CPU result)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> dict:
    """The ``run`` command; returns the metrics it writes to ``metrics.json``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.input is None:
        adata = simulate_spatial_counts(seed=args.seed)
        source = "simulated (spavae.simulate_spatial_counts)"
    else:
        kwargs = {"layer": args.layer, "spatial_key": args.spatial_key, "label_key": args.label_key} \
            if str(args.input).endswith(".h5ad") else {}
        adata = read(args.input, **{k: v for k, v in kwargs.items() if v is not None})
        source = str(args.input)
    adata = filter_empty(adata)
    truth = adata.obs[LABEL_KEY] if LABEL_KEY in adata.obs else None
    n_domains = args.n_domains
    if n_domains is None:
        if truth is None:
            raise SystemExit("error: the input has no ground-truth labels; give the number of domains with --n-domains")
        n_domains = int(pd.Series(truth.astype(str)).loc[lambda s: s != "NA"].nunique())
    print(f"spavae {spavae.__version__}: {adata.n_obs} spots x {adata.n_vars} genes from {source}; "
          f"{n_domains} domains", flush=True)
    start = time.perf_counter()
    model = spavae.SpaVAE(adata, kernel=args.kernel, inducing_steps=args.inducing_steps, dtype=args.dtype,
                          device=args.device, seed=args.seed)
    model.train(max_epochs=args.epochs, lr=args.lr, patience=args.patience, progress=not args.quiet)
    seconds = time.perf_counter() - start
    model.write_results(adata)
    latent = adata.obsm["X_spavae"]
    domains = cluster_kmeans(latent, n_domains, seed=args.seed)
    refined = refine_labels(domains, adata.obsm["spatial"])
    adata.obs["spavae_domain"] = pd.Categorical(domains.astype(str))
    adata.obs["spavae_domain_refined"] = pd.Categorical(refined.astype(str))
    metrics = {"input": source, "n_spots": adata.n_obs, "n_genes": adata.n_vars, "n_domains": n_domains,
               "epochs": int(len(model.history)), "train_seconds": round(seconds, 2)}
    if truth is not None:
        for name, labels in (("", domains), ("_refined", refined)):
            scores = score_clustering(truth.astype(str), labels)
            metrics[f"ari{name}"], metrics[f"nmi{name}"] = round(scores["ari"], 4), round(scores["nmi"], 4)
    with atomic_path(out / "results.h5ad") as tmp:
        adata.write_h5ad(tmp)
    with atomic_path(out / "latent.csv") as tmp:
        pd.DataFrame(latent, index=adata.obs_names,
                     columns=[f"gp{i}" for i in range(model.module.n_gp)]
                     + [f"gauss{i}" for i in range(model.module.n_gauss)]).to_csv(tmp)
    plot_spatial_domains(adata.obsm["spatial"], domains, out / "domains.png", truth=truth)
    plot_training_curves(model.history, out / "training.png")
    model.save(out / "model.pt", overwrite=True)
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics), flush=True)
    print(f"wrote {out}/: results.h5ad, latent.csv, domains.png, training.png, model.pt, metrics.json", flush=True)
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``spavae`` command."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
