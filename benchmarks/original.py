"""spavae side by side with the original spaVAE (Tian et al. 2024) on the same file, threads and machine.

Usage::

    git clone https://github.com/ttgump/spaVAE /tmp/spaVAE-original   # a scratch copy, never vendored
    python benchmarks/original.py FILE.h5 [FILE.h5 ...] --original /tmp/spaVAE-original --threads 2 \\
        [--epochs 500] [--seeds 3] [--only original|spavae|both] [--spavae-max-epochs N]

The original is run from its own ``src/spaVAE`` with the preprocessing of its ``run_spaVAE.py`` (scanpy
``normalize``: size factors, log1p, scaling; per-axis min-max locations times 20; the 7 x 7 grid of inducing points)
and its defaults (float64, lr 1e-3, patience 200, batch 512) with ``maxiter = --epochs`` (500, the cap its tutorials
use), on the CPU. spavae runs with its own defaults, one process per seed. Both latents are clustered with KMeans
(k = number of labelled layers, n_init 100) and scored on the labelled spots. Each run prints one JSON line:
``tool``, ``epochs``, ``train_seconds``, ``seconds_per_epoch``, ``ari`` (spavae's ``train_seconds`` include
building the model and fitting its data setup; ``loop_seconds_per_epoch`` counts the epochs alone, as the
original's figure does).

For the time per epoch alone, cap both runs: ``--epochs 40 --spavae-max-epochs 40`` (the ARI of such short runs
means nothing); run the pair a few times, alternating, because this figure drifts with the machine's load.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import time


def labels_and_mask(path: str):
    """Layer labels of the spots the original keeps (nonzero total count) and that mask."""
    import h5py
    import numpy as np

    with h5py.File(path, "r") as f:
        counts = np.asarray(f["X"], dtype=np.float64)
        labels = np.asarray(f["Y"]).astype(str)
    keep = counts.sum(1) > 0
    return counts, labels, keep


def score(latent, labels, seed: int = 0) -> float:
    """ARI of KMeans (n_init 100) on the labelled spots."""
    import numpy as np
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    labelled = labels != "NA"
    k = len(np.unique(labels[labelled]))
    found = KMeans(n_clusters=k, n_init=100, random_state=seed).fit_predict(latent)
    return float(adjusted_rand_score(labels[labelled], found[labelled]))


def run_original(path: str, source: str, epochs: int, threads: int) -> dict:
    """Train the original spaVAE as its run_spaVAE.py does, on the CPU."""
    import h5py
    import numpy as np
    import scanpy as sc
    import torch
    from sklearn.preprocessing import MinMaxScaler

    torch.set_num_threads(threads)
    np.Inf = np.inf  # the original predates NumPy 2, which removed this alias
    sys.path.insert(0, f"{source}/src/spaVAE")
    from preprocess import normalize  # the original's modules
    from spaVAE import SPAVAE

    counts, labels, keep = labels_and_mask(path)
    with h5py.File(path, "r") as f:
        loc = np.asarray(f["pos"], dtype=np.float64)
    counts, labels, loc = counts[keep], labels[keep], loc[keep]
    loc = MinMaxScaler().fit_transform(loc) * 20.0
    steps = 6
    inducing = np.mgrid[0:(1 + 1e-5):(1.0 / steps), 0:(1 + 1e-5):(1.0 / steps)].reshape(2, -1).T * 20.0
    adata = normalize(sc.AnnData(counts), size_factors=True, normalize_input=True, logtrans_input=True)
    model = SPAVAE(input_dim=adata.n_vars, GP_dim=2, Normal_dim=8, encoder_layers=[128, 64], decoder_layers=[128],
                   noise=0, encoder_dropout=0, decoder_dropout=0, fixed_inducing_points=True,
                   initial_inducing_points=inducing, fixed_gp_params=False, kernel_scale=20.0,
                   N_train=adata.n_obs, KL_loss=0.025, dynamicVAE=True, init_beta=10, min_beta=4, max_beta=25,
                   dtype=torch.float64, device="cpu")
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        model.train_model(pos=loc, ncounts=adata.X, raw_counts=adata.raw.X, size_factors=adata.obs.size_factors,
                          lr=1e-3, weight_decay=1e-6, batch_size=512 if adata.n_obs > 2048 else 256,
                          num_samples=1, train_size=0.95, maxiter=epochs, patience=200, save_model=False)
    seconds = time.perf_counter() - start
    trained = log.getvalue().count("Training epoch") - log.getvalue().count("validating")
    latent = model.batching_latent_samples(X=loc, Y=adata.X, batch_size=512)
    return {"tool": "spaVAE (original)", "file": path, "seed": None, "epochs": trained,
            "train_seconds": round(seconds, 1), "seconds_per_epoch": round(seconds / trained, 3),
            "ari": round(score(latent, labels), 4), "threads": threads}


def run_spavae(path: str, seed: int, threads: int, max_epochs: int | None = None) -> dict:
    """Train spavae with its defaults (at most ``max_epochs`` epochs when given)."""
    import torch

    import spavae
    from spavae.data import filter_empty

    torch.set_num_threads(threads)
    _, labels, keep = labels_and_mask(path)
    adata = filter_empty(spavae.read_spavae_h5(path))
    start = time.perf_counter()
    model = spavae.SpaVAE(adata, seed=seed, device="cpu").train(
        progress=False, **({} if max_epochs is None else {"max_epochs": max_epochs}))
    seconds = time.perf_counter() - start
    epochs = len(model.history)
    loop = float(model.history["seconds"].sum())  # the epochs alone, without building the model and its setup
    return {"tool": f"spavae {spavae.__version__}", "file": path, "seed": seed, "epochs": epochs,
            "train_seconds": round(seconds, 1), "seconds_per_epoch": round(seconds / epochs, 3),
            "loop_seconds_per_epoch": round(loop / epochs, 3),
            "ari": round(score(model.get_latent_representation(), labels[keep], seed), 4), "threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="spaVAE-layout .h5 files with layer labels in Y")
    parser.add_argument("--original", help="checkout of https://github.com/ttgump/spaVAE (needed unless --only spavae)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=500, help="the original's maxiter")
    parser.add_argument("--seeds", type=int, default=3, help="spavae seeds")
    parser.add_argument("--spavae-max-epochs", type=int, help="cap on spavae's epochs (default: its own stopping rule)")
    parser.add_argument("--only", choices=("original", "spavae", "both"), default="both")
    parser.add_argument("--one", nargs=2, metavar=("TOOL", "SEED"), help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    if args.one:  # one run in this process
        tool, seed = args.one
        result = (run_original(args.files[0], args.original, args.epochs, args.threads) if tool == "original"
                  else run_spavae(args.files[0], int(seed), args.threads, args.spavae_max_epochs))
        print(json.dumps(result), flush=True)
        return
    if args.only != "spavae" and not args.original:
        parser.error("--original PATH (a checkout of https://github.com/ttgump/spaVAE) is needed to run the original")
    for path in args.files:
        runs = ([("original", 0)] if args.only != "spavae" else []) + \
               ([("spavae", s) for s in range(args.seeds)] if args.only != "original" else [])
        for tool, seed in runs:  # a fresh process per run: the original sets global torch state
            command = [sys.executable, __file__, path, "--one", tool, str(seed), "--threads", str(args.threads),
                       "--epochs", str(args.epochs)] + (["--original", args.original] if args.original else []) + \
                      ([] if args.spavae_max_epochs is None else ["--spavae-max-epochs", str(args.spavae_max_epochs)])
            output = subprocess.run(command, capture_output=True, text=True, check=False)
            if output.returncode != 0:
                print(json.dumps({"tool": tool, "file": path, "seed": seed, "error": output.stderr[-500:]}), flush=True)
                continue
            print(output.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
