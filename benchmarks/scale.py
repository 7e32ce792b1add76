"""Atlas-scale benchmark: simulated Visium HD-like sections of 10^4 to 10^6 spots (issue 9).

Each size runs in a fresh subprocess (so that its peak resident memory is its own) and prints one JSON line:
``n_spots``, ``n_genes``, ``nnz``, ``steps``, ``train_seconds``, ``seconds_per_step``, ``setup_seconds`` (data
setup: gene selection, statistics, inducing points), ``latent_seconds``, ``peak_rss_mb`` (of the whole process,
simulated data included), ``data_mb`` (the simulated AnnData itself), ``ari`` of KMeans on the latent against the
planted domains, ``n_inducing``, ``stop_reason``, ``threads``, ``device``. ``--gp-cost`` times the GP part of a
step for several batch sizes ``b`` and inducing counts ``p`` and fits ``t = c0 + c1 b p^2 + c2 p^3``.

Run, e.g.::

    python benchmarks/scale.py --sizes 10000x2000 100000x2000 1000000x2000 100000x18000 --threads 2 \\
        --out benchmarks/results/scale.jsonl
    python benchmarks/scale.py --gp-cost --threads 2 --out benchmarks/results/gp_cost.jsonl
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def run_size(n_spots: int, n_genes: int, threads: int, seed: int, max_steps: str, device: str) -> dict:
    """Simulate, fit the setup, train, embed and score one section size (in this process)."""
    import torch
    from sklearn.cluster import MiniBatchKMeans

    import spavae
    from spavae.analysis import score_clustering
    from spavae.data.simulate import simulate_large_section

    torch.set_num_threads(threads)
    start = time.perf_counter()
    adata = simulate_large_section(n_spots, n_genes, seed=seed)
    simulate_seconds = time.perf_counter() - start
    x = adata.X
    data_mb = (x.data.nbytes + x.indices.nbytes + x.indptr.nbytes) / 2**20
    start = time.perf_counter()
    model = spavae.SpaVAE(adata, device=device, seed=seed)
    setup_seconds = time.perf_counter() - start
    start = time.perf_counter()
    budget = {"auto": "auto", "none": None}.get(max_steps) if max_steps in ("auto", "none") else int(max_steps)
    model.train(progress=False, max_steps=budget)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    latent = model.get_latent_representation()
    latent_seconds = time.perf_counter() - start
    truth = adata.obs["ground_truth"].astype(str).to_numpy()
    n_domains = len(set(truth))
    labels = MiniBatchKMeans(n_domains, n_init=10, random_state=seed, batch_size=4096).fit_predict(latent)
    steps = int(model.history["step"].iloc[-1])
    return {
        "n_spots": n_spots, "n_genes": n_genes, "n_model_genes": len(model.var_names), "nnz": int(x.nnz),
        "steps": steps, "epochs": int(len(model.history)), "train_seconds": round(train_seconds, 1),
        "seconds_per_step": round(train_seconds / max(steps, 1), 4), "setup_seconds": round(setup_seconds, 1),
        "latent_seconds": round(latent_seconds, 1), "simulate_seconds": round(simulate_seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "data_mb": round(data_mb, 1), "model_counts_mb": round(model.data.nbytes / 2**20, 1),
        "ari": round(score_clustering(truth, labels)["ari"], 4), "n_inducing": int(len(model.setup.inducing_points)),
        "stop_reason": model.trainer.state.stop_reason or "max_epochs", "threads": threads,
        "device": str(model.device), "torch": torch.__version__, "spavae": spavae.__version__,
    }


def gp_cost(threads: int, repeats: int = 5) -> list[dict]:
    """Time the GP terms of one step (forward and backward) for a grid of ``b`` and ``p``; fit the cost model."""
    import numpy as np
    import torch

    from spavae.gp import SpatialGP
    from spavae.gp.kernels import CauchyKernel

    torch.set_num_threads(threads)
    rows = []
    rng = np.random.default_rng(0)
    for p in (49, 100, 200, 400):
        for b in (256, 512, 1024, 2048):
            gp = SpatialGP(torch.as_tensor(rng.uniform(0, 20, (p, 2))), 2, CauchyKernel()).double()
            x = torch.as_tensor(rng.uniform(0, 20, (b, 2)))
            omega = torch.randn(b, 2, dtype=torch.float64, requires_grad=True)
            phi2 = torch.rand(b, 2, dtype=torch.float64) + 0.1
            times = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                terms = gp.batch_terms(x, omega, phi2, 100_000)
                (terms.kl_gp + terms.mean.sum()).backward()
                times.append(time.perf_counter() - start)
            rows.append({"kind": "gp_cost", "b": b, "p": p, "seconds": round(float(np.median(times[1:])), 6),
                         "threads": threads})
    design = np.array([[1.0, r["b"] * r["p"] ** 2, r["p"] ** 3] for r in rows])
    seconds = np.array([r["seconds"] for r in rows])
    coef, *_ = np.linalg.lstsq(design, seconds, rcond=None)
    fitted = design @ coef
    r2 = 1 - ((seconds - fitted) ** 2).sum() / ((seconds - seconds.mean()) ** 2).sum()
    for row, value in zip(rows, fitted):
        row["predicted_seconds"] = round(float(value), 6)
    rows.append({"kind": "gp_cost_fit", "model": "c0 + c1*b*p^2 + c2*p^3", "c0": float(coef[0]),
                 "c1": float(coef[1]), "c2": float(coef[2]), "r2": round(float(r2), 4), "threads": threads})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["10000x2000", "100000x2000"],
                        help="sections to simulate, as SPOTSxGENES")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", default="auto", help="step budget: 'auto', 'none' or a number")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--gp-cost", action="store_true", help="time the GP part of a step and fit its cost model")
    parser.add_argument("--out", help="append the JSON lines to this file too")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one size in this process
    args = parser.parse_args()
    if args.one:
        n_spots, n_genes = (int(v) for v in args.one.split("x"))
        print(json.dumps(run_size(n_spots, n_genes, args.threads, args.seed, args.max_steps, args.device)), flush=True)
        return
    lines = gp_cost(args.threads) if args.gp_cost else []
    for size in ([] if args.gp_cost else args.sizes):
        command = [sys.executable, __file__, "--one", size, "--threads", str(args.threads), "--seed", str(args.seed),
                   "--max-steps", args.max_steps, "--device", args.device]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            lines.append({"size": size, "error": done.stderr.strip().splitlines()[-1:]})
        else:
            lines.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(lines[-1]), flush=True)
    if args.gp_cost:
        for line in lines:
            print(json.dumps(line), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as handle:
            for line in lines:
                handle.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
