"""``spavae enhance SOURCE``: five times the resolution of a trained run (four sub-spots around every spot)."""

from __future__ import annotations

import argparse

from spavae.analysis.enhance import enhance
from spavae.cli.outputs import Outputs
from spavae.cli.parser import add_gene_options, analysis_parser
from spavae.cli.source import normalised_counts, open_source, plot_gene
from spavae.plot import plot_gene_spatial


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``enhance`` command."""
    parser = analysis_parser(
        sub, "enhance", "5x resolution: predict 4 sub-spots around every spot",
        "Predict latent and expression at four sub-spots around every spot plus the spot itself (5N rows;\n"
        "spavae.analysis.enhance). Writes:\n"
        "  enhanced.h5ad    5N rows: expression (normalised scale) in .X, obsm['spatial'], the latent in\n"
        "                   obsm['X_spavae'], obs['parent_spot'] and obs['offset']\n"
        "  enhanced.png     a gene measured at the spots and predicted at the 5N sub-spots\n"
        "Sub-spots keep their parent's section in a multi-section model.")
    add_gene_options(parser, table=False)
    parser.set_defaults(handler=enhance_command)


def enhance_command(args: argparse.Namespace) -> None:
    """The ``enhance`` command."""
    run, out = open_source(args, "enhance")
    model, adata = run.model(), run.adata
    gene = plot_gene(args, adata, model, None)
    enhanced = enhance(model, n_samples=args.n_samples, seed=args.seed)
    written = Outputs(out)
    written.h5ad("enhanced.h5ad", enhanced)
    written.figure("enhanced.png", plot_gene_spatial,
                   {"measured (normalised)": (adata.obsm[model.init_params["spatial_key"]],
                                              normalised_counts(adata, model, [gene])),
                    "enhanced": (enhanced.obsm["spatial"], enhanced[:, gene].X)}, gene=gene)
    written.report()
