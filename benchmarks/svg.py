"""Spatially variable genes with the linear-decoder variant (spaLDVAE).

Usage: python benchmarks/svg.py [FILE.h5] [--threads T] [--epochs E] [--top 20]

1. Simulated data with 30 planted spatial and 70 non-spatial genes: precision of the top-k spatial scores
   (k = 10, 20, 30), 3 seeds.
2. With FILE (a DLPFC section): the top spatial genes and how many are known cortical layer / white-matter
   markers (spatialLIBD markers, by Ensembl ID; the shared files name genes by Ensembl ID).
Prints one JSON object per part.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import spavae
from spavae.analysis.svg import spatially_variable_genes
from spavae.api import VARIANTS
from spavae.data import filter_empty
from spavae.data.simulate import simulate_svg_counts

# Layer and white-matter markers of human DLPFC (Maynard et al. 2021, spatialLIBD), by Ensembl ID.
KNOWN_MARKERS = {
    "ENSG00000168314": "MOBP", "ENSG00000197971": "MBP", "ENSG00000123560": "PLP1", "ENSG00000131095": "GFAP",
    "ENSG00000132639": "SNAP25", "ENSG00000183036": "PCP4", "ENSG00000154146": "NRGN", "ENSG00000187094": "CCK",
    "ENSG00000115756": "HPCAL1", "ENSG00000171617": "ENC1", "ENSG00000164326": "CARTPT", "ENSG00000128422": "KRT17",
    "ENSG00000171885": "AQP4", "ENSG00000186854": "TRABD2A", "ENSG00000100285": "NEFH", "ENSG00000196358": "NTNG2",
    "ENSG00000110484": "SCGB2A2", "ENSG00000149591": "TAGLN", "ENSG00000118271": "TTR", "ENSG00000120885": "CLU",
    "ENSG00000104435": "STMN2", "ENSG00000166147": "FBN1", "ENSG00000277586": "NEFL", "ENSG00000104722": "NEFM",
    "ENSG00000163032": "VSNL1", "ENSG00000136750": "GAD2", "ENSG00000128683": "GAD1", "ENSG00000100146": "SOX10",
    "ENSG00000105695": "MAG", "ENSG00000173786": "CNP", "ENSG00000166573": "GALR1", "ENSG00000120937": "NPPB",
}


def simulated(seeds: int, epochs: int) -> dict:
    precision = {k: [] for k in (10, 20, 30)}
    for seed in range(seeds):
        adata = simulate_svg_counts(seed=seed)
        model = spavae.SpaVAE.from_variant("spaLDVAE", adata, n_gp=5, seed=seed)
        model.train(**(VARIANTS["spaLDVAE"]["train"] | {"beta": 1.0, "max_epochs": epochs, "progress": False}))
        table = spatially_variable_genes(adata, model)
        for k in precision:
            precision[k].append(float(adata.var.loc[table.index[:k], "is_spatial"].mean()))
    return {"part": "simulated", "n_spatial": 30, "n_genes": 100, "seeds": seeds, "epochs": epochs, "beta": 1.0,
            **{f"precision_at_{k}": round(float(np.mean(v)), 3) for k, v in precision.items()},
            **{f"precision_at_{k}_sd": round(float(np.std(v, ddof=1)), 3) for k, v in precision.items()}}


def dlpfc(path: str, epochs: int, top: int) -> dict:
    adata = filter_empty(spavae.read_spavae_h5(path))
    start = time.perf_counter()
    model = spavae.SpaVAE.from_variant("spaLDVAE", adata, seed=0)
    model.train(**(VARIANTS["spaLDVAE"]["train"] | {"max_epochs": epochs, "progress": False}))
    table = spatially_variable_genes(adata, model)
    head = table.head(top)
    present = [g for g in KNOWN_MARKERS if g in adata.var_names]
    hits = [KNOWN_MARKERS[g] for g in head.index if g in KNOWN_MARKERS]
    return {"part": "dlpfc", "file": path, "epochs": epochs, "seconds": round(time.perf_counter() - start, 1),
            "top": [KNOWN_MARKERS.get(g, g) for g in head.index], "known_markers_in_top": len(hits),
            "known_markers_hit": hits, "known_markers_in_file": len(present),
            "expected_by_chance": round(top * len(present) / adata.n_vars, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", nargs="?")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=200, help="epochs on the simulated data")
    parser.add_argument("--dlpfc-epochs", type=int, default=300)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(simulated(args.seeds, args.epochs)), flush=True)
    if args.file:
        print(json.dumps(dlpfc(args.file, args.dlpfc_epochs, args.top)), flush=True)


if __name__ == "__main__":
    main()
