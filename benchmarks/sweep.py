"""Sweeps on Ray against the same runs in series, seed-ensemble consensus, and SVG permutation p-values.

Usage: python benchmarks/sweep.py [--files A.h5 B.h5] [--seeds 3] [--epochs 400] [--num-cpus 2]
                                  [--threads-per-task 1] [--svg-epochs 300] [--permutations 19] [--out DIR]

(a) seeds x sections of the DLPFC example config (examples/Human_DLPFC/sample_151507/config.json, test set and
    lattice included) as one sweep through a local Ray with --num-cpus CPUs, then the same runs in series in this
    process with --threads-per-task threads: wall time of each, the table written, and per section the consensus
    ARI of the seeds' domains against their mean ARI and their mean pairwise ARI.
(b) spatially variable genes of the first file with a spaLDVAE and --permutations null models on Ray (per-gene
    p-values on centred scores and BH q-values): number of permutations, wall time, the top 20 genes with p- and q-values and which
    are known DLPFC layer markers (benchmarks/svg.py KNOWN_MARKERS).
Prints one JSON object per line. The full budgets take hours on 2 cores; check it first with a smoke run:
    python benchmarks/sweep.py --seeds 2 --epochs 1 --svg-epochs 1 --permutations 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import spavae
from spavae.analysis.svg import (
    bh_qvalues,
    center_scores,
    permutation_null,
    permutation_pvalues,
    spatial_scores,
)
from spavae.api import VARIANTS
from spavae.data import filter_empty
from spavae.sweep import run_sweep

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package: benchmarks/svg.py by path
from svg import KNOWN_MARKERS

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "dlpfc"
CONFIG = ROOT / "examples" / "Human_DLPFC" / "sample_151507" / "config.json"


def sweeps(args: argparse.Namespace, out: Path) -> None:
    overrides = [f"trainer.max_epochs={args.epochs}", "evaluation.umap=false"]
    seeds = list(range(args.seeds))
    timings = {}
    for mode in ("ray", "serial"):
        start = time.perf_counter()
        table = run_sweep(CONFIG, None, seeds, args.files, out_dir=out / mode, overrides=overrides,
                          use_ray=mode == "ray", num_cpus=args.num_cpus if mode == "ray" else None,
                          threads_per_task=args.threads_per_task)
        timings[mode] = round(time.perf_counter() - start, 1)
        runs = table[table["kind"] == "run"]
        print(json.dumps({"part": "sweep", "mode": mode, "wall_seconds": timings[mode], "runs": len(runs),
                          "failed": int((runs["status"] == "failed").sum()),
                          "cpus": args.num_cpus if mode == "ray" else args.threads_per_task,
                          "threads_per_task": args.threads_per_task, "epochs": args.epochs,
                          "table": str(out / mode / "results.csv"),
                          "run_seconds": dict(zip(runs["name"], runs["seconds"]))}), flush=True)
        for _, row in table[table["kind"] == "consensus"].iterrows():
            print(json.dumps({"part": "consensus", "mode": mode, "section": Path(row["data"]).stem,
                              "seeds": int(row["n_runs"]), "consensus_ari": row.get("all_ari"),
                              "mean_ari": row.get("mean_ari"), "sd_ari": row.get("sd_ari"),
                              "seed_agreement_ari": row["seed_agreement_ari"]}), flush=True)
    print(json.dumps({"part": "sweep_speedup", "serial_over_ray": round(timings["serial"] / timings["ray"], 2)}),
          flush=True)


def svg(args: argparse.Namespace) -> None:
    adata = filter_empty(spavae.read_spavae_h5(args.files[0]))
    train = VARIANTS["spaLDVAE"]["train"] | {"max_epochs": args.svg_epochs, "progress": False}
    start = time.perf_counter()
    model = spavae.SpaVAE.from_variant("spaLDVAE", adata, seed=0)
    model.train(**train)
    trained = time.perf_counter() - start
    observed = spatial_scores(model)["spatial_score"]
    null = permutation_null(adata, model, args.permutations, use_ray=True,
                            num_cpus=args.num_cpus, threads_per_task=args.threads_per_task)["spatial_score"]
    table = observed.to_frame()
    table["pvalue"] = permutation_pvalues(*center_scores(observed.to_numpy(), null))
    table["qvalue"] = bh_qvalues(table["pvalue"].to_numpy())
    head = table.sort_values("spatial_score", ascending=False).head(args.top)
    print(json.dumps({"part": "svg", "file": args.files[0], "epochs": args.svg_epochs,
                      "permutations": args.permutations, "model_seconds": round(trained, 1),
                      "null_seconds": round(time.perf_counter() - start - trained, 1),
                      "min_possible_pvalue": round(1 / (1 + args.permutations), 4),
                      "n_q_below_0.05": int((table["qvalue"] < 0.05).sum()),
                      "top": [{"gene": KNOWN_MARKERS.get(g, g), "known_marker": g in KNOWN_MARKERS,
                               "score": round(float(r["spatial_score"]), 4), "pvalue": round(float(r["pvalue"]), 4),
                               "qvalue": round(float(r["qvalue"]), 4)} for g, r in head.iterrows()],
                      "known_markers_in_top": int(sum(g in KNOWN_MARKERS for g in head.index))}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="+", default=[str(SHARED / f"sample_{s}.h5") for s in ("151507", "151510")])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per section")
    parser.add_argument("--epochs", type=int, default=400, help="max epochs of each sweep run")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--threads-per-task", type=int, default=1, help="torch threads per run (and in series)")
    parser.add_argument("--svg-epochs", type=int, default=300)
    parser.add_argument("--permutations", type=int, default=19)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--skip", choices=["sweep", "svg"], action="append", default=[], help="leave out a part")
    parser.add_argument("--out", help="sweep folders (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads_per_task)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        if "sweep" not in args.skip:
            sweeps(args, out)
        if "svg" not in args.skip:
            svg(args)


if __name__ == "__main__":
    main()
