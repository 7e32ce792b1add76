"""``spavae svg SOURCE``: spatially variable genes of a trained run (linear-decoder spaLDVAE scores, optional
permutation p-values)."""

from __future__ import annotations

import argparse

from spavae.analysis.svg import STATISTICS, check_svg_request, spatially_variable_genes
from spavae.api import VARIANTS, SpaVAE
from spavae.cli.outputs import Outputs
from spavae.cli.parser import add_ray_options, analysis_parser
from spavae.cli.source import normalised_counts, open_source
from spavae.plot import plot_marker_genes


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``svg`` command."""
    svg = analysis_parser(
        sub, "svg", "spatially variable genes (linear-decoder spaLDVAE scores, optional permutation p-values)",
        "Rank genes by their spatial score, the share of their expected expression that comes from the GP\n"
        "factors of a linear-decoder model (spavae.analysis.svg). The run's own model is used when it is a\n"
        "linear-decoder model; otherwise a spaLDVAE is trained on the run's spots (--epochs, --beta). Writes:\n"
        "  svg.csv          one row per gene, best first by --statistic: spatial_score, non_spatial_score,\n"
        "                   spatial_variance, rank[, pvalue, qvalue]\n"
        "  svg.png          the top --n-plot genes in space, measured vs denoised (normalised scale)\n"
        "  svg_model.pt     the spaLDVAE trained here (when the run's model is not one)\n"
        "--permutations N retrains N models on locations shuffled across spots for per-gene empirical p-values\n"
        "and BH q-values: each costs one more training; --ray trains them as Ray tasks (see docs/sweeps.md for\n"
        "how many permutations and which --statistic to trust).")
    svg.add_argument("--epochs", type=int, default=400, help="epochs of the spaLDVAE trained here (default 400)")
    svg.add_argument("--beta", type=float, default=10.0,
                     help="KL weight of the spaLDVAE trained here (default 10, the original's; use 1 for panels of "
                          "about a hundred genes, where 10 collapses the latent)")
    svg.add_argument("--statistic", choices=STATISTICS, default="spatial_score",
                     help="what ranks the genes and is tested: spatial_score, the GP factors' share of the gene's "
                          "expression (the original's, default), or spatial_variance, their variation of the gene "
                          "relative to its mean")
    svg.add_argument("--permutations", type=int, default=0, help="null models on permuted locations (default 0)")
    svg.add_argument("--ray", action="store_true", help="train the null models as Ray tasks "
                                                        "(pip install spavae[distributed])")
    add_ray_options(svg, "null model")
    svg.add_argument("--n-plot", type=int, default=4, help="genes drawn in svg.png (default 4)")
    svg.add_argument("--quiet", action="store_true", help="no progress bar")
    svg.set_defaults(handler=svg_command)


def svg_command(args: argparse.Namespace) -> None:
    """The ``svg`` command."""
    check_svg_request(args.statistic, args.permutations)
    if (args.address or args.num_cpus) and not args.ray:
        raise ValueError("--address and --num-cpus are options of the Ray null models: add --ray")
    run, out = open_source(args, "svg")
    adata = run.adata
    model = run.model() if run.model_path is not None else None
    trained_here = model is None or not (model.init_params["decoder"] == "linear"
                                         and model.init_params["latent_distribution"] == "lognormal")
    if trained_here:
        data_keys = {} if model is None else {k: model.init_params[k] for k in ("layer", "spatial_key")}
        print(f"training a linear-decoder spaLDVAE for the spatial scores ({args.epochs} epochs at most, "
              f"beta {args.beta})", flush=True)
        model = SpaVAE.from_variant("spaLDVAE", adata, device=args.device or "auto", seed=args.seed, **data_keys)
        model.train(**(VARIANTS["spaLDVAE"]["train"] | {"max_epochs": args.epochs, "beta": args.beta,
                                                         "progress": not args.quiet}))
    table = spatially_variable_genes(adata, model, statistic=args.statistic, n_permutations=args.permutations,
                                     use_ray=args.ray, address=args.address, num_cpus=args.num_cpus,
                                     threads_per_task=args.threads_per_task if args.ray else None,
                                     progress=lambda r: print(f"null model {r + 1}/{args.permutations}", flush=True))
    top = list(table.index[:args.n_plot])
    denoised = model.get_denoised_counts(library_size="normalized", genes=top)
    written = Outputs(out)
    written.csv("svg.csv", table.rename_axis("gene"))
    written.figure("svg.png", plot_marker_genes, adata.obsm[model.init_params["spatial_key"]],
                   normalised_counts(adata, model, top), denoised, top, titles=("measured", "spaLDVAE denoised"))
    if trained_here:
        written.model("svg_model.pt", model)
    written.report()
