"""Command line of spavae.

* ``spavae run [INPUT]`` trains spaVAE and writes the latent, domains and a plot (without INPUT: a simulated
  section with planted domains); without labels it chooses the number of domains by counting Leiden
  communities of the latent;
* ``spavae train -c CONFIG`` trains an experiment config into ``<save_dir>/<name>/`` (checkpoints, logs,
  TensorBoard events) and evaluates it; ``spavae resume RUN_DIR`` continues an interrupted run from its last
  checkpoint; ``spavae evaluate RUN_DIR`` writes the latent, domains, scores and figures of a run
  (see docs/experiments.md); with ``--devices N``, train and resume train one model data-parallel over N
  processes started with torchrun (see docs/distributed.md);
* ``spavae sweep CONFIG --grid KEY=V1,V2 --seeds 0 1 2`` trains a grid of configs x seeds x input files as Ray
  tasks into one results table (see docs/sweeps.md);
* ``spavae domains|de|svg|predict|enhance SOURCE`` run the analyses on a trained run (a ``spavae run`` folder, a
  ``spavae train`` run folder, or a results .h5ad with ``--model``) and write tables and figures
  (see docs/cli.md).
"""

# Each command lives in its own module of this package, with a ``register(sub)`` that adds its parser and a thin
# function that runs it on the library; parser.py and source.py hold what several commands share and outputs.py
# writes their files.

from __future__ import annotations

import argparse
import logging
import sys

from spavae import __version__, distributed
from spavae.cli import de, domains, enhance, experiment, predict, run, svg, sweep
from spavae.cli.sweep import grid_option

__all__ = ["build_parser", "grid_option", "main"]

#: The command modules, in the order of ``spavae --help``.
COMMANDS = (run, experiment, sweep, domains, de, svg, predict, enhance)


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``spavae`` command, with every subcommand."""
    parser = argparse.ArgumentParser(prog="spavae", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"spavae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``spavae`` command."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if getattr(args, "devices", 1) > 1 and not distributed.launched():  # the ranks started here see torchrun's env
        return distributed.launch(args.devices, sys.argv[1:] if argv is None else argv)
    try:
        args.handler(args)
    except (ValueError, KeyError, OSError, ImportError, FloatingPointError) as err:
        message = err.args[0] if len(err.args) == 1 and isinstance(err.args[0], str) else str(err)
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0
