"""The SOURCE of an analysis command: the trained run it names, the command's output folder, and the genes read
from it (measured counts on the decoder's scale, the gene drawn in a figure)."""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scipy import sparse

from spavae.analysis.runs import TrainedRun, open_run
from spavae.api import SpaVAE


def open_source(args: argparse.Namespace, command: str) -> tuple[TrainedRun, Path]:
    """The run of ``args.source`` and the output folder of ``command``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    run = open_run(args.source, model_path=args.model, device=args.device)
    return run, Path(args.out) if args.out else run.output_root / command


def normalised_counts(adata: ad.AnnData, model: SpaVAE, genes: list[str]) -> np.ndarray:
    """Measured counts of ``genes`` divided by the model's size factors (the normalised scale of the decoder)."""
    layer = model.init_params["layer"]
    matrix = (adata.X if layer is None else adata.layers[layer])[:, adata.var_names.get_indexer(genes)]
    matrix = matrix.toarray() if sparse.issparse(matrix) else np.asarray(matrix)
    return matrix.astype(np.float64) / model.size_factors[:, None]


def check_genes(genes: list[str], known: pd.Index) -> None:
    """A one-line KeyError naming the genes of ``genes`` that are not among ``known`` (the model's genes)."""
    unknown = [g for g in genes if g not in known]
    if unknown:
        raise KeyError(f"unknown gene(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''}: not among the "
                       f"{len(known)} genes of the model (e.g. {list(known[:3])})")


def plot_gene(args: argparse.Namespace, adata: ad.AnnData, model: SpaVAE, genes: list[str] | None) -> str:
    """``--plot-gene``, else the first of ``genes``, else the gene whose log normalised counts vary most."""
    if args.plot_gene is not None:
        check_genes([args.plot_gene], model.var_names)
        return args.plot_gene
    if genes:
        return genes[0]
    names = list(model.var_names)
    variances = np.concatenate([np.log1p(normalised_counts(adata, model, names[i:i + 1000])).var(0)
                                for i in range(0, len(names), 1000)])
    return names[int(np.argmax(variances))]
