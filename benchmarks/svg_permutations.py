"""Permutation p-values of spatially variable genes on one section, with the null models in a local process pool.

Usage: python benchmarks/svg_permutations.py FILE.h5 [--epochs 150] [--permutations 31] [--workers 16] [--out DIR]
       python benchmarks/svg_permutations.py FILE.h5 --summarize DIR/models.jsonl [--epochs E] [--out DIR]

For a machine without Ray (the GPU machine lent to this project has no Ray): the observed spaLDVAE and
``--permutations`` null models (locations permuted across spots, ALGORITHM 8.1) train as ``--workers`` processes of
one torch thread each, through :func:`spavae.analysis.svg.null_model_scores`, the function that
:func:`~spavae.analysis.svg.permutation_null` runs as Ray tasks. Every finished model's per-gene summaries are
appended to ``DIR/models.jsonl`` as it finishes, so a run cut short keeps what it trained (``--summarize`` reports
it). At the end one JSON line per statistic (``spatial_score``, ``spatial_variance``) gives the number of BH q-values
below 0.05 (per-gene p-values, raw and centred) and the top genes with the known DLPFC layer markers among them
(benchmarks/svg.py); ``DIR/genes.csv`` has every gene's statistics, null means and p-values.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import spavae
from spavae.analysis.svg import (
    STATISTICS,
    bh_qvalues,
    center_scores,
    null_input,
    null_model_scores,
    permutation_pvalues,
)
from spavae.api import VARIANTS
from spavae.data import filter_empty

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package: benchmarks/svg.py by path
from svg import KNOWN_MARKERS


def train_one(spots, setup, init_params, train, order, seed) -> dict:
    """One model in a worker process: its seconds and every statistic per gene."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    scores = null_model_scores(spots, setup, init_params, train, order, seed)
    return {"seconds": round(time.perf_counter() - start, 1), **{k: v.tolist() for k, v in scores.items()}}


def train_models(adata, model, epochs: int, permutations: int, workers: int, log_path: Path) -> dict[int, dict]:
    """The observed model (0) and ``permutations`` null models in a process pool, each appended to ``log_path``."""
    train = VARIANTS["spaLDVAE"]["train"] | {"max_epochs": epochs, "progress": False}
    rng = np.random.default_rng(0)
    orders = [np.arange(adata.n_obs)] + [rng.permutation(adata.n_obs) for _ in range(permutations)]
    common = (null_input(adata, model.setup), model.setup, model.init_params, train)
    results: dict[int, dict] = {}
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool, open(log_path, "w") as log:
        futures = {pool.submit(train_one, *common, order, r): r for r, order in enumerate(orders)}
        for future in as_completed(futures):
            r = futures[future]
            results[r] = future.result()
            log.write(json.dumps({"model": r, "observed": r == 0, **results[r]}) + "\n")
            log.flush()
    return results


def read_models(path: Path) -> dict[int, dict]:
    """The models a run (perhaps cut short) appended to ``models.jsonl``."""
    with open(path) as lines:
        return {row["model"]: row for row in map(json.loads, lines)}


def report(results: dict[int, dict], genes: np.ndarray, out: Path, top_n: int, run: dict) -> None:
    """One JSON line per statistic and ``out/genes.csv``: every gene's statistics, null means and p-values."""
    nulls = sorted(r for r in results if r != 0)
    table = pd.DataFrame(index=pd.Index(genes, name="gene"))
    table["known_marker"] = [KNOWN_MARKERS.get(g, "") for g in genes]
    for statistic in STATISTICS:
        observed = np.asarray(results[0][statistic])
        null = np.array([results[r][statistic] for r in nulls])
        p_raw = permutation_pvalues(observed, null)
        p_centred = permutation_pvalues(*center_scores(observed, null))
        table[statistic], table[f"{statistic}_null_mean"] = observed, null.mean(0)
        table[f"{statistic}_pvalue_raw"], table[f"{statistic}_pvalue_centred"] = p_raw, p_centred
        top = np.argsort(-observed)[:top_n]
        print(json.dumps({
            "part": "svg_permutations", **run, "statistic": statistic, "permutations": len(nulls),
            "model_seconds_mean": round(np.mean([v["seconds"] for v in results.values()]), 1),
            "n_genes": len(genes), "min_possible_pvalue": round(1 / (1 + len(nulls)), 4),
            "n_q_below_0.05_raw": int((bh_qvalues(p_raw) < 0.05).sum()),
            "n_q_below_0.05_centred": int((bh_qvalues(p_centred) < 0.05).sum()),
            "known_markers_in_top": int(sum(genes[g] in KNOWN_MARKERS for g in top)),
            "known_markers_in_model_genes": int(sum(g in KNOWN_MARKERS for g in genes)),
            "top": [{"gene": KNOWN_MARKERS.get(genes[g], genes[g]), "known_marker": genes[g] in KNOWN_MARKERS,
                     "value": float(f"{observed[g]:.4g}"), "pvalue_raw": round(float(p_raw[g]), 4),
                     "pvalue_centred": round(float(p_centred[g]), 4)} for g in top]}), flush=True)
    table.to_csv(out / "genes.csv", float_format="%.6g")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--permutations", type=int, default=31)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--out", default="svg_permutations")
    parser.add_argument("--summarize", metavar="MODELS_JSONL",
                        help="train nothing: report the models of an earlier (perhaps cut short) run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adata = filter_empty(spavae.read_spavae_h5(args.file))
    model = spavae.SpaVAE.from_variant("spaLDVAE", adata, seed=0, device="cpu")  # its setup: genes, frame
    run = {"file": args.file, "epochs": args.epochs}
    if args.summarize:
        results = read_models(Path(args.summarize))
    else:
        start = time.perf_counter()
        results = train_models(adata, model, args.epochs, args.permutations, args.workers, out / "models.jsonl")
        run |= {"workers": args.workers, "threads_per_worker": 1, "wall_seconds": round(time.perf_counter() - start, 1)}
    report(results, np.asarray(model.var_names), out, args.top, run)


if __name__ == "__main__":
    main()
