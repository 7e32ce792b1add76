"""Data-parallel training benchmark: N ranks against one process on a simulated section (issue 13).

Runs the same training steps (same global batch, same seeded section) twice, each in fresh processes: one process,
then ``--devices`` ranks started with ``torchrun`` (``gloo`` on CPU; on CUDA ``nccl``, one GPU per rank). Each
process prints one JSON line: ``mode`` (``single``/``ddp``), ``rank``, ``world_size``, ``backend``, ``device``,
``threads``, ``n_spots``, ``n_genes`` (model genes), ``batch_size`` (global) and ``local_batch``, ``steps``,
``seconds_per_step`` (mean over the steps after the first, between optimiser steps), ``peak_rss_mb`` (of the
whole process, simulated data included) and, on CUDA, ``cuda_max_allocated_mb``. A last line compares the two:
``speedup`` = single-process seconds per step / data-parallel seconds per step.

Run, e.g.::

    python benchmarks/ddp.py --spots 100000 --genes 2000 --steps 20 --devices 2 --threads 1
    python benchmarks/ddp.py --spots 3000 --genes 200 --steps 5 --devices 2 --threads 1   # smoke test
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_worker(args: argparse.Namespace) -> dict:
    """Simulate the section, build the model and time ``args.steps`` training steps in this process (one rank)."""
    import torch

    import spavae
    from spavae.data import filter_empty
    from spavae.data.setup import DataSetup
    from spavae.data.simulate import simulate_large_section
    from spavae.distributed import session
    from spavae.train import Trainer

    torch.set_num_threads(args.threads)
    with session(args.device) as communicator:
        adata = filter_empty(simulate_large_section(args.spots, args.genes, seed=args.seed))
        setup = communicator.on_main(DataSetup.fit, adata, seed=args.seed) if communicator.world_size > 1 else None
        model = spavae.SpaVAE(adata, setup=setup, device=args.device, seed=args.seed)
        trainer = Trainer(model.module, model.data, batch_size=args.batch_size, train_size=1.0,
                          max_steps=args.steps, generator=torch.Generator().manual_seed(args.seed))
        stamps: list[float] = []
        trainer.optimizer.register_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
        trainer.fit(1, progress=False)
        device = model.data.device
        record = {
            "mode": "ddp" if communicator.world_size > 1 else "single", "rank": communicator.rank,
            "world_size": communicator.world_size,
            "backend": torch.distributed.get_backend() if communicator.world_size > 1 else None,
            "device": str(device), "threads": args.threads, "n_spots": args.spots, "n_genes": len(model.var_names),
            "batch_size": args.batch_size, "local_batch": len(trainer.communicator.shard(torch.arange(args.batch_size))),
            "steps": len(stamps),
            "seconds_per_step": round((stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1), 4),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
        if device.type == "cuda":
            record["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return record


def launch(args: argparse.Namespace, n_processes: int) -> list[dict]:
    """Run the worker in one process or in ``n_processes`` torchrun ranks; their JSON lines."""
    worker = [__file__, "--worker", "--spots", str(args.spots), "--genes", str(args.genes), "--steps",
              str(args.steps), "--threads", str(args.threads), "--batch-size", str(args.batch_size), "--seed",
              str(args.seed), "--device", args.device]
    prefix = [sys.executable] if n_processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n_processes}"]
    result = subprocess.run(prefix + worker, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"the {n_processes}-process run failed:\n{result.stderr[-3000:]}")
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spots", type=int, default=100_000, help="simulated spots")
    parser.add_argument("--genes", type=int, default=2000, help="simulated genes")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--batch-size", type=int, default=512, help="global mini-batch size")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    parser.add_argument("--devices", type=int, default=2, help="data-parallel ranks")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda' (each rank: its LOCAL_RANK GPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)), flush=True)
        return
    single = launch(args, 1)
    ranks = launch(args, args.devices)
    for record in single + sorted(ranks, key=lambda r: r["rank"]):
        print(json.dumps(record), flush=True)
    ddp_step = max(r["seconds_per_step"] for r in ranks)
    print(json.dumps({"summary": True, "devices": args.devices, "single_seconds_per_step": single[0]["seconds_per_step"],
                      "ddp_seconds_per_step": ddp_step,
                      "speedup": round(single[0]["seconds_per_step"] / ddp_step, 2)}), flush=True)


if __name__ == "__main__":
    main()
