"""``spavae sweep CONFIG``: a grid of configs x seeds x input files as Ray tasks into one results table
(:mod:`spavae.sweep`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from spavae.cli.parser import add_ray_options


def grid_option(text: str) -> tuple[str, list]:
    """``--grid KEY=V1,V2,...``: the key and its values, each read as JSON (else kept as a string)."""
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise argparse.ArgumentTypeError(f"expected KEY=V1,V2,..., e.g. model.n_gp=2,5; got {text!r}")
    try:
        parsed = json.loads(f"[{values}]")  # numbers, true/false/null, "strings" and [lists]
    except json.JSONDecodeError:
        parsed = [_json_or_text(value) for value in values.split(",")]
    return key, parsed


def _json_or_text(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``sweep`` command."""
    sweep = sub.add_parser(
        "sweep", help="train a grid of configs x seeds x input files as Ray tasks into one results table",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train every combination of the --grid values, --seeds and --data files of CONFIG, each an\n"
                    "ordinary run folder (as `spavae train`), as Ray tasks on a local Ray started for the call or on\n"
                    "an existing cluster (--address), and write into --out:\n"
                    "  runs/<name>/          one run folder per combination, e.g. 151507_model.n_gp=5_seed1\n"
                    "  results.csv, .json    one row per run: parameters, status (trained, skipped, failed), error,\n"
                    "                        seconds and metrics (all_ari, test_ari, knn_accuracy_...), then one\n"
                    "                        consensus row per seed group (consensus ARI vs the seeds' mean ARI and\n"
                    "                        their mean pairwise ARI)\n"
                    "  consensus/<group>.csv consensus domains of each seed group\n"
                    "  errors/<name>.txt     the traceback of each failed run\n"
                    "A failed run does not stop the others. Running the same sweep again skips finished runs,\n"
                    "resumes interrupted ones and retries failed ones. Each task reserves --threads-per-task Ray\n"
                    "CPUs and trains with that many torch threads. Needs Ray: pip install spavae[distributed].\n"
                    "Example: spavae sweep config.json --grid model.n_gp=2,5 --seeds 0 1 2 --data a.h5 b.h5")
    sweep.add_argument("config", metavar="CONFIG", help="base experiment config (.json, .yaml or .yml)")
    sweep.add_argument("--grid", action="append", default=[], type=grid_option, metavar="KEY=V1,V2",
                       help="a config key and its values, each read as JSON (repeatable: every combination is "
                            "trained), e.g. --grid model.n_gp=2,5 --grid model.encoder_layers=[128,64],[64,32]")
    sweep.add_argument("--spec", metavar="FILE", help="JSON sweep spec instead of (or with) the options: "
                                                      '{"grid": {KEY: [V1, V2]} or [{KEY: V}, ...], '
                                                      '"seeds": [0, 1], "data": [FILE, ...]}')
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a key of CONFIG for every run, VALUE read as JSON (repeatable)")
    sweep.add_argument("--seeds", type=int, nargs="+", help="values of trainer.seed (default: the spec's, else 0)")
    sweep.add_argument("--data", nargs="+", metavar="FILE", help="input files, each trained with every grid point "
                                                                 "and seed (default: data.path of CONFIG)")
    sweep.add_argument("--out", default="sweep", help="sweep folder (default: sweep)")
    add_ray_options(sweep, "run")
    sweep.add_argument("--serial", action="store_true", help="train the runs one after the other in this process, "
                                                             "without Ray")
    sweep.set_defaults(handler=sweep_command)


def sweep_command(args: argparse.Namespace) -> None:
    """The ``sweep`` command."""
    from spavae.sweep import run_sweep

    spec = {}
    if args.spec:
        path = Path(args.spec)
        if not path.is_file():
            raise FileNotFoundError(f"sweep spec {path}: no such file")
        spec = json.loads(path.read_text())
        if not isinstance(spec, dict) or set(spec) - {"grid", "seeds", "data"}:
            raise ValueError(f"sweep spec {path}: expected an object with the keys grid, seeds and data")
    grid = spec.get("grid")
    if args.grid:
        if grid is not None and not isinstance(grid, dict):
            raise ValueError("--grid cannot be combined with a spec whose grid is a list of points")
        grid = (grid or {}) | dict(args.grid)
    table = run_sweep(args.config, grid, args.seeds or spec.get("seeds", [0]), args.data or spec.get("data", []),
                      out_dir=args.out, overrides=args.set, address=args.address, num_cpus=args.num_cpus,
                      threads_per_task=args.threads_per_task, use_ray=not args.serial,
                      progress=lambda message: print(message, flush=True))
    runs = table[table["kind"] == "run"]
    failed = int((runs["status"] == "failed").sum())
    print(f"{len(runs)} runs: {int((runs['status'] == 'trained').sum())} trained, "
          f"{int((runs['status'] == 'skipped').sum())} skipped (finished before), {failed} failed", flush=True)
    if failed:
        raise ValueError(f"{failed} of {len(runs)} runs failed: see the error column of {args.out}/results.csv and "
                         f"{args.out}/errors/; run the sweep again to retry them")
