"""Command line of spavae.

* ``spavae run [INPUT]`` trains spaVAE and writes the latent, domains and a plot (without INPUT: a simulated
  section with planted domains); without labels it chooses the number of domains by the silhouette;
* ``spavae train -c CONFIG`` trains an experiment config into ``<save_dir>/<name>/`` (checkpoints, logs,
  TensorBoard events) and evaluates it; ``spavae resume RUN_DIR`` continues an interrupted run from its last
  checkpoint; ``spavae evaluate RUN_DIR`` writes the latent, domains, scores and figures of a run
  (see docs/experiments.md); with ``--devices N``, train and resume train one model data-parallel over N
  processes started with torchrun (see docs/distributed.md);
* ``spavae sweep CONFIG --grid KEY=V1,V2 --seeds 0 1 2`` trains a grid of configs x seeds x input files as Ray
  tasks into one results table (see docs/sweeps.md);
* ``spavae domains|de|svg|predict|enhance SOURCE`` run the analyses on a trained run (a ``spavae run`` folder, a
  ``spavae train`` run folder, or a results .h5ad with ``--model``) and write tables and figures
  (see docs/cli.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import sparse

import spavae
from spavae import distributed
from spavae.analysis import (
    choose_n_domains,
    cluster_kmeans,
    differential_expression,
    enhance,
    find_domains,
    predict,
    rank_genes_domains,
    refine_labels,
    score_clustering,
    set_category_colors,
    visium_array_to_xy,
)
from spavae.analysis.clustering import NEIGHBOURS
from spavae.analysis.domains import DEFAULT_K_RANGE, METHODS
from spavae.analysis.runs import TrainedRun, open_run
from spavae.analysis.svg import STATISTICS, check_svg_request, spatially_variable_genes
from spavae.api import VARIANTS
from spavae.data import filter_empty, read, simulate_spatial_counts
from spavae.data.readers import LABEL_KEY
from spavae.plot import (
    plot_gene_spatial,
    plot_marker_genes,
    plot_spatial_domains,
    plot_training_curves,
    plot_volcano,
)
from spavae.utils import atomic_path

UNLABELLED = "NA"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spavae", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"spavae {spavae.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train on a file (or the simulated default) and write results",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                         description="Train spaVAE, cluster the latent into spatial domains and write results: "
                                     "results.h5ad (latent in obsm['X_spavae'], domains in obs['spavae_domain'] and "
                                     "obs['spavae_domain_refined'] with their colours in uns, denoised counts in "
                                     "layers), latent.csv, domains.png, training.png, model.pt, metrics.json (with "
                                     "the number of domains and how it was chosen) and, when it was chosen by the "
                                     "silhouette, n_domains_selection.csv.")
    run.add_argument("input", nargs="?", help="a Space Ranger Visium or Visium HD folder, a Xenium folder, a SpatialData .zarr, an "
                                              ".h5ad with raw counts, or a spaVAE-layout .h5 (docs/formats.md); "
                                              "omitted: a simulated 32 x 32 section with 5 planted domains")
    run.add_argument("--out", default="spavae_out", help="output folder")
    run.add_argument("--layer", help=".h5ad only: layer with raw counts (default .X)")
    run.add_argument("--spatial-key", default="spatial", help=".h5ad only: obsm key of the coordinates")
    run.add_argument("--label-key", help=".h5ad only: obs column with ground-truth labels for scoring")
    _add_n_domains_options(run)
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
    _add_sweep_command(sub)
    _add_analysis_commands(sub)
    return parser


def _whole_number(text: str, minimum: int, what: str) -> int:
    """An integer option value of at least ``minimum``, or an argparse error naming ``what`` it counts."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def n_domains_value(text: str) -> int | str:
    """``--n-domains``: ``'auto'`` or a whole number >= 2."""
    return text if text == "auto" else _whole_number(text, 2, "a number of domains or 'auto'")


def devices_value(text: str) -> int:
    """``--devices N``: a whole number >= 1."""
    return _whole_number(text, 1, "a number of processes")


def k_range_value(text: str) -> range:
    """``--k-range LOW:HIGH`` (both included) as a ``range``."""
    low, sep, high = text.partition(":")
    try:
        low_k, high_k = int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be LOW:HIGH, e.g. 3:12, got {text!r}") from None
    if not sep or not 2 <= low_k <= high_k:
        raise argparse.ArgumentTypeError(f"must be LOW:HIGH with 2 <= LOW <= HIGH, got {text!r}")
    return range(low_k, high_k + 1)


def _add_n_domains_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-domains", type=n_domains_value, metavar="K|auto",
                        help="number of domains, or 'auto': the k of --k-range with the highest silhouette of KMeans "
                             "on the latent; when not given, the number of distinct non-NA ground-truth labels if "
                             "the data has labels, else auto")
    parser.add_argument("--k-range", type=k_range_value, default=f"{DEFAULT_K_RANGE.start}:{DEFAULT_K_RANGE.stop - 1}",
                        metavar="LOW:HIGH", help="candidate numbers of domains for auto, both ends included "
                                                 "(default: %(default)s)")


def labelled_domains(adata) -> int | None:
    """The number of distinct labelled (non-``NA``) ground-truth domains, or ``None`` without labels."""
    if LABEL_KEY not in adata.obs:
        return None
    labels = adata.obs[LABEL_KEY].dropna().astype(str)
    labels = labels[labels != UNLABELLED]
    return int(labels.nunique()) if len(labels) else None


def requested_n_domains(requested: int | str | None, adata) -> tuple[int | str, str]:
    """``--n-domains`` resolved: ``(K, 'given')``, ``(K, 'labels')`` or ``('auto', 'silhouette')``.

    Without ``--n-domains``, data with labels gets the number of labelled domains and data without labels the
    silhouette choice (:func:`~spavae.analysis.choose_n_domains`).
    """
    if requested is None:
        labelled = labelled_domains(adata)
        return ("auto", "silhouette") if labelled is None else (labelled, "labels")
    return (requested, "silhouette") if requested == "auto" else (int(requested), "given")


def _describe_choice(n_domains: int, chosen_by: str, table: pd.DataFrame | None) -> str:
    if chosen_by == "silhouette":
        return (f"{n_domains} domains: the highest silhouette of KMeans on the latent over k = "
                f"{table.index.min()}..{table.index.max()} ({table.loc[n_domains, 'silhouette']:.3f}; "
                "give --n-domains K to choose yourself)")
    return f"{n_domains} domains ({'the number of labelled domains' if chosen_by == 'labels' else 'as given'})"


def _add_experiment_commands(sub) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    log_help = ("JSON logging.config.dictConfig file replacing the default logging (console + log/train.log); "
                "relative handler filenames are placed in the run's log/ folder")
    devices_help = ("train one model data-parallel over N processes on this machine (torchrun; gloo on CPU, one GPU "
                    "per process with nccl); the batch size stays the global one (docs/distributed.md)")
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
    train.add_argument("--devices", type=devices_value, default=1, metavar="N", help=devices_help)
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
    resume.add_argument("--devices", type=devices_value, default=1, metavar="N", help=devices_help)
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


def grid_option(text: str) -> tuple[str, list]:
    """``--grid KEY=V1,V2,...``: the key and its values, each read as JSON (else kept as a string)."""
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise argparse.ArgumentTypeError(f"expected KEY=V1,V2,..., e.g. model.n_gp=2,5; got {text!r}")
    try:
        parsed = json.loads(f"[{values}]")  # numbers, true/false/null, "strings" and [lists]
    except json.JSONDecodeError:
        parsed = [_json_or_text(value) for value in values.split(",")]
    return key, parsed


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _add_sweep_command(sub) -> None:
    sweep = sub.add_parser(
        "sweep", help="train a grid of configs x seeds x input files as Ray tasks into one results table",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train every combination of the --grid values, --seeds and --data files of CONFIG, each an\n"
                    "ordinary run folder (as `spavae train`), as Ray tasks on a local Ray started for the call or on\n"
                    "an existing cluster (--address), and write into --out:\n"
                    "  runs/<name>/          one run folder per combination, e.g. 151507_model.n_gp=5_seed1\n"
                    "  results.csv, .json    one row per run: parameters, status (trained, skipped, failed), error,\n"
                    "                        seconds and metrics (all_ari, test_ari, knn_accuracy_...), then one\n"
                    "                        consensus row per seed group (consensus ARI vs the seeds' mean ARI and\n"
                    "                        their mean pairwise ARI)\n"
                    "  consensus/<group>.csv consensus domains of each seed group\n"
                    "  errors/<name>.txt     the traceback of each failed run\n"
                    "A failed run does not stop the others. Running the same sweep again skips finished runs,\n"
                    "resumes interrupted ones and retries failed ones. Each task reserves --threads-per-task Ray\n"
                    "CPUs and trains with that many torch threads. Needs Ray: pip install spavae[distributed].\n"
                    "Example: spavae sweep config.json --grid model.n_gp=2,5 --seeds 0 1 2 --data a.h5 b.h5")
    sweep.add_argument("config", metavar="CONFIG", help="base experiment config (.json, .yaml or .yml)")
    sweep.add_argument("--grid", action="append", default=[], type=grid_option, metavar="KEY=V1,V2",
                       help="a config key and its values, each read as JSON (repeatable: every combination is "
                            "trained), e.g. --grid model.n_gp=2,5 --grid model.encoder_layers=[128,64],[64,32]")
    sweep.add_argument("--spec", metavar="FILE", help="JSON sweep spec instead of (or with) the options: "
                                                      '{"grid": {KEY: [V1, V2]} or [{KEY: V}, ...], '
                                                      '"seeds": [0, 1], "data": [FILE, ...]}')
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a key of CONFIG for every run, VALUE read as JSON (repeatable)")
    sweep.add_argument("--seeds", type=int, nargs="+", help="values of trainer.seed (default: the spec's, else 0)")
    sweep.add_argument("--data", nargs="+", metavar="FILE", help="input files, each trained with every grid point "
                                                                 "and seed (default: data.path of CONFIG)")
    sweep.add_argument("--out", default="sweep", help="sweep folder (default: sweep)")
    _add_ray_options(sweep, "run")
    sweep.add_argument("--serial", action="store_true", help="train the runs one after the other in this process, "
                                                             "without Ray")
    sweep.set_defaults(handler=sweep_command)


def _add_ray_options(parser: argparse.ArgumentParser, task: str) -> None:
    """--address, --num-cpus and --threads-per-task of a command whose trainings (``task``) can run as Ray tasks."""
    parser.add_argument("--address", help="existing Ray cluster to run on, e.g. auto or ray://head:10001 (spavae "
                                          "must be installed on its nodes); default: a local Ray for this call")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all cores)")
    parser.add_argument("--threads-per-task", type=int, default=1,
                        help=f"torch threads and Ray CPUs of each {task} (default 1)")


SOURCE_HELP = ("a `spavae run` folder (results.h5ad + model.pt), a `spavae train` run folder (checkpoint/config.json + "
               "checkpoint/model_best.pth), or a .h5ad with the spots the model was trained on (with --model)")


def _analysis_parser(sub, name: str, help: str, description: str) -> argparse.ArgumentParser:
    """A subcommand with the options every analysis shares: SOURCE, --model, --out, --seed, --device, --threads."""
    parser = sub.add_parser(name, help=help, description=description,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    parser.add_argument("--model", metavar="FILE", help="model file (SpaVAE.save) instead of the run's own; needed "
                                                        "with a .h5ad SOURCE")
    parser.add_argument("--out", metavar="DIR", help=f"output folder (default: <run folder>/{name}, "
                                                     f"<run>/results/{name} for a `spavae train` run, "
                                                     f"<folder of the .h5ad>/{name})")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the clustering and of the latent draws (default 0)")
    parser.add_argument("--device", help="load the model on 'cpu' or 'cuda' (default: the device it was saved with)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return parser


def _add_analysis_commands(sub) -> None:
    domains = _analysis_parser(
        sub, "domains", "cluster the latent of a trained run into spatial domains",
        "Cluster the latent (obsm['X_spavae'], or computed with the model) into spatial domains and write:\n"
        "  domains.csv                one row per spot: the domain (and the unrefined one with --refine)\n"
        "  domains.h5ad               the spots with the domains as a categorical obs column and their colours\n"
        "                             in uns['<key>_colors'] (scanpy.pl.spatial / squidpy draw them), the latent\n"
        "                             in obsm['X_spavae'] and the counts as a sparse .X (no layers)\n"
        "  domains.png                the domains in space, next to the ground truth when the data has labels\n"
        "  summary.json               number of domains and how it was chosen, method, Leiden resolution,\n"
        "                             ARI/NMI against the labels when there are labels\n"
        "  n_domains_selection.csv    with auto: silhouette and spatial coherence of every k of --k-range")
    _add_n_domains_options(domains)
    domains.add_argument("--method", choices=METHODS, default="kmeans",
                         help="KMeans (100 restarts), or Leiden with the resolution searched to give the number of "
                              "domains (default kmeans)")
    domains.add_argument("--refine", choices=["none", *sorted(NEIGHBOURS)], default="none",
                         help="neighbour-majority refinement: 'hexagon' (Visium), 'square' (ST) (default none)")
    domains.add_argument("--visium-array", action="store_true",
                         help="the coordinates are Visium (array_row, array_col): map them to the hexagonal lattice "
                              "for refinement and spatial coherence")
    domains.add_argument("--key", default="spavae_domains", help="obs column of the domains (default spavae_domains)")
    domains.set_defaults(handler=domains_command)

    de = _analysis_parser(
        sub, "de", "differential expression between domains (each vs the rest, or two groups)",
        "Differential expression from denoised posterior draws (spavae.analysis.differential_expression) and "
        "write:\n"
        "  de_<group1>_vs_<group2>.csv    one per comparison (<group2> = rest without --group2): one row per gene\n"
        "                                 with LFC, mean/median/sd_LFC, prob_DE, prob_not_DE, bayes_factor and the\n"
        "                                 denoised/raw group means, sorted by bayes_factor then LFC\n"
        "  volcano_<group1>_vs_<group2>.png   LFC against the Bayes factor, top genes named\n"
        "  summary.csv                    one row per comparison: group sizes, LFC threshold delta, pseudocount,\n"
        "                                 number of genes with prob_DE >= 0.8\n"
        "Groups: --groupby COLUMN of the spots' obs (or of the --labels CSV). Without either, the domains of\n"
        "`spavae domains` in the default output folder (<...>/domains/domains.csv), else the refined domains of\n"
        "`spavae run` / `spavae evaluate`.")
    de.add_argument("--groupby", metavar="COLUMN", help="obs column (or --labels CSV column) with the groups")
    de.add_argument("--labels", metavar="CSV", help="CSV of groups: first column the spot names, then the group "
                                                    "column(s), e.g. the domains.csv of `spavae domains`")
    de.add_argument("--group1", metavar="A[,B...]", help="labels of the first group (default: each group in turn)")
    de.add_argument("--group2", metavar="C[,D...]", help="labels of the second group (default: every other "
                                                         "labelled spot)")
    de.add_argument("--unlabeled", default="NA", help="label of unannotated spots, left out of 'the rest' "
                                                      "(default NA)")
    de.add_argument("--n-draws", type=int, default=10000, help="spots drawn per group (default 10000, as the "
                                                               "original)")
    de.set_defaults(handler=de_command)

    svg = _analysis_parser(
        sub, "svg", "spatially variable genes (linear-decoder spaLDVAE scores, optional permutation p-values)",
        "Rank genes by their spatial score, the share of their expected expression that comes from the GP\n"
        "factors of a linear-decoder model (spavae.analysis.svg). The run's own model is used when it is a\n"
        "linear-decoder model; otherwise a spaLDVAE is trained on the run's spots (--epochs, --beta). Writes:\n"
        "  svg.csv          one row per gene, best first by --statistic: spatial_score, non_spatial_score,\n"
        "                   spatial_variance, rank[, pvalue, qvalue]\n"
        "  svg.png          the top --n-plot genes in space, measured vs denoised (normalised scale)\n"
        "  svg_model.pt     the spaLDVAE trained here (when the run's model is not one)\n"
        "--permutations N retrains N models on locations shuffled across spots for per-gene empirical p-values\n"
        "and BH q-values: each costs one more training; --ray trains them as Ray tasks (see docs/sweeps.md for\n"
        "how many permutations and which --statistic to trust).")
    svg.add_argument("--epochs", type=int, default=400, help="epochs of the spaLDVAE trained here (default 400)")
    svg.add_argument("--beta", type=float, default=10.0,
                     help="KL weight of the spaLDVAE trained here (default 10, the original's; use 1 for panels of "
                          "about a hundred genes, where 10 collapses the latent)")
    svg.add_argument("--statistic", choices=STATISTICS, default="spatial_score",
                     help="what ranks the genes and is tested: spatial_score, the GP factors' share of the gene's "
                          "expression (the original's, default), or spatial_variance, their variation of the gene "
                          "relative to its mean")
    svg.add_argument("--permutations", type=int, default=0, help="null models on permuted locations (default 0)")
    svg.add_argument("--ray", action="store_true", help="train the null models as Ray tasks "
                                                        "(pip install spavae[distributed])")
    _add_ray_options(svg, "null model")
    svg.add_argument("--n-plot", type=int, default=4, help="genes drawn in svg.png (default 4)")
    svg.add_argument("--quiet", action="store_true", help="no progress bar")
    svg.set_defaults(handler=svg_command)

    predict = _analysis_parser(
        sub, "predict", "latent and expression at new locations from a CSV",
        "Predict the latent (GP posterior at the new locations; Gaussian dimensions of the nearest spot) and the\n"
        "denoised expression (normalised scale) at the locations of LOCATIONS.csv, in the coordinate frame of\n"
        "the training spots (spavae.analysis.predict). Writes:\n"
        "  predictions.csv    one row per input row: its columns, nearest_spot, latent_gp0.., latent_gauss0..,\n"
        "                     then one column per gene of --genes (all genes by default)\n"
        "  predictions.h5ad   the same as an AnnData (expression in .X, latent in obsm['X_spavae'])\n"
        "  predictions.png    a gene measured at the spots and predicted at the new locations\n"
        "A multi-section model needs the section of each location (--section-column).")
    predict.add_argument("locations", metavar="LOCATIONS.csv", help="CSV with one row per new location")
    predict.add_argument("--x-column", default="x", help="column of the x coordinate (default x)")
    predict.add_argument("--y-column", default="y", help="column of the y coordinate (default y)")
    predict.add_argument("--section-column", default="section",
                         help="column with the section of each location, for a multi-section model (default section)")
    _add_gene_options(predict)
    predict.set_defaults(handler=predict_command)

    enhance = _analysis_parser(
        sub, "enhance", "5x resolution: predict 4 sub-spots around every spot",
        "Predict latent and expression at four sub-spots around every spot plus the spot itself (5N rows;\n"
        "spavae.analysis.enhance). Writes:\n"
        "  enhanced.h5ad    5N rows: expression (normalised scale) in .X, obsm['spatial'], the latent in\n"
        "                   obsm['X_spavae'], obs['parent_spot'] and obs['offset']\n"
        "  enhanced.png     a gene measured at the spots and predicted at the 5N sub-spots\n"
        "Sub-spots keep their parent's section in a multi-section model.")
    _add_gene_options(enhance, table=False)
    enhance.set_defaults(handler=enhance_command)


def _add_gene_options(parser: argparse.ArgumentParser, *, table: bool = True) -> None:
    if table:
        parser.add_argument("--genes", metavar="G1[,G2...]", help="genes written to the table (default: all)")
    parser.add_argument("--plot-gene", metavar="GENE", help="gene drawn in the figure (default: the first of --genes, "
                                                           "else the gene most variable across the spots)"
                        if table else "gene drawn in the figure (default: the gene most variable across the spots)")
    parser.add_argument("--n-samples", type=int, default=25, help="latent draws averaged per location (default 25)")


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


def sweep_command(args: argparse.Namespace) -> None:
    """The ``sweep`` command."""
    from spavae.sweep import run_sweep

    spec = {}
    if args.spec:
        path = Path(args.spec)
        if not path.is_file():
            raise FileNotFoundError(f"sweep spec {path}: no such file")
        spec = json.loads(path.read_text())
        if not isinstance(spec, dict) or set(spec) - {"grid", "seeds", "data"}:
            raise ValueError(f"sweep spec {path}: expected an object with the keys grid, seeds and data")
    grid = spec.get("grid")
    if args.grid:
        if grid is not None and not isinstance(grid, dict):
            raise ValueError("--grid cannot be combined with a spec whose grid is a list of points")
        grid = (grid or {}) | dict(args.grid)
    table = run_sweep(args.config, grid, args.seeds or spec.get("seeds", [0]), args.data or spec.get("data", []),
                      out_dir=args.out, overrides=args.set, address=args.address, num_cpus=args.num_cpus,
                      threads_per_task=args.threads_per_task, use_ray=not args.serial,
                      progress=lambda message: print(message, flush=True))
    runs = table[table["kind"] == "run"]
    failed = int((runs["status"] == "failed").sum())
    print(f"{len(runs)} runs: {int((runs['status'] == 'trained').sum())} trained, "
          f"{int((runs['status'] == 'skipped').sum())} skipped (finished before), {failed} failed", flush=True)
    if failed:
        raise ValueError(f"{failed} of {len(runs)} runs failed: see the error column of {args.out}/results.csv and "
                         f"{args.out}/errors/; run the sweep again to retry them")


def _plain(value):
    """JSON form of NumPy scalars and arrays."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


class Outputs:
    """Writes the files of one command into its folder, each atomically, and reports what it wrote."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.names: list[str] = []

    def _path(self, name: str) -> Path:
        self.names.append(name)
        return self.folder / name

    def csv(self, name: str, table: pd.DataFrame, *, index: bool = True) -> None:
        """``table`` (with its index unless ``index=False``) as ``name``."""
        with atomic_path(self._path(name)) as tmp:
            table.to_csv(tmp, index=index)

    def h5ad(self, name: str, adata) -> None:
        """``adata`` as ``name``."""
        with atomic_path(self._path(name)) as tmp:
            adata.write_h5ad(tmp)

    def json(self, name: str, value: dict) -> None:
        """``value`` as indented JSON."""
        with atomic_path(self._path(name)) as tmp:
            tmp.write_text(json.dumps(value, indent=2, default=_plain) + "\n")

    def figure(self, name: str, plot, *args, **kwargs) -> None:
        """``plot(*args, path, **kwargs)``: a :mod:`spavae.plot` function (those write atomically)."""
        plot(*args, self._path(name), **kwargs)

    def model(self, name: str, model: spavae.SpaVAE) -> None:
        """``model.save`` as ``name`` (replacing an older file)."""
        model.save(self._path(name), overwrite=True)

    def report(self) -> None:
        """Print the folder and the files written."""
        print(f"wrote {self.folder}/: {', '.join(self.names)}", flush=True)


def latent_columns(model: spavae.SpaVAE) -> list[str]:
    """Names of the latent dimensions: ``gp0``, ``gp1``, ..., then ``gauss0``, ``gauss1``, ..."""
    return [f"gp{i}" for i in range(model.module.n_gp)] + [f"gauss{i}" for i in range(model.module.n_gauss)]


def run_command(args: argparse.Namespace) -> dict:
    """The ``run`` command; returns the metrics it writes to ``metrics.json``."""
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the outputs")
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
    if isinstance(args.n_domains, int) and not args.n_domains < adata.n_obs:
        raise ValueError(f"--n-domains must be below the number of spots ({adata.n_obs}), got {args.n_domains}")
    truth = adata.obs[LABEL_KEY] if LABEL_KEY in adata.obs else None
    print(f"spavae {spavae.__version__}: {adata.n_obs} spots x {adata.n_vars} genes from {source}", flush=True)
    start = time.perf_counter()
    model = spavae.SpaVAE(adata, kernel=args.kernel, inducing_steps=args.inducing_steps, dtype=args.dtype,
                          device=args.device, seed=args.seed)
    model.train(max_epochs=args.epochs, lr=args.lr, patience=args.patience, progress=not args.quiet)
    seconds = time.perf_counter() - start
    model.write_results(adata)
    latent = adata.obsm["X_spavae"]
    n_domains, chosen_by = requested_n_domains(args.n_domains, adata)
    selection = None
    if n_domains == "auto":
        n_domains, selection = choose_n_domains(latent, adata.obsm["spatial"], k_range=args.k_range, seed=args.seed)
    print(_describe_choice(n_domains, chosen_by, selection), flush=True)
    domains = cluster_kmeans(latent, n_domains, seed=args.seed)
    refined = refine_labels(domains, adata.obsm["spatial"])
    categories = [str(c) for c in range(n_domains)]
    for key, labels in (("spavae_domain", domains), ("spavae_domain_refined", refined)):
        adata.obs[key] = pd.Categorical(labels.astype(str), categories=categories)
        set_category_colors(adata, key)
    metrics = {"input": source, "n_spots": adata.n_obs, "n_genes": adata.n_vars, "n_domains": n_domains,
               "n_domains_chosen_by": chosen_by, "epochs": int(len(model.history)), "train_seconds": round(seconds, 2)}
    if truth is not None:
        for name, labels in (("", domains), ("_refined", refined)):
            scores = score_clustering(truth.astype(str), labels)
            metrics[f"ari{name}"], metrics[f"nmi{name}"] = round(scores["ari"], 4), round(scores["nmi"], 4)
    written = Outputs(out)
    written.h5ad("results.h5ad", adata)
    written.csv("latent.csv", pd.DataFrame(latent, index=adata.obs_names, columns=latent_columns(model)))
    if selection is not None:
        written.csv("n_domains_selection.csv", selection)
    written.figure("domains.png", plot_spatial_domains, adata.obsm["spatial"], domains, truth=truth)
    written.figure("training.png", plot_training_curves, model.history)
    written.model("model.pt", model)
    written.json("metrics.json", metrics)
    print(json.dumps(metrics), flush=True)
    written.report()
    return metrics


# ---------------------------------------------------------------------- analyses of a trained run
def _open(args: argparse.Namespace, command: str) -> tuple[TrainedRun, Path]:
    """The run of ``args.source`` and the output folder of ``command``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    run = open_run(args.source, model_path=args.model, device=args.device)
    return run, Path(args.out) if args.out else run.output_root / command


def _slug(labels: list[str] | None) -> str:
    """A file-name part for a group: its labels joined by '+', other characters than [A-Za-z0-9_.+-] as '_'."""
    return "rest" if labels is None else re.sub(r"[^A-Za-z0-9_.+-]", "_", "+".join(labels))


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]


def _counts(adata, model: spavae.SpaVAE, genes: list[str]) -> np.ndarray:
    """Measured counts of ``genes`` divided by the model's size factors (the normalised scale of the decoder)."""
    layer = model.init_params["layer"]
    matrix = (adata.X if layer is None else adata.layers[layer])[:, adata.var_names.get_indexer(genes)]
    matrix = matrix.toarray() if sparse.issparse(matrix) else np.asarray(matrix)
    return matrix.astype(np.float64) / model.size_factors[:, None]


def _check_genes(genes: list[str], known: pd.Index) -> None:
    unknown = [g for g in genes if g not in known]
    if unknown:
        raise KeyError(f"unknown gene(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''}: not among the "
                       f"{len(known)} genes of the model (e.g. {list(known[:3])})")


def _plot_gene(args: argparse.Namespace, adata, model: spavae.SpaVAE, genes: list[str] | None) -> str:
    """``--plot-gene``, else the first of ``genes``, else the gene whose log normalised counts vary most."""
    if args.plot_gene is not None:
        _check_genes([args.plot_gene], model.var_names)
        return args.plot_gene
    if genes:
        return genes[0]
    names = list(model.var_names)
    variances = np.concatenate([np.log1p(_counts(adata, model, names[i:i + 1000])).var(0)
                                for i in range(0, len(names), 1000)])
    return names[int(np.argmax(variances))]


def domains_command(args: argparse.Namespace) -> None:
    """The ``domains`` command."""
    run, out = _open(args, "domains")
    run.ensure_latent()
    adata = run.adata
    n_domains, chosen_by = requested_n_domains(args.n_domains, adata)
    truth_key = LABEL_KEY if labelled_domains(adata) is not None else None
    find_domains(adata, n_domains, method=args.method, refine=None if args.refine == "none" else args.refine,
                 visium_array=args.visium_array, truth_key=truth_key, k_range=args.k_range, seed=args.seed,
                 key_added=args.key)
    info = adata.uns[args.key]
    selection = None
    if "selection" in info:
        selection = pd.DataFrame({k: info["selection"][k] for k in ("silhouette", "spatial_coherence")},
                                 index=pd.Index(info["selection"]["k"], name="k"))
        selection["chosen"] = selection.index == info["n_domains"]
    print(_describe_choice(info["n_domains"], chosen_by, selection), flush=True)
    columns = [key for key in (args.key, f"{args.key}_unrefined") if key in adata.obs]
    export = adata.copy()
    for layer in [name for name in export.layers if name.endswith("_denoised")]:
        del export.layers[layer]  # recomputable from the model, and as large as the data
    if export.X is not None and not sparse.issparse(export.X):
        export.X = sparse.csr_matrix(export.X)
    locations = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    summary = {"source": str(args.source), "n_domains": info["n_domains"], "n_domains_chosen_by": chosen_by,
               **{k: info[k] for k in ("resolution", "leiden_seed", "scores") if k in info}, "params": info["params"]}
    written = Outputs(out)
    written.csv("domains.csv", adata.obs[columns].rename_axis("spot"))
    written.h5ad("domains.h5ad", export)
    written.figure("domains.png", plot_spatial_domains,
                   visium_array_to_xy(locations) if args.visium_array else locations, adata.obs[args.key],
                   truth=adata.obs[truth_key] if truth_key else None)
    written.json("summary.json", summary)
    if selection is not None:
        written.csv("n_domains_selection.csv", selection)
    written.report()


def _de_groups(args: argparse.Namespace, run: TrainedRun) -> tuple[str, str]:
    """Put the groups in an ``obs`` column; returns the column and where the groups came from."""
    adata = run.adata
    labels = Path(args.labels) if args.labels else None
    if labels is None and args.groupby is None:
        default = run.output_root / "domains" / "domains.csv"
        if default.is_file():
            labels = default
        elif "spavae_domain_refined" in adata.obs:
            return "spavae_domain_refined", "the refined domains of the run (obs['spavae_domain_refined'])"
        else:
            raise ValueError("no groups to compare: run `spavae domains SOURCE` first, or give --groupby COLUMN "
                             f"(obs columns: {list(adata.obs.columns)}) or --labels CSV")
    if labels is None:
        if args.groupby not in adata.obs:
            raise KeyError(f"--groupby {args.groupby}: the spots have no such obs column; columns: "
                           f"{list(adata.obs.columns)}")
        return args.groupby, f"obs['{args.groupby}']"
    table = pd.read_csv(labels, index_col=0)
    column = args.groupby or (table.columns[0] if len(table.columns) else None)
    if column not in table:
        raise KeyError(f"{labels} has no column {column!r}; columns: {list(table.columns)}")
    table.index = table.index.astype(str)
    if not adata.obs_names.isin(table.index).any():
        raise ValueError(f"none of the spot names in {labels} (first column) are spots of {args.source}")
    values = table[column].astype(str).reindex(adata.obs_names)
    adata.obs[column] = values.to_numpy(dtype=object)
    return column, f"column '{column}' of {labels}"


def de_command(args: argparse.Namespace) -> None:
    """The ``de`` command."""
    run, out = _open(args, "de")
    group1, group2 = _split(args.group1), _split(args.group2)
    if group2 is not None and group1 is None:
        raise ValueError("--group2 needs --group1 (without both, each group is compared with the rest)")
    groupby, where = _de_groups(args, run)
    model, adata = run.model(), run.adata
    print(f"groups: {where}", flush=True)
    options = {"groupby": groupby, "unlabeled": args.unlabeled, "n_draws": args.n_draws, "seed": args.seed}
    if group1 is not None:
        table = differential_expression(adata, model, group1=group1, group2=group2, **options)
        comparisons = [(group1, group2, table, table.attrs)]
    else:
        rank_genes_domains(adata, model, key_added="spavae_de", **options)
        results, summary = adata.uns["spavae_de"]["results"], adata.uns["spavae_de"]["summary"]
        comparisons = [([row.group], None,
                        results[results["group"] == row.group].drop(columns="group").set_index("gene"),
                        row._asdict()) for row in summary.itertuples(index=False)]
    written, rows = Outputs(out), []
    for first, second, table, attrs in comparisons:
        name = f"{_slug(first)}_vs_{_slug(second)}"
        table = table.sort_values(["bayes_factor", "LFC"], ascending=False)
        written.csv(f"de_{name}.csv", table)
        written.figure(f"volcano_{name}.png", plot_volcano, table,
                       title=f"{'+'.join(first)} vs {'rest' if second is None else '+'.join(second)}")
        rows.append({"group1": "+".join(first), "group2": "rest" if second is None else "+".join(second),
                     **{k: attrs[k] for k in ("n_spots1", "n_spots2", "delta", "pseudocount")},
                     "n_prob_de_0.8": int((table["prob_DE"] >= 0.8).sum())})
    written.csv("summary.csv", pd.DataFrame(rows), index=False)
    written.report()


def svg_command(args: argparse.Namespace) -> None:
    """The ``svg`` command."""
    check_svg_request(args.statistic, args.permutations)
    if (args.address or args.num_cpus) and not args.ray:
        raise ValueError("--address and --num-cpus are options of the Ray null models: add --ray")
    run, out = _open(args, "svg")
    adata = run.adata
    model = run.model() if run.model_path is not None else None
    trained_here = model is None or not (model.init_params["decoder"] == "linear"
                                         and model.init_params["latent_distribution"] == "lognormal")
    if trained_here:
        data_keys = {} if model is None else {k: model.init_params[k] for k in ("layer", "spatial_key")}
        print(f"training a linear-decoder spaLDVAE for the spatial scores ({args.epochs} epochs at most, "
              f"beta {args.beta})", flush=True)
        model = spavae.SpaVAE.from_variant("spaLDVAE", adata, device=args.device or "auto", seed=args.seed, **data_keys)
        model.train(**(VARIANTS["spaLDVAE"]["train"] | {"max_epochs": args.epochs, "beta": args.beta,
                                                         "progress": not args.quiet}))
    table = spatially_variable_genes(adata, model, statistic=args.statistic, n_permutations=args.permutations,
                                     use_ray=args.ray, address=args.address, num_cpus=args.num_cpus,
                                     threads_per_task=args.threads_per_task if args.ray else None,
                                     progress=lambda r: print(f"null model {r + 1}/{args.permutations}", flush=True))
    top = list(table.index[:args.n_plot])
    denoised = model.get_denoised_counts(library_size="normalized")[:, model.var_names.get_indexer(top)]
    written = Outputs(out)
    written.csv("svg.csv", table.rename_axis("gene"))
    written.figure("svg.png", plot_marker_genes, adata.obsm[model.init_params["spatial_key"]],
                   _counts(adata, model, top), denoised, top, titles=("measured", "spaLDVAE denoised"))
    if trained_here:
        written.model("svg_model.pt", model)
    written.report()


def predict_command(args: argparse.Namespace) -> None:
    """The ``predict`` command."""
    run, out = _open(args, "predict")
    table = pd.read_csv(args.locations)
    missing = [c for c in (args.x_column, args.y_column) if c not in table]
    if missing:
        raise ValueError(f"{args.locations} has no column(s) {missing} (columns: {list(table.columns)}); name the "
                         "coordinate columns with --x-column and --y-column")
    try:
        coordinates = table[[args.x_column, args.y_column]].apply(pd.to_numeric).to_numpy(np.float64)
    except ValueError as err:
        raise ValueError(f"{args.locations}: the coordinate columns must be numbers ({err})") from None
    model, adata = run.model(), run.adata
    sections = None
    if model.setup.sections is not None:
        if args.section_column not in table:
            raise ValueError(f"{args.locations} has no column '{args.section_column}': this model has several "
                             f"sections ({model.setup.sections}); name the column with --section-column")
        sections = table[args.section_column].astype(str).to_numpy()
    genes = _split(args.genes) or list(model.var_names)
    _check_genes(genes, model.var_names)
    gene = _plot_gene(args, adata, model, _split(args.genes))
    predicted = predict(model, coordinates, sections=sections, n_samples=args.n_samples, seed=args.seed,
                        obs_names=pd.Index([f"pred{i}" for i in range(len(table))]))
    latent = pd.DataFrame(predicted.obsm["X_spavae"], columns=[f"latent_{c}" for c in latent_columns(model)])
    expression = pd.DataFrame(predicted[:, genes].X, columns=genes)
    result = pd.concat([table, pd.DataFrame({"nearest_spot": predicted.obs["nearest_spot"].astype(str).to_numpy()}),
                        latent, expression], axis=1)
    spots = adata.obsm[model.init_params["spatial_key"]]
    written = Outputs(out)
    written.csv("predictions.csv", result, index=False)
    written.h5ad("predictions.h5ad", predicted)
    written.figure("predictions.png", plot_gene_spatial,
                   {"measured (normalised)": (spots, _counts(adata, model, [gene])),
                    "predicted": (coordinates, predicted[:, gene].X)}, gene=gene)
    written.report()


def enhance_command(args: argparse.Namespace) -> None:
    """The ``enhance`` command."""
    run, out = _open(args, "enhance")
    model, adata = run.model(), run.adata
    gene = _plot_gene(args, adata, model, None)
    enhanced = enhance(model, n_samples=args.n_samples, seed=args.seed)
    written = Outputs(out)
    written.h5ad("enhanced.h5ad", enhanced)
    written.figure("enhanced.png", plot_gene_spatial,
                   {"measured (normalised)": (adata.obsm[model.init_params["spatial_key"]],
                                              _counts(adata, model, [gene])),
                    "enhanced": (enhanced.obsm["spatial"], enhanced[:, gene].X)}, gene=gene)
    written.report()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``spavae`` command."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if getattr(args, "devices", 1) > 1 and not distributed.launched():  # the ranks started here see torchrun's env
        return distributed.launch(args.devices, sys.argv[1:] if argv is None else argv)
    try:
        args.handler(args)
    except (ValueError, KeyError, OSError, ImportError, FloatingPointError) as err:
        message = err.args[0] if len(err.args) == 1 and isinstance(err.args[0], str) else str(err)
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
