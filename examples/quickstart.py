"""Quick start: simulate a section, train spaVAE, find the domains, write results into the AnnData.

Usage: python examples/quickstart.py [--epochs 400] [--out quickstart_out]
"""

import argparse
from pathlib import Path

import pandas as pd

import spavae
from spavae.analysis import cluster_kmeans, refine_labels, score_clustering
from spavae.plot import plot_spatial_domains

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--epochs", type=int, default=400)
parser.add_argument("--out", default="quickstart_out")
args = parser.parse_args()

adata = spavae.simulate_spatial_counts(seed=0)  # 1024 Visium-like spots, 200 genes, 5 layered domains
model = spavae.SpaVAE(adata, n_gp=2, n_gauss=8, kernel="cauchy", seed=0)
model.train(max_epochs=args.epochs)
model.write_results(adata)  # obsm['X_spavae'], layers['spavae_denoised'], uns['spavae']

domains = cluster_kmeans(adata.obsm["X_spavae"], n_clusters=5)
adata.obs["spavae_domain"] = pd.Categorical(refine_labels(domains, adata.obsm["spatial"]).astype(str))
print(score_clustering(adata.obs["ground_truth"], adata.obs["spavae_domain"]))

out = Path(args.out)
out.mkdir(exist_ok=True)
plot_spatial_domains(adata.obsm["spatial"], adata.obs["spavae_domain"], out / "domains.png",
                     truth=adata.obs["ground_truth"])
adata.write_h5ad(out / "quickstart.h5ad")
model.save(out / "model.pt", overwrite=True)
print(f"wrote {out}/domains.png, quickstart.h5ad and model.pt")
