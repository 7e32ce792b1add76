"""``spavae predict SOURCE LOCATIONS.csv``: latent and expression of a trained run at new locations."""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from spavae.analysis.prediction import predict
from spavae.cli.outputs import Outputs
from spavae.cli.parser import add_gene_options, analysis_parser, comma_list
from spavae.cli.source import check_genes, normalised_counts, open_source, plot_gene
from spavae.plot import plot_gene_spatial


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``predict`` command."""
    parser = analysis_parser(
        sub, "predict", "latent and expression at new locations from a CSV",
        "Predict the latent (GP posterior at the new locations; Gaussian dimensions of the nearest spot) and the\n"
        "denoised expression (normalised scale) at the locations of LOCATIONS.csv, in the coordinate frame of\n"
        "the training spots (spavae.analysis.predict). Writes:\n"
        "  predictions.csv    one row per input row: its columns, nearest_spot, latent_gp0.., latent_gauss0..,\n"
        "                     then one column per gene of --genes (all genes by default)\n"
        "  predictions.h5ad   the same as an AnnData (expression in .X, latent in obsm['X_spavae'])\n"
        "  predictions.png    a gene measured at the spots and predicted at the new locations\n"
        "A multi-section model needs the section of each location (--section-column).")
    parser.add_argument("locations", metavar="LOCATIONS.csv", help="CSV with one row per new location")
    parser.add_argument("--x-column", default="x", help="column of the x coordinate (default x)")
    parser.add_argument("--y-column", default="y", help="column of the y coordinate (default y)")
    parser.add_argument("--section-column", default="section",
                        help="column with the section of each location, for a multi-section model (default section)")
    add_gene_options(parser)
    parser.set_defaults(handler=predict_command)


def predict_command(args: argparse.Namespace) -> None:
    """The ``predict`` command."""
    run, out = open_source(args, "predict")
    table = pd.read_csv(args.locations)
    missing = [c for c in (args.x_column, args.y_column) if c not in table]
    if missing:
        raise ValueError(f"{args.locations} has no column(s) {missing} (columns: {list(table.columns)}); name the "
                         "coordinate columns with --x-column and --y-column")
    try:
        coordinates = table[[args.x_column, args.y_column]].apply(pd.to_numeric).to_numpy(np.float64)
    except ValueError as err:
        raise ValueError(f"{args.locations}: the coordinate columns must be numbers ({err})") from None
    model, adata = run.model(), run.adata
    sections = None
    if model.setup.sections is not None:
        if args.section_column not in table:
            raise ValueError(f"{args.locations} has no column '{args.section_column}': this model has several "
                             f"sections ({model.setup.sections}); name the column with --section-column")
        sections = table[args.section_column].astype(str).to_numpy()
    genes = comma_list(args.genes) or list(model.var_names)
    check_genes(genes, model.var_names)
    gene = plot_gene(args, adata, model, comma_list(args.genes))
    predicted = predict(model, coordinates, sections=sections, n_samples=args.n_samples, seed=args.seed,
                        obs_names=pd.Index([f"pred{i}" for i in range(len(table))]))
    latent = pd.DataFrame(predicted.obsm["X_spavae"], columns=[f"latent_{c}" for c in model.latent_names])
    expression = pd.DataFrame(predicted[:, genes].X, columns=genes)
    result = pd.concat([table, pd.DataFrame({"nearest_spot": predicted.obs["nearest_spot"].astype(str).to_numpy()}),
                        latent, expression], axis=1)
    spots = adata.obsm[model.init_params["spatial_key"]]
    written = Outputs(out)
    written.csv("predictions.csv", result, index=False)
    written.h5ad("predictions.h5ad", predicted)
    written.figure("predictions.png", plot_gene_spatial,
                   {"measured (normalised)": (spots, normalised_counts(adata, model, [gene])),
                    "predicted": (coordinates, predicted[:, gene].X)}, gene=gene)
    written.report()
