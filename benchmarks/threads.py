"""Training time of the README's main job with and without one busy process beside it, per thread setting.

Usage: python benchmarks/threads.py [--epochs 40] [--repeats 1]

Each setting runs ``spavae run --epochs E --out TMP --overwrite`` (the embedded simulated section) in a fresh
process and reads ``train_seconds`` from its ``metrics.json``:

* ``default``: spavae's own choice (``OMP_WAIT_POLICY=PASSIVE`` set at import, torch's thread count);
* ``active``: ``OMP_WAIT_POLICY=ACTIVE``, OpenMP's default and what spavae used before ``spavae.runtime``;
* ``threads1``: ``--threads 1``.

``quiet`` runs have nothing else running; ``busy`` runs have one single-threaded busy-loop process beside them.
Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = {"default": ({}, []), "active": ({"OMP_WAIT_POLICY": "ACTIVE"}, []), "threads1": ({}, ["--threads", "1"])}


def train_seconds(setting: str, epochs: int) -> float:
    extra_env, extra_args = SETTINGS[setting]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | extra_env
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-m", "spavae.cli", "run", "--epochs", str(epochs), "--out", folder,
                        "--overwrite", *extra_args], env=env, check=True, capture_output=True)
        return json.loads((Path(folder) / "metrics.json").read_text())["train_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    for load in ("quiet", "busy"):
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
        try:
            for _ in range(args.repeats):
                for setting in SETTINGS:
                    print(json.dumps({"load": load, "setting": setting, "epochs": args.epochs,
                                      "train_seconds": train_seconds(setting, args.epochs), "cpus": os.cpu_count()}),
                          flush=True)
        finally:
            if busy is not None:
                busy.kill()


if __name__ == "__main__":
    main()
