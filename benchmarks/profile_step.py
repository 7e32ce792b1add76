"""Where the time of one training step goes.

Usage: python benchmarks/profile_step.py [FILE.h5] [--steps 200] [--threads T] [--device cpu|cuda] [--label TEXT]

Trains the default model (on FILE, or on the default simulated section) with the real training loop
(:meth:`spavae.train.Trainer._train_epoch`) and times each phase of a step by wrapping the functions that do
it, so the path measured is the path users run:

* ``data``: building the mini-batch (sparse rows to dense, to the device, normalisation);
* ``encoder``, ``gp`` (kernel matrices, Cholesky, closed-form q(u), marginals, KL and Pearce terms),
  ``decoder``, ``nb_log_prob``: the forward parts;
* ``pyro_and_loss``: the rest of :meth:`SpaVAEModule.loss` (Pyro tracing and replay, KL bookkeeping);
* ``backward``, ``optimizer`` (AdamW step, gradient zeroing and norm check);
* ``other``: whatever is left of the step (loop, PI controller, history, Python).

Prints one JSON line: milliseconds per step of each phase and their total, plus the setting.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections import defaultdict

import torch

import spavae
from spavae.data import filter_empty
from spavae.data.spots import SpotData
from spavae.likelihoods import GeneNegativeBinomial
from spavae.model import SpaVAEModule


class PhaseTimer:
    """Accumulates wall time per phase; nested phases are subtracted from their parent."""

    def __init__(self, device: torch.device):
        self.totals: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def wrap(self, owner, name: str, phase: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            self.sync()
            self.stack.append([phase, time.perf_counter(), 0.0])
            try:
                return original(*args, **kwargs)
            finally:
                self.sync()
                _, start, inner = self.stack.pop()
                elapsed = time.perf_counter() - start
                self.totals[phase] += elapsed - inner
                if self.stack:
                    self.stack[-1][2] += elapsed

        setattr(owner, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", nargs="?", help="spaVAE-layout .h5 (default: the built-in simulated section)")
    parser.add_argument("--steps", type=int, default=200, help="timed optimisation steps (after 20 warm-up steps)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--label", default="", help="free text stored with the result (e.g. 'before')")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    adata = filter_empty(spavae.read_spavae_h5(args.file)) if args.file else spavae.data.simulate_spatial_counts()
    model = spavae.SpaVAE(adata, seed=0, device=args.device)
    device = model.device
    model.train(max_epochs=3, progress=False)  # warm-up (allocator, lazy initialisation)
    trainer = model.trainer
    timer = PhaseTimer(device)
    timer.wrap(SpotData, "batch", "data")
    timer.wrap(SpaVAEModule, "loss", "pyro_and_loss")
    timer.wrap(type(model.module.encoder), "forward", "encoder")
    timer.wrap(type(model.module.gp), "batch_terms", "gp")
    timer.wrap(type(model.module.decoder), "forward", "decoder")
    timer.wrap(GeneNegativeBinomial, "log_prob", "nb_log_prob")
    timer.wrap(torch.Tensor, "backward", "backward")
    timer.wrap(trainer.optimizer, "step", "optimizer")
    timer.wrap(trainer.optimizer, "zero_grad", "optimizer")
    timer.wrap(torch.nn.utils, "clip_grad_norm_", "optimizer")
    trainer.max_steps = None
    steps_before = trainer.state.step
    timer.sync()
    start = time.perf_counter()
    while trainer.state.step - steps_before < args.steps:
        trainer._train_epoch()
    timer.sync()
    total = time.perf_counter() - start
    steps = trainer.state.step - steps_before
    phases = {k: round(1000 * v / steps, 2) for k, v in timer.totals.items()}
    phases["other"] = round(1000 * total / steps - sum(phases.values()), 2)
    print(json.dumps({"label": args.label, "file": args.file or "simulate_spatial_counts", "n_spots": adata.n_obs,
                      "n_genes": model.setup.n_genes, "batch_size": trainer.batch_size, "steps": steps,
                      "threads": args.threads, "device": str(device),
                      "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "ms_per_step": round(1000 * total / steps, 2), "ms_by_phase": phases,
                      "spavae": spavae.__version__}), flush=True)


if __name__ == "__main__":
    main()
