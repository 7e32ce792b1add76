"""Train and evaluate one DLPFC example config with several seeds, then write mean and SD of its metrics.

Usage (from the repository root):
    python examples/Human_DLPFC/run_seeds.py examples/Human_DLPFC/sample_151507/config.json --seeds 3 \
        [--data PATH] [--threads 2] [--out benchmarks/results/dlpfc_151507.json]

Each seed is the run ``experiments/<name>_seed<S>/`` (an existing one is replaced). The summary holds every
numeric metric of ``results/metrics.json`` as mean and sample SD over the seeds, and the per-seed values.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from spavae import experiment
from spavae.config import load_config
from spavae.utils import atomic_path


def flatten(metrics: dict, prefix: str = "") -> dict:
    """``{'test': {'ari': 0.5}}`` to ``{'test_ari': 0.5}``, numbers only."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}_")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + key] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="example config, e.g. examples/Human_DLPFC/sample_151507/config.json")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    parser.add_argument("--data", help="input file (overrides data.path)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", help="summary JSON (default: benchmarks/results/dlpfc_<name>.json)")
    args = parser.parse_args()
    rows = []
    for seed in range(args.seeds):
        name = load_config(args.config).name
        overrides = [f"name={name}_seed{seed}", f"trainer.seed={seed}", f"trainer.threads={args.threads}",
                     "trainer.progress=false"] + ([f"data.path={json.dumps(args.data)}"] if args.data else [])
        run = experiment.train(load_config(args.config, overrides), overwrite=True)
        rows.append(flatten(json.loads((run.results / "metrics.json").read_text())) | {"seed": seed})
        print(json.dumps(rows[-1]), flush=True)
    frame = pd.DataFrame(rows).drop(columns="seed")
    summary = {"config": args.config, "seeds": args.seeds, "threads": args.threads,
               "mean": {k: round(float(v), 4) for k, v in frame.mean().items()},
               "sd": {k: round(float(v), 4) for k, v in frame.std(ddof=1).fillna(0.0).items()},
               "per_seed": rows}
    out = Path(args.out or f"benchmarks/results/dlpfc_{name}.json")
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: f"{summary['mean'][k]:.4f} +- {summary['sd'][k]:.4f}" for k in summary["mean"]}), flush=True)
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
