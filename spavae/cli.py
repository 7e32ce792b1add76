"""Command line of spavae.

* ``spavae run [INPUT]`` trains spaVAE and writes the latent, domains and a plot (without INPUT: a simulated
  section with planted domains);
* ``spavae train -c CONFIG`` trains an experiment config into ``<save_dir>/<name>/`` (checkpoints, logs,
  TensorBoard events) and evaluates it; ``spavae resume RUN_DIR`` continues an interrupted run from its last
  checkpoint; ``spavae evaluate RUN_DIR`` writes the latent, domains, scores and figures of a run
  (see docs/experiments.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

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
    run.set_defaults(handler=run_command)
    _add_experiment_commands(sub)
    return parser


def _add_experiment_commands(sub) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    log_help = ("JSON logging.config.dictConfig file replacing the default logging (console + log/train.log); "
                "relative handler filenames are placed in the run's log/ folder")
    train = sub.add_parser(
        "train", help="train an experiment config into <save_dir>/<name>/, then evaluate it", formatter_class=formatter,
        description="Validate CONFIG (JSON, or YAML with PyYAML), train it and write the run folder:\n"
                    "  checkpoint/config.json, checkpoint/checkpoint-epoch<N>.pth, checkpoint/model_best.pth\n"
                    "  log/train.log, log/history.csv, log/events.out.tfevents.* (TensorBoard)\n"
                    "  results/ (metrics.json, latent.csv, domains.csv, figures; skipped with --no-evaluate)\n"
                    "Every key, its default and meaning: docs/experiments.md.")
    train.add_argument("-c", "--config", required=True, help="experiment config file (.json, .yaml or .yml)")
    train.add_argument("--log-config", metavar="FILE", help=log_help)
    train.add_argument("--data", metavar="PATH", help="input .h5/.h5ad file; overrides data.path of the config")
    train.add_argument("--name", help="run name (the folder under save_dir); overrides name of the config")
    train.add_argument("--seed", type=int, help="overrides trainer.seed of the config")
    train.add_argument("--threads", type=int, help="torch CPU threads; overrides trainer.threads of the config")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override any config key, VALUE read as JSON (repeatable), e.g. "
                            "--set trainer.max_epochs=50 --set model.encoder_layers=[64,32]")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")
    train.add_argument("--no-evaluate", action="store_true", help="do not evaluate the run after training")
    train.add_argument("--quiet", action="store_true", help="no progress bar (sets trainer.progress to false)")
    train.set_defaults(handler=train_command)
    resume = sub.add_parser(
        "resume", help="continue an interrupted run from its newest checkpoint, then evaluate it",
        formatter_class=formatter,
        description="Load RUN_DIR/checkpoint/config.json and the newest readable checkpoint-epoch<N>.pth, restore the "
                    "weights, optimiser, scheduler, beta controller, random states and history, and train on until "
                    "trainer.max_epochs or early stopping, exactly as the uninterrupted run would have. A finished "
                    "run is not trained further. TensorBoard events written after the checkpoint are dropped.")
    resume.add_argument("run_dir", metavar="RUN_DIR", help="the run folder, e.g. experiments/151507")
    resume.add_argument("--log-config", metavar="FILE", help=log_help)
    resume.add_argument("--no-evaluate", action="store_true", help="do not evaluate the run after training")
    resume.set_defaults(handler=resume_command)
    evaluate = sub.add_parser(
        "evaluate", help="latent, domains, scores and figures of a trained run", formatter_class=formatter,
        description="Embed all spots with RUN_DIR/checkpoint/model_best.pth, cluster the latent (KMeans, then "
                    "optional neighbour refinement) and write RUN_DIR/results/: metrics.json (ARI/NMI on the "
                    "labelled spots, on the test spots and the k-NN accuracy when the run holds out a test set), "
                    "latent.csv, domains.csv, domains.png (found vs ground truth), umap.png, markers.png (raw vs "
                    "denoised marker genes) and training.png. Settings: the config's evaluation section.")
    evaluate.add_argument("run_dir", metavar="RUN_DIR", help="the run folder, e.g. experiments/151507")
    evaluate.add_argument("--log-config", metavar="FILE", help=log_help)
    evaluate.set_defaults(handler=evaluate_command)


def train_command(args: argparse.Namespace) -> None:
    """The ``train`` command."""
    from spavae import experiment
    from spavae.config import load_config

    overrides = list(args.set)
    for key, value in (("data.path", args.data), ("name", args.name), ("trainer.seed", args.seed),
                       ("trainer.threads", args.threads)):
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    if args.quiet:
        overrides.append("trainer.progress=false")
    config = load_config(args.config, overrides)
    experiment.train(config, log_config=args.log_config, overwrite=args.overwrite,
                     evaluate_after=not args.no_evaluate)


def resume_command(args: argparse.Namespace) -> None:
    """The ``resume`` command."""
    from spavae import experiment

    experiment.resume(args.run_dir, log_config=args.log_config, evaluate_after=not args.no_evaluate)


def evaluate_command(args: argparse.Namespace) -> None:
    """The ``evaluate`` command."""
    from spavae import experiment

    print(json.dumps(experiment.evaluate(args.run_dir, log_config=args.log_config)), flush=True)


def run_command(args: argparse.Namespace) -> dict:
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
        args.handler(args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
