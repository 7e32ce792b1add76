"""Reuse the Pyro model/guide of a trained spaVAE: draw posterior-predictive counts with pyro.infer.Predictive.

Usage: python examples/pyro_predictive.py [--epochs 100]
"""

import argparse

import numpy as np
import torch
from pyro.infer import Predictive

import spavae

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--epochs", type=int, default=100)
args = parser.parse_args()

adata = spavae.simulate_spatial_counts(n_rows=20, n_cols=20, n_genes=100, seed=0)
model = spavae.SpaVAE(adata, seed=0).train(max_epochs=args.epochs, progress=False)
module = model.module
module.eval()
batch = model.data.batch(np.arange(len(model.data)))  # every spot as one batch (use chunks for large sections)
predictive = Predictive(module.model, guide=module.guide, num_samples=20, return_sites=["counts", "z_gp"])
with torch.no_grad():  # counts=None: the model samples them
    draws = predictive(batch.expression, batch.locations, None, batch.size_factors)
observed = batch.counts.mean(0)
predicted = draws["counts"].mean((0, 1))
corr = torch.corrcoef(torch.stack([observed, predicted]))[0, 1]
print(f"posterior-predictive draws {tuple(draws['counts'].shape)}; gene means correlate with data at r = {corr:.3f}")
