"""``spavae domains SOURCE``: recluster the latent of a trained run; and the number-of-domains options and report
lines it shares with ``spavae run``."""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from scipy import sparse

from spavae.analysis.clustering import NEIGHBOURS, visium_array_to_xy
from spavae.analysis.domains import AUTO_RESOLUTION, DEFAULT_K_RANGE, METHODS, find_domains
from spavae.cli.outputs import Outputs
from spavae.cli.parser import analysis_parser, whole_number
from spavae.cli.source import open_source
from spavae.data.readers import LABEL_KEY, UNLABELLED
from spavae.plot import plot_spatial_domains


def n_domains_value(text: str) -> int | str:
    """``--n-domains``: ``'auto'`` or a whole number >= 2."""
    return text if text == "auto" else whole_number(text, 2, "a number of domains or 'auto'")


def k_range_value(text: str) -> range:
    """``--k-range LOW:HIGH`` (both included) as a ``range``."""
    low, sep, high = text.partition(":")
    try:
        low_k, high_k = int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be LOW:HIGH, e.g. 3:12, got {text!r}") from None
    if not sep or not 2 <= low_k <= high_k:
        raise argparse.ArgumentTypeError(f"must be LOW:HIGH with 2 <= LOW <= HIGH, got {text!r}")
    return range(low_k, high_k + 1)


def add_n_domains_options(parser: argparse.ArgumentParser) -> None:
    """--n-domains and --k-range."""
    parser.add_argument("--n-domains", type=n_domains_value, metavar="K|auto",
                        help="number of domains, or 'auto': the number of Leiden communities of the latent's "
                             f"20-neighbour graph at resolution {AUTO_RESOLUTION}, brought into --k-range; when "
                             "not given, the number of distinct non-NA ground-truth labels if the data has labels, "
                             "else auto")
    parser.add_argument("--k-range", type=k_range_value, default=f"{DEFAULT_K_RANGE.start}:{DEFAULT_K_RANGE.stop - 1}",
                        metavar="LOW:HIGH", help="candidate numbers of domains for auto, both ends included "
                                                 "(default: %(default)s)")


def describe_choice(n_domains: int, chosen_by: str, table: pd.DataFrame | None) -> str:
    """The line that says how many domains were found and how that number was chosen (``table``: the table of
    :func:`~spavae.analysis.choose_n_domains` when it was chosen from the latent)."""
    if chosen_by == "leiden":
        count = table.attrs["leiden_communities"]
        within = "" if count == n_domains else f", brought into k = {table.index.min()}..{table.index.max()}"
        return (f"{n_domains} domains: the latent's graph has {count} Leiden communities at resolution "
                f"{AUTO_RESOLUTION}{within} (n_domains_selection.csv has the silhouette of every k; give "
                "--n-domains K to choose yourself)")
    return f"{n_domains} domains ({'the number of labelled domains' if chosen_by == 'labels' else 'as given'})"


def unscored_line(n_spots: int) -> str:
    """The line that says why data with a label column got no ARI/NMI: none of its spots is labelled."""
    return (f"no ARI/NMI: none of the {n_spots} spots has a ground-truth label (obs['{LABEL_KEY}'] is "
            f"'{UNLABELLED}' or missing everywhere)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``domains`` command."""
    domains = analysis_parser(
        sub, "domains", "cluster the latent of a trained run into spatial domains",
        "Cluster the latent (obsm['X_spavae'], or computed with the model) into spatial domains and write:\n"
        "  domains.csv                one row per spot: the domain (and the unrefined one with --refine)\n"
        "  domains.h5ad               the spots with the domains as a categorical obs column and their colours\n"
        "                             in uns['<key>_colors'] (scanpy.pl.spatial / squidpy draw them), the latent\n"
        "                             in obsm['X_spavae'] and the counts as a sparse .X (no denoised values)\n"
        "  domains.png                the domains in space, next to the ground truth when the data has labels\n"
        "  summary.json               number of domains and how it was chosen, method, Leiden resolution,\n"
        "                             ARI/NMI against the labels when there are labels\n"
        "  n_domains_selection.csv    with auto: silhouette and spatial coherence of every k of --k-range "
        "and the chosen one")
    add_n_domains_options(domains)
    domains.add_argument("--method", choices=METHODS, default="kmeans",
                         help="KMeans (100 restarts), or Leiden with the resolution searched to give the number of "
                              "domains (default kmeans)")
    domains.add_argument("--refine", choices=["none", *sorted(NEIGHBOURS)], default="none",
                         help="neighbour-majority refinement: 'hexagon' (Visium), 'square' (ST) (default none)")
    domains.add_argument("--visium-array", action="store_true",
                         help="the coordinates are Visium (array_row, array_col): map them to the hexagonal lattice "
                              "for refinement and spatial coherence")
    domains.add_argument("--key", default="spavae_domains", help="obs column of the domains (default spavae_domains)")
    domains.set_defaults(handler=domains_command)


def domains_command(args: argparse.Namespace) -> None:
    """The ``domains`` command."""
    run, out = open_source(args, "domains")
    run.ensure_latent()
    adata = run.adata
    truth_key = LABEL_KEY if LABEL_KEY in adata.obs else None
    find_domains(adata, args.n_domains, method=args.method, refine=None if args.refine == "none" else args.refine,
                 visium_array=args.visium_array, truth_key=truth_key, k_range=args.k_range, seed=args.seed,
                 key_added=args.key)
    info = adata.uns[args.key]
    selection = None
    if "selection" in info:
        selection = pd.DataFrame({k: info["selection"][k] for k in ("silhouette", "spatial_coherence")},
                                 index=pd.Index(info["selection"]["k"], name="k"))
        selection["chosen"] = selection.index == info["n_domains"]
        selection.attrs["leiden_communities"] = info["selection"]["leiden_communities"]
    print(describe_choice(info["n_domains"], info["n_domains_chosen_by"], selection), flush=True)
    if truth_key is not None and "scores" not in info:
        print(unscored_line(adata.n_obs), flush=True)
    columns = [key for key in (args.key, f"{args.key}_unrefined") if key in adata.obs]
    export = adata.copy()
    for mapping in (export.layers, export.obsm):  # denoised values: recomputable from the model, as large as the data
        for key in [name for name in mapping if "_denoised" in name]:
            del mapping[key]
    if export.X is not None and not sparse.issparse(export.X):
        export.X = sparse.csr_matrix(export.X)
    locations = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    summary = {"source": str(args.source), "n_domains": info["n_domains"],
               "n_domains_chosen_by": info["n_domains_chosen_by"],
               **{k: info[k] for k in ("resolution", "leiden_seed", "scores") if k in info}, "params": info["params"]}
    written = Outputs(out)
    written.csv("domains.csv", adata.obs[columns].rename_axis("spot"))
    written.h5ad("domains.h5ad", export)
    written.figure("domains.png", plot_spatial_domains,
                   visium_array_to_xy(locations) if args.visium_array else locations, adata.obs[args.key],
                   truth=adata.obs[truth_key] if "scores" in info else None)
    written.json("summary.json", summary)
    if selection is not None:
        written.csv("n_domains_selection.csv", selection)
    written.report()
