"""``spavae run [INPUT]``: train on a file (or the simulated default), find the spatial domains and write the
results into one folder."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from spavae import __version__
from spavae.analysis.domains import cluster_domains, write_domain_columns
from spavae.analysis.latent_activity import active_dimensions, count_active, describe_active_dimensions
from spavae.api import SpaVAE
from spavae.choices import describe_choices
from spavae.cli.domains import add_n_domains_options, describe_choice, unscored_line
from spavae.cli.outputs import Outputs
from spavae.data import filter_empty, read, simulate_spatial_counts
from spavae.data.readers import LABEL_KEY, UNLABELLED
from spavae.plot import plot_domains_on_image, plot_spatial_domains, plot_training_curves

#: Every file ``spavae run`` writes: a folder that holds one of them holds an earlier run.
RUN_FILES = ("results.h5ad", "latent.csv", "n_domains_selection.csv", "domains.png", "domains_on_image.png",
             "training.png", "model.pt", "metrics.json")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``run`` command."""
    run = sub.add_parser("run", help="train on a file (or the simulated default) and write results",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                         description="Train spaVAE, cluster the latent into spatial domains and write results: "
                                     "results.h5ad (latent in obsm['X_spavae'], domains in obs['spavae_domain'] and "
                                     "obs['spavae_domain_refined'] with their colours in uns, denoised counts of the "
                                     "model's genes as SpaVAE.write_results writes them), latent.csv, domains.png, "
                                     "training.png, model.pt, metrics.json (with the number of domains and how it was "
                                     "chosen), domains_on_image.png when the input has a tissue image and, when the "
                                     "number of domains was chosen from the latent, n_domains_selection.csv. An "
                                     "--out folder that holds the outputs of an earlier run is refused unless "
                                     "--overwrite is given.")
    run.add_argument("input", nargs="?", help="a Space Ranger Visium or Visium HD folder, a Xenium folder, a "
                                              "SpatialData .zarr, an .h5ad with raw counts, or a spaVAE-layout .h5 "
                                              "(docs/formats.md); omitted: a simulated 32 x 32 section with 5 "
                                              "planted domains")
    run.add_argument("--out", default="spavae_out", help="output folder")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the outputs of an earlier run in --out (without it, such a folder is refused)")
    run.add_argument("--layer", help=".h5ad only: layer with raw counts (default .X)")
    run.add_argument("--spatial-key", default="spatial", help=".h5ad only: obsm key of the coordinates")
    run.add_argument("--label-key", help=".h5ad only: obs column with ground-truth labels for scoring")
    add_n_domains_options(run)
    run.add_argument("--image", help="use the tissue image as a second view of the latent: 'auto' (hires, else "
                                     "lowres), 'hires' or 'lowres' (a Space Ranger folder's images), the path of a "
                                     "full-resolution (OME-)TIFF of the same slide, or an .h5ad's obsm key of "
                                     "per-spot features (docs/image.md); omitted: the counts alone")
    run.add_argument("--image-weight", type=float, default=1.0,
                     help="with --image: weight of the image features' likelihood relative to the counts'")
    run.add_argument("--epochs", type=int, default=400, help="maximum training epochs")
    run.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate")
    run.add_argument("--patience", type=int, default=50, help="early-stopping patience (epochs)")
    run.add_argument("--kernel", default="cauchy", choices=["cauchy", "eq"], help="GP kernel")
    run.add_argument("--inducing-steps", type=int, default=None,
                     help="grid inducing points: (steps+1)^2 points (default: 12 up to 2,000 spots, else 6)")
    run.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="network dtype")
    run.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    run.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    run.add_argument("--seed", type=int, default=0, help="random seed (same seed, same CPU result)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace) -> dict:
    """The ``run`` command; returns the metrics it writes to ``metrics.json``."""
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the outputs")
    written = Outputs(out)
    written.refuse_earlier(RUN_FILES, overwrite=args.overwrite)
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
    truth = adata.obs[LABEL_KEY].astype(object).to_numpy() if LABEL_KEY in adata.obs else None
    print(f"spavae {__version__}: {adata.n_obs} spots x {adata.n_vars} genes from {source}", flush=True)
    start = time.perf_counter()
    model = SpaVAE(adata, kernel=args.kernel, inducing_steps=args.inducing_steps, dtype=args.dtype,
                   device=args.device, seed=args.seed, image=args.image, image_weight=args.image_weight)
    print("\n".join(describe_choices(model)), flush=True)
    model.train(max_epochs=args.epochs, lr=args.lr, patience=args.patience, progress=not args.quiet)
    seconds = time.perf_counter() - start
    model.write_results(adata)
    active = active_dimensions(adata.obsm["X_spavae"])
    print(describe_active_dimensions(active, model.module.n_gp), flush=True)
    domains = cluster_domains(adata.obsm["X_spavae"], adata.obsm["spatial"], args.n_domains, refine="hexagon",
                              truth=truth, unlabeled=UNLABELLED, k_range=args.k_range, seed=args.seed)
    print(describe_choice(domains.n_domains, domains.chosen_by, domains.selection), flush=True)
    write_domain_columns(adata, {"spavae_domain": domains.labels, "spavae_domain_refined": domains.refined},
                         domains.n_domains)
    metrics = {"input": source, "n_spots": adata.n_obs, "n_genes": adata.n_vars, "n_domains": domains.n_domains,
               "n_domains_chosen_by": domains.chosen_by, "epochs": int(len(model.history)),
               "active_dimensions": count_active(active, model.module.n_gp),
               "train_seconds": round(seconds, 2)}
    if args.image is not None:
        metrics["image"] = model.summary()["image"] | {
            "spots_without_features": int(np.isnan(model.data.image_features).any(1).sum())}
    if domains.scores is not None:
        for suffix, name in (("", "labels"), ("_refined", "refined")):
            metrics[f"ari{suffix}"] = round(domains.scores[name]["ari"], 4)
            metrics[f"nmi{suffix}"] = round(domains.scores[name]["nmi"], 4)
    elif truth is not None:
        print(unscored_line(adata.n_obs), flush=True)
    written.h5ad("results.h5ad", adata)
    written.csv("latent.csv", pd.DataFrame(adata.obsm["X_spavae"], index=adata.obs_names, columns=model.latent_names))
    if domains.selection is not None:
        written.csv("n_domains_selection.csv", domains.selection)
    written.figure("domains.png", plot_spatial_domains, adata.obsm["spatial"], domains.labels,
                   truth=adata.obs[LABEL_KEY] if domains.scores is not None else None)
    tissue = tissue_image(adata)
    if tissue is not None:
        image, pixels, diameter = tissue
        written.figure("domains_on_image.png", plot_domains_on_image, image, pixels, domains.refined,
                       spot_diameter_px=diameter, title="spavae domains (refined)")
    written.figure("training.png", plot_training_curves, model.history)
    written.model("model.pt", model)
    written.json("metrics.json", metrics)
    written.remove_unwritten(RUN_FILES)
    print(json.dumps(metrics), flush=True)
    written.report()
    return metrics


def tissue_image(adata) -> tuple[np.ndarray, np.ndarray, float | None] | None:
    """``(image, spot pixels in it, spot diameter in its pixels)`` of the lowest-resolution Space Ranger image of
    ``adata`` (``uns['spatial']``), or ``None`` when it has none."""
    libraries = adata.uns.get("spatial")
    if not isinstance(libraries, dict) or len(libraries) != 1:
        return None
    library = next(iter(libraries.values()))
    images, factors = library.get("images") or {}, library.get("scalefactors") or {}
    key = next((k for k in ("lowres", "hires") if k in images and f"tissue_{k}_scalef" in factors), None)
    coordinates = "spatial_fullres" if "spatial_fullres" in adata.obsm else "spatial"
    if key is None or coordinates not in adata.obsm:
        return None
    scale = float(factors[f"tissue_{key}_scalef"])
    diameter = factors.get("spot_diameter_fullres")
    return (np.asarray(images[key]), np.asarray(adata.obsm[coordinates], dtype=float)[:, :2] * scale,
            None if diameter is None else float(diameter) * scale)
