"""Downstream analyses on one DLPFC section: denoising (Moran's I), DE per layer, enhancement, figures.

Usage: python benchmarks/analyses.py FILE.h5 --out DIR [--seed S] [--threads T] [--max-epochs E] [--gene ENSG...]

Trains ``spavae.SpaVAE`` with the package defaults on all spots, then

* Moran's I (kNN k = 5 on the hexagonal lattice, preprocessed expression) of every gene for the raw counts and
  the denoised counts (observed library size); the change for known layer markers and the median change;
* DE of each layer against the rest (ALGORITHM 7.3, 10000 draws); the top up-regulated genes of WM and Layer1,
  and the Spearman correlation of each layer's LFC with a pseudo-bulk log2 fold change of the raw counts
  (counts summed over the layer and over the rest, each scaled to counts per million, ``log2(cpm + 1)``);
* enhancement to ``5N`` sub-spots;
* figures in ``--out``: a marker gene raw / denoised / enhanced, domains, the latent UMAP, volcano plots.

The files store Ensembl IDs. The marker symbols below are mapped to their Ensembl IDs by hand (GRCh38); a marker
absent from the file is reported as absent. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

import spavae
from spavae.analysis import (
    denoise,
    enhance,
    find_domains,
    rank_genes_domains,
    spatial_autocorr,
    umap,
    visium_array_to_xy,
)
from spavae.data import filter_empty
from spavae.plot import plot_embedding, plot_gene_spatial, plot_spatial_domains, plot_volcano

#: Known cortical layer markers (Maynard et al. 2021) and their Ensembl IDs.
MARKERS = {
    "MOBP": "ENSG00000168314", "MBP": "ENSG00000197971", "PLP1": "ENSG00000123560",  # white matter
    "PCP4": "ENSG00000183036",  # layer 5
    "SNAP25": "ENSG00000132639", "NRGN": "ENSG00000154146", "ENC1": "ENSG00000171617",  # neuronal layers
    "HPCAL1": "ENSG00000115756", "CARTPT": "ENSG00000164326",  # layers 2-3
    "AQP4": "ENSG00000171885", "GFAP": "ENSG00000131095", "RELN": "ENSG00000189056",  # layer 1
}
SYMBOLS = {v: k for k, v in MARKERS.items()}


def pseudo_bulk_lfc(counts: np.ndarray, mask: np.ndarray, rest: np.ndarray) -> np.ndarray:
    """log2(cpm + 1) of the counts summed over ``mask`` minus the same over ``rest``."""
    def log_cpm(rows: np.ndarray) -> np.ndarray:
        total = counts[rows].sum(0)
        return np.log2(total / total.sum() * 1e6 + 1.0)
    return log_cpm(mask) - log_cpm(rest)


def top_genes(results: pd.DataFrame, group: str, n: int = 10) -> list[dict]:
    """The ``n`` up-regulated genes of ``group`` with the largest Bayes factor (ties by LFC)."""
    table = results[(results["group"] == group) & (results["LFC"] > 0)]
    table = table.sort_values(["bayes_factor", "LFC"], ascending=False).head(n)
    return [{"gene": g, "symbol": SYMBOLS.get(g), "LFC": round(float(lfc), 3), "prob_DE": round(float(p), 4)}
            for g, lfc, p in zip(table["gene"], table["LFC"], table["prob_DE"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="spaVAE-layout .h5 file with layer labels in Y")
    parser.add_argument("--out", required=True, type=Path, help="folder for the figures and the tables")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--max-epochs", type=int, help="override the default maximum number of epochs")
    parser.add_argument("--gene", help="gene (Ensembl ID) for the spot/sub-spot figure; default MOBP if present")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"file": args.file, "seed": args.seed, "threads": args.threads}

    adata = filter_empty(spavae.read_spavae_h5(args.file))
    start = time.perf_counter()
    model = spavae.SpaVAE(adata, seed=args.seed)
    model.train(progress=False, **({"max_epochs": args.max_epochs} if args.max_epochs else {}))
    result |= {"n_spots": adata.n_obs, "n_genes": adata.n_vars, "epochs": len(model.history),
               "train_seconds": round(time.perf_counter() - start, 1)}
    model.write_results(adata, denoise=False)
    denoise(adata, model, seed=args.seed)

    # Moran's I, raw vs denoised
    for layer in (None, "spavae_denoised"):
        spatial_autocorr(adata, layer=layer, visium_array=True)
    raw_i, den_i = adata.var["morans_i"], adata.var["morans_i_spavae_denoised"]
    change = (den_i - raw_i).dropna()
    present = {s: e for s, e in MARKERS.items() if e in adata.var_names}
    result["morans_i"] = {
        "markers_absent": sorted(set(MARKERS) - set(present)),
        "markers": {s: {"raw": round(float(raw_i[e]), 4), "denoised": round(float(den_i[e]), 4)}
                    for s, e in present.items()},
        "median_raw": round(float(raw_i.median()), 4), "median_denoised": round(float(den_i.median()), 4),
        "median_change": round(float(change.median()), 4), "fraction_increased": round(float((change > 0).mean()), 4),
        "n_genes": int(len(change)),
    }

    # DE of each layer against the rest
    start = time.perf_counter()
    rank_genes_domains(adata, model, groupby="ground_truth", seed=args.seed)
    results = adata.uns["spavae_de"]["results"]
    truth = adata.obs["ground_truth"].astype(str).to_numpy()
    counts = np.asarray(adata.X, dtype=np.float64)
    spearman, summary = {}, adata.uns["spavae_de"]["summary"].set_index("group")
    for group in summary.index:
        mask = truth == group
        bulk = pseudo_bulk_lfc(counts, mask, ~mask & (truth != "NA"))
        lfc = results.loc[results["group"] == group].set_index("gene").loc[adata.var_names, "LFC"]
        spearman[group] = round(float(spearmanr(lfc, bulk)[0]), 4)
    result["de"] = {
        "seconds": round(time.perf_counter() - start, 1), "spearman_lfc_vs_pseudobulk": spearman,
        "spearman_mean": round(float(np.mean(list(spearman.values()))), 4),
        "delta": {g: round(float(v), 4) for g, v in summary["delta"].items()},
        "pseudocount": {g: round(float(v), 4) for g, v in summary["pseudocount"].items()},
        "top_WM": top_genes(results, "WM"), "top_Layer1": top_genes(results, "Layer1"),
    }
    results.to_csv(args.out / "de_each_layer_vs_rest.csv", index=False)
    for group in ("WM", "Layer1"):
        table = results[results["group"] == group].set_index("gene")
        table.index = [SYMBOLS.get(g, g) for g in table.index]
        plot_volcano(table, args.out / f"volcano_{group}.png", title=f"{group} vs rest")

    # enhancement
    start = time.perf_counter()
    enhanced = enhance(model, seed=args.seed)
    gene = args.gene or present.get("MOBP") or result["de"]["top_WM"][0]["gene"]
    lattice = visium_array_to_xy(adata.obsm["spatial"])
    column = adata.var_names.get_loc(gene)
    normalized = counts[:, column] / model.size_factors
    denoised_normalized = adata.layers["spavae_denoised"][:, column] / model.size_factors
    plot_gene_spatial({"raw (normalised)": (lattice, normalized), "denoised": (lattice, denoised_normalized),
                       "enhanced": (visium_array_to_xy(enhanced.obsm["spatial"]), enhanced.X[:, column])},
                      args.out / f"gene_{SYMBOLS.get(gene, gene)}_enhanced.png", gene=SYMBOLS.get(gene, gene))
    result["enhancement"] = {"n_points": enhanced.n_obs, "n_spots": adata.n_obs,
                             "delta_scaled": round(enhanced.uns["spavae"]["params"]["delta"], 4),
                             "gene": gene, "symbol": SYMBOLS.get(gene),
                             "seconds": round(time.perf_counter() - start, 1)}

    # domains, UMAP
    n_domains = len(set(truth) - {"NA"})
    find_domains(adata, n_domains, truth_key="ground_truth", refine="hexagon", visium_array=True, seed=args.seed)
    find_domains(adata, n_domains, method="leiden", truth_key="ground_truth", seed=args.seed, key_added="leiden")
    result["domains"] = {"kmeans": adata.uns["spavae_domains"]["scores"], "leiden": adata.uns["leiden"]["scores"],
                         "leiden_resolution": adata.uns["leiden"]["resolution"]}
    plot_spatial_domains(lattice, adata.obs["spavae_domains"], args.out / "domains.png", truth=truth)
    umap(adata, seed=args.seed)
    plot_embedding(adata.obsm["X_umap"], truth, args.out / "umap.png", title="spavae latent (UMAP), layers")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
