"""Experiment of issue 20: the encoder reading principal components instead of the genes.

Usage: python benchmarks/encoder_input.py N_AXES [--seeds 3] [--init KEY=VALUE ...] CASE [CASE ...]

``N_AXES`` > 0: the encoder input (z-scored log expression of the model's genes) is projected onto its first
``N_AXES`` principal axes, fitted on all spots of the section; ``-1``: as many axes as have an eigenvalue above
the Marchenko-Pastur edge ``(1 + sqrt(G/N))**2`` of a pure-noise N x G z-scored matrix. The projection is a
fixed buffer in front of spavae's Gaussian encoder; everything else (data setup, GP, likelihood, training,
KMeans with the reference k on the latent) is the panel's protocol (``panel.py``). Cases are ``panel.py``'s.
One JSON line per case and seed. The projection here is a module in front of the encoder, built after the model
(so the weights are drawn differently from the package's); the model itself is built with ``input_axes=None``, the
genes. The package's rule that came out of this experiment is ``SpaVAE(input_axes='auto')``
(:mod:`spavae.data.input_axes`), measured with ``panel.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import spavae
from spavae.analysis import cluster_kmeans, score_clustering
from spavae.nn import GaussianEncoder

sys.path.insert(0, str(Path(__file__).parent))
from dlpfc import key_values  # noqa: E402
from panel import SHARED, case_names, load_case  # noqa: E402


class ProjectedEncoder(nn.Module):
    """``encoder((x - centre) @ axes)``: a fixed projection in front of a Gaussian encoder."""

    def __init__(self, axes: np.ndarray, centre: np.ndarray, encoder: nn.Module):
        super().__init__()
        self.register_buffer("axes", torch.as_tensor(axes, dtype=torch.float32))
        self.register_buffer("centre", torch.as_tensor(centre, dtype=torch.float32))
        self.encoder = encoder

    def forward(self, x: torch.Tensor):
        return self.encoder((x - self.centre) @ self.axes)


def principal_axes(x: np.ndarray, n_axes: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre and the first ``n_axes`` principal axes of ``x`` (``-1``: those above the Marchenko-Pastur edge)."""
    centre = x.mean(0)
    _, singular, vt = np.linalg.svd(x - centre, full_matrices=False)
    if n_axes < 0:
        n, g = x.shape
        n_axes = max(int((singular**2 / (n - 1) > (1 + np.sqrt(g / n)) ** 2).sum()), 2)
    return vt[:n_axes].T, centre


def main(n_axes: int, seeds: int, cases: list[str], options: dict) -> None:
    names = case_names(SHARED / "panel", SHARED / "dlpfc")
    torch.set_num_threads(1)
    for name in cases:
        kind, argument = names[name]
        for seed in range(seeds):
            adata, _ = load_case(kind, argument, seed)
            truth = adata.obs["ground_truth"].astype(str)
            k = int(truth[truth != "NA"].nunique())
            start = time.perf_counter()
            model = spavae.SpaVAE(adata, seed=seed, **({"input_axes": None} | options))
            x = torch.cat([b.expression for b in model.data.chunks(1024)]).numpy().astype(np.float64)
            axes, centre = principal_axes(x, n_axes)
            torch.manual_seed(seed)
            model.module.encoder = ProjectedEncoder(axes, centre, GaussianEncoder(axes.shape[1], model.module.n_latent))
            model.train(progress=False)
            ari = score_clustering(truth, cluster_kmeans(model.get_latent_representation(), k, seed=seed))["ari"]
            print(json.dumps({"case": name, "seed": seed, "n_axes": n_axes, "axes_used": axes.shape[1],
                              "model_options": options, "ari": round(ari, 4), "epochs": len(model.history),
                              "seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n_axes", type=int, help="principal axes the encoder reads (-1: those above the noise edge)")
    parser.add_argument("cases", nargs="+", help="panel.py case names")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    parser.add_argument("--init", action="append", default=[], metavar="KEY=VALUE",
                        help="SpaVAE model option, VALUE read as JSON (repeatable)")
    args = parser.parse_args()
    main(args.n_axes, args.seeds, args.cases, key_values(args.init))
