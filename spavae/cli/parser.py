"""Options shared by several commands: whole-number values, the SOURCE options of the analyses, the Ray options
and the gene options."""

from __future__ import annotations

import argparse


def whole_number(text: str, minimum: int, what: str) -> int:
    """An integer option value of at least ``minimum``, or an argparse error naming ``what`` it counts."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def devices_value(text: str) -> int:
    """``--devices N``: a whole number >= 1."""
    return whole_number(text, 1, "a number of processes")


SOURCE_HELP = ("a `spavae run` folder (results.h5ad + model.pt), a `spavae train` run folder (checkpoint/config.json + "
               "checkpoint/model_best.pth), or a .h5ad with the spots the model was trained on (with --model)")


def analysis_parser(sub: argparse._SubParsersAction, name: str, help: str,
                    description: str) -> argparse.ArgumentParser:
    """A subcommand with the options every analysis shares: SOURCE, --model, --out, --seed, --device, --threads."""
    parser = sub.add_parser(name, help=help, description=description,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    parser.add_argument("--model", metavar="FILE", help="model file (SpaVAE.save) instead of the run's own; needed "
                                                        "with a .h5ad SOURCE")
    parser.add_argument("--out", metavar="DIR", help=f"output folder (default: <run folder>/{name}, "
                                                     f"<run>/results/{name} for a `spavae train` run, "
                                                     f"<folder of the .h5ad>/{name})")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the clustering and of the latent draws (default 0)")
    parser.add_argument("--device", help="load the model on 'cpu' or 'cuda' (default: the device it was saved with)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return parser


def add_ray_options(parser: argparse.ArgumentParser, task: str) -> None:
    """--address, --num-cpus and --threads-per-task of a command whose trainings (``task``) can run as Ray tasks."""
    parser.add_argument("--address", help="existing Ray cluster to run on, e.g. auto or ray://head:10001 (spavae "
                                          "must be installed on its nodes); default: a local Ray for this call")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all cores)")
    parser.add_argument("--threads-per-task", type=int, default=1,
                        help=f"torch threads and Ray CPUs of each {task} (default 1)")


def add_gene_options(parser: argparse.ArgumentParser, *, table: bool = True) -> None:
    """--plot-gene and --n-samples of a command that decodes genes, and --genes when it writes a table of them."""
    if table:
        parser.add_argument("--genes", metavar="G1[,G2...]", help="genes written to the table (default: all)")
    parser.add_argument("--plot-gene", metavar="GENE", help="gene drawn in the figure (default: the first of --genes, "
                                                           "else the gene most variable across the spots)"
                        if table else "gene drawn in the figure (default: the gene most variable across the spots)")
    parser.add_argument("--n-samples", type=int, default=25, help="latent draws averaged per location (default 25)")


def comma_list(text: str | None) -> list[str] | None:
    """A comma-separated option value (``A,B,C``) as a list of its non-empty parts; ``None`` stays ``None``."""
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]
