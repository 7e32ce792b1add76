"""``spavae de SOURCE``: differential expression between domains of a trained run (each against the rest, or two
groups)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd

from spavae.analysis.differential import differential_expression, rank_genes_domains
from spavae.analysis.runs import TrainedRun
from spavae.cli.outputs import Outputs
from spavae.cli.parser import analysis_parser, comma_list
from spavae.cli.source import open_source
from spavae.plot import plot_volcano


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``de`` command."""
    de = analysis_parser(
        sub, "de", "differential expression between domains (each vs the rest, or two groups)",
        "Differential expression from denoised posterior draws (spavae.analysis.differential_expression) and "
        "write:\n"
        "  de_<group1>_vs_<group2>.csv    one per comparison (<group2> = rest without --group2): one row per gene\n"
        "                                 with LFC, mean/median/sd_LFC, prob_DE, prob_not_DE, bayes_factor and the\n"
        "                                 denoised/raw group means, sorted by bayes_factor then LFC\n"
        "  volcano_<group1>_vs_<group2>.png   LFC against the Bayes factor, top genes named\n"
        "  summary.csv                    one row per comparison: group sizes, LFC threshold delta, pseudocount,\n"
        "                                 number of genes with prob_DE >= 0.8\n"
        "Groups: --groupby COLUMN of the spots' obs (or of the --labels CSV). Without either, the domains of\n"
        "`spavae domains` in the default output folder (<...>/domains/domains.csv), else the refined domains of\n"
        "`spavae run` / `spavae evaluate`.")
    de.add_argument("--groupby", metavar="COLUMN", help="obs column (or --labels CSV column) with the groups")
    de.add_argument("--labels", metavar="CSV", help="CSV of groups: first column the spot names, then the group "
                                                    "column(s), e.g. the domains.csv of `spavae domains`")
    de.add_argument("--group1", metavar="A[,B...]", help="labels of the first group (default: each group in turn)")
    de.add_argument("--group2", metavar="C[,D...]", help="labels of the second group (default: every other "
                                                         "labelled spot)")
    de.add_argument("--unlabeled", default="NA", help="label of unannotated spots, left out of 'the rest' "
                                                      "(default NA)")
    de.add_argument("--n-draws", type=int, default=10000, help="spots drawn per group (default 10000, as the "
                                                               "original)")
    de.set_defaults(handler=de_command)


def slug(labels: list[str] | None) -> str:
    """A file-name part for a group: its labels joined by '+', other characters than [A-Za-z0-9_.+-] as '_'."""
    return "rest" if labels is None else re.sub(r"[^A-Za-z0-9_.+-]", "_", "+".join(labels))


def _de_groups(args: argparse.Namespace, run: TrainedRun) -> tuple[str, str]:
    """Put the groups in an ``obs`` column; returns the column and where the groups came from."""
    adata = run.adata
    labels = Path(args.labels) if args.labels else None
    if labels is None and args.groupby is None:
        default = run.output_root / "domains" / "domains.csv"
        if default.is_file():
            labels = default
        elif "spavae_domain_refined" in adata.obs:
            return "spavae_domain_refined", "the refined domains of the run (obs['spavae_domain_refined'])"
        else:
            raise ValueError("no groups to compare: run `spavae domains SOURCE` first, or give --groupby COLUMN "
                             f"(obs columns: {list(adata.obs.columns)}) or --labels CSV")
    if labels is None:
        if args.groupby not in adata.obs:
            raise KeyError(f"--groupby {args.groupby}: the spots have no such obs column; columns: "
                           f"{list(adata.obs.columns)}")
        return args.groupby, f"obs['{args.groupby}']"
    table = pd.read_csv(labels, index_col=0)
    column = args.groupby or (table.columns[0] if len(table.columns) else None)
    if column not in table:
        raise KeyError(f"{labels} has no column {column!r}; columns: {list(table.columns)}")
    table.index = table.index.astype(str)
    if not adata.obs_names.isin(table.index).any():
        raise ValueError(f"none of the spot names in {labels} (first column) are spots of {args.source}")
    values = table[column].astype(str).reindex(adata.obs_names)
    adata.obs[column] = values.to_numpy(dtype=object)
    return column, f"column '{column}' of {labels}"


def de_command(args: argparse.Namespace) -> None:
    """The ``de`` command."""
    run, out = open_source(args, "de")
    group1, group2 = comma_list(args.group1), comma_list(args.group2)
    if group2 is not None and group1 is None:
        raise ValueError("--group2 needs --group1 (without both, each group is compared with the rest)")
    groupby, where = _de_groups(args, run)
    model, adata = run.model(), run.adata
    print(f"groups: {where}", flush=True)
    options = {"groupby": groupby, "unlabeled": args.unlabeled, "n_draws": args.n_draws, "seed": args.seed}
    if group1 is not None:
        table = differential_expression(adata, model, group1=group1, group2=group2, **options)
        comparisons = [(group1, group2, table, table.attrs)]
    else:
        rank_genes_domains(adata, model, key_added="spavae_de", **options)
        results, summary = adata.uns["spavae_de"]["results"], adata.uns["spavae_de"]["summary"]
        comparisons = [([row.group], None,
                        results[results["group"] == row.group].drop(columns="group").set_index("gene"),
                        row._asdict()) for row in summary.itertuples(index=False)]
    written, rows = Outputs(out), []
    for first, second, table, attrs in comparisons:
        name = f"{slug(first)}_vs_{slug(second)}"
        table = table.sort_values(["bayes_factor", "LFC"], ascending=False)
        written.csv(f"de_{name}.csv", table)
        written.figure(f"volcano_{name}.png", plot_volcano, table,
                       title=f"{'+'.join(first)} vs {'rest' if second is None else '+'.join(second)}")
        rows.append({"group1": "+".join(first), "group2": "rest" if second is None else "+".join(second),
                     **{k: attrs[k] for k in ("n_spots1", "n_spots2", "delta", "pseudocount")},
                     "n_prob_de_0.8": int((table["prob_DE"] >= 0.8).sum())})
    written.csv("summary.csv", pd.DataFrame(rows), index=False)
    written.report()
