"""Sweeps: many independent trainings (a grid of overrides x seeds x input files) as Ray tasks, one results table.

Every cell of the grid is an ordinary experiment run (:func:`spavae.experiment.train`) in its own folder
``<out>/runs/<name>/``; the sweep gathers the runs' parameters and metrics into ``<out>/results.csv`` and
``<out>/results.json``. Runs that differ only in their seed form a group whose domain labels are combined into
consensus domains (:mod:`spavae.analysis.consensus`), one extra row per group.

* A task that raises is a row with status ``failed`` and its error (the traceback goes to
  ``<out>/errors/<name>.txt``); the other tasks go on.
* Calling the sweep again skips every finished run (a run folder with ``results/metrics.json`` and the same
  config), resumes interrupted ones from their last checkpoint and retries failed ones.
* Each task reserves ``threads_per_task`` Ray CPUs and trains with that many torch threads, so Ray never runs
  more training threads than the cores it was given.

Ray is optional (``pip install spavae[distributed]``); ``use_ray=False`` runs the same tasks one after the other.
The executor underneath is :func:`spavae.analysis.tasks.run_tasks`, which the permutation null of spatially variable
genes uses too (:func:`spavae.analysis.svg.permutation_null`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from spavae.analysis.consensus import consensus_summary
from spavae.analysis.tasks import TaskResult, run_tasks
from spavae.config import (
    ConfigError,
    ExperimentConfig,
    config_from_dict,
    load_config,
    set_key,
)
from spavae.utils import atomic_path

logger = logging.getLogger("spavae.sweep")

#: Config keys the sweep sets itself; a finished run is reused whatever their values were.
SWEEP_KEYS = ("trainer.threads", "trainer.progress")
MAX_NAME = 120


# ---------------------------------------------------------------------- the grid
@dataclass
class SweepRun:
    """One cell of a sweep: overrides, seed and input file, and the run folder name built from them."""

    overrides: dict[str, Any]
    seed: int
    data: str | None
    name: str = ""
    group: str = ""
    config: dict = field(default_factory=dict)


def _slug(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "x"


def _short(name: str) -> str:
    """``name``, cut to :data:`MAX_NAME` characters with a hash of the whole when longer."""
    if len(name) <= MAX_NAME:
        return name
    return f"{name[:MAX_NAME - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def grid_points(grid: Mapping[str, Sequence] | Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """The override sets of a grid: the Cartesian product of ``{key: [values]}``, or an explicit list of dicts."""
    if grid is None:
        return [{}]
    if isinstance(grid, Mapping):
        for key, values in grid.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
                raise ValueError(f"grid {key}: expected a non-empty list of values, got {values!r}")
        keys = list(grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    points = [dict(point) for point in grid]
    if not points:
        raise ValueError("the grid is an empty list; give at least one set of overrides (or {} for none)")
    return points


def expand(base: ExperimentConfig, grid=None, seeds: Sequence[int] = (0,), inputs: Sequence[str] = (), *,
           runs_dir: str | os.PathLike, threads_per_task: int = 1) -> list[SweepRun]:
    """Every run of a sweep (grid points x input files x seeds) with its name, seed group and raw config.

    A run is named ``<config name>[_<key>=<value>...][_<input stem>]_seed<S>`` (made folder-safe); its group is
    the name without the seed.
    """
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct seeds, got {seeds}")
    files = [str(Path(path).resolve()) for path in inputs] or [None]
    stems = [Path(path).stem for path in inputs]
    if len(set(stems)) != len(stems):
        raise ValueError(f"input files must have distinct names (they name the runs), got {list(inputs)}")
    runs = []
    for point in grid_points(grid):
        for key in point:
            if key in ("name", "save_dir", "trainer.seed", "data.path"):
                raise ValueError(f"grid key {key}: the sweep sets it (use seeds / inputs for trainer.seed / data.path)")
        for path in files:
            group = base.name + "".join(f"_{key}={_slug(value)}" for key, value in point.items())
            if path is not None and len(files) > 1:
                group += f"_{Path(path).stem}"
            for seed in seeds:
                raw = base.to_dict()
                for key, value in point.items():
                    set_key(raw, f"{key}={json.dumps(value)}")
                raw |= {"name": _short(f"{group}_seed{seed}"), "save_dir": str(Path(runs_dir).resolve())}
                raw["trainer"] |= {"seed": int(seed), "threads": threads_per_task, "progress": False}
                if path is not None:
                    raw["data"]["path"] = path
                elif raw["data"]["path"] is not None:
                    raw["data"]["path"] = str(Path(raw["data"]["path"]).resolve())
                runs.append(SweepRun(point, int(seed), path or raw["data"]["path"], raw["name"], _short(group), raw))
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ValueError("two runs of the sweep get the same folder name; make the grid values distinct")
    return runs


# ---------------------------------------------------------------------- one run (a task)
def _comparable(raw: dict) -> dict:
    raw = json.loads(json.dumps(raw))
    for key in SWEEP_KEYS:
        section, leaf = key.split(".")
        raw.get(section, {}).pop(leaf, None)
    return raw


def run_state(raw: dict) -> str:
    """``'new'``, ``'finished'`` (evaluated), ``'interrupted'`` (has a checkpoint) or ``'other'`` (a different config)."""
    from spavae.experiment import RunFolder

    run = RunFolder(Path(raw["save_dir"]) / raw["name"])
    if not run.config.is_file():
        return "new"
    saved = json.loads(run.config.read_text())
    if _comparable(saved) != _comparable(config_from_dict(raw).to_dict()):
        return "other"
    if (run.results / "metrics.json").is_file():
        return "finished"
    return "interrupted" if run.checkpoints() else "new"


def train_run(raw: dict) -> dict:
    """Train (or resume) and evaluate one sweep run from its raw config; returns its ``metrics.json``."""
    from spavae import experiment

    config = config_from_dict(raw)
    run = experiment.RunFolder(Path(config.save_dir) / config.name)
    if run_state(raw) == "interrupted":
        experiment.resume(run.root)
    else:
        experiment.train(config, overwrite=True)
    return json.loads((run.results / "metrics.json").read_text())


def flatten(metrics: Mapping, prefix: str = "") -> dict:
    """``{'all': {'ari': 0.5}}`` to ``{'all_ari': 0.5}``; plain values only."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            out |= flatten(value, f"{prefix}{key}_")
        elif value is None or isinstance(value, (int, float, str, bool)):
            out[prefix + key] = value
    return out


# ---------------------------------------------------------------------- the sweep
def run_sweep(config: str | os.PathLike | ExperimentConfig, grid=None, seeds: Sequence[int] = (0,),
              inputs: Sequence[str | os.PathLike] = (), *, out_dir: str | os.PathLike, overrides: Sequence[str] = (),
              address: str | None = None, num_cpus: int | None = None, threads_per_task: int = 1,
              use_ray: bool = True, consensus: bool = True,
              progress: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Train every run of a grid of overrides x seeds x input files and write one results table.

    Parameters
    ----------
    config
        The base experiment config (a file or a validated :class:`~spavae.config.ExperimentConfig`).
    grid
        ``{key: [values]}`` (every combination) or a list of ``{key: value}`` dicts (exactly those), keys as in
        ``spavae train --set`` (``model.n_gp``, ``optimizer.lr``); ``None``: the base config only.
    seeds
        Values of ``trainer.seed``; every grid point and input is trained with each.
    inputs
        Input files (``data.path``); empty: the config's own.
    out_dir
        Sweep folder: ``runs/<name>/`` per run, ``results.csv``, ``results.json``, ``errors/``, ``consensus/``.
    overrides
        ``KEY=VALUE`` overrides applied to the base config first (as ``--set``).
    address, num_cpus, threads_per_task
        Ray options (:func:`run_tasks`); ``threads_per_task`` also sets ``trainer.threads`` of every run.
    use_ray
        ``False`` trains the runs one after the other in this process (no Ray needed).
    consensus
        Add a consensus row per seed group with at least two finished runs.
    progress
        Called with a one-line message as runs finish (e.g. ``print``).

    Returns
    -------
    The results table: one row per run (``kind`` ``'run'``) with ``name``, ``group``, ``status`` (``'trained'``,
    ``'skipped'``: finished by an earlier call, ``'failed'``), ``error``, ``seed``, ``data``, the grid keys,
    ``seconds`` and the flattened metrics (``all_ari``, ``test_ari``, ...), then one row per seed group
    (``kind`` ``'consensus'``, see :func:`consensus_rows`).
    """
    start = time.perf_counter()
    out = Path(out_dir)
    if isinstance(config, ExperimentConfig):
        base = config_from_dict(json.loads(json.dumps(config.to_dict())))
        if overrides:
            raw = base.to_dict()
            for item in overrides:
                set_key(raw, item)
            base = config_from_dict(raw)
    else:
        base = load_config(config, overrides)
    runs = expand(base, grid, seeds, [str(path) for path in inputs], runs_dir=out / "runs",
                  threads_per_task=threads_per_task)
    say = progress or (lambda message: None)
    rows: dict[int, dict] = {}
    todo: list[int] = []
    for index, run in enumerate(runs):
        row = {"kind": "run", "name": run.name, "group": run.group, "seed": run.seed, "data": run.data,
               **run.overrides, "status": None, "error": None, "seconds": None,
               "run_dir": str(Path(run.config["save_dir"]) / run.name)}
        try:
            state = run_state(run.config)
        except (ConfigError, ValueError) as err:
            rows[index] = row | {"status": "failed", "error": f"{type(err).__name__}: {err}"}
            continue
        if state == "other":
            rows[index] = row | {"status": "failed", "error": f"{row['run_dir']} holds a run with a different "
                                                              "config; give another --out or remove the folder"}
        elif state == "finished":
            metrics = json.loads((Path(row["run_dir"]) / "results" / "metrics.json").read_text())
            rows[index] = row | {"status": "skipped"} | _metrics(metrics)
        else:
            rows[index] = row
            todo.append(index)
    if not todo and all(row["status"] == "failed" for row in rows.values()):
        raise ValueError(f"no run of the sweep can start; the first: {rows[0]['error']}")
    say(f"sweep {out}: {len(runs)} runs, {len(runs) - len(todo)} already done or invalid, {len(todo)} to train "
        + ("in series" if not use_ray else f"on Ray ({threads_per_task} thread(s) per task)"))

    def finished(position: int, result: TaskResult) -> None:
        index = todo[position]
        row = rows[index] | {"seconds": round(result.seconds, 2)}
        if result.error is None:
            row |= {"status": "trained"} | _metrics(result.value)
        else:
            row |= {"status": "failed", "error": result.error}
            with atomic_path(out / "errors" / f"{row['name']}.txt") as tmp:
                tmp.write_text(result.traceback or result.error)
        rows[index] = row
        say(f"{row['status']}: {row['name']} ({row['seconds']} s)" + (f": {row['error']}" if row["error"] else ""))
        _write(out, _table(rows, runs), {"wall_seconds": round(time.perf_counter() - start, 2)})

    run_tasks(train_run, [(runs[index].config,) for index in todo], use_ray=use_ray, address=address,
              num_cpus=num_cpus, threads_per_task=threads_per_task, on_result=finished)
    table = _table(rows, runs)
    if consensus:
        extra = consensus_rows(table, out / "consensus")
        if len(extra):
            table = pd.concat([table, extra], ignore_index=True)
    meta = {"wall_seconds": round(time.perf_counter() - start, 2), "n_runs": len(runs), "n_trained": len(todo),
            "use_ray": use_ray, "address": address, "threads_per_task": threads_per_task,
            "config": base.to_dict()}
    _write(out, table, meta)
    say(f"wrote {out / 'results.csv'} and {out / 'results.json'} ({meta['wall_seconds']} s)")
    return table


def _metrics(metrics: Mapping) -> dict:
    flat = flatten(metrics)
    flat.pop("run", None)  # the run folder is already a column
    return flat


def _table(rows: dict[int, dict], runs: list[SweepRun]) -> pd.DataFrame:
    return pd.DataFrame([rows[i] for i in range(len(runs))])


def _write(out: Path, table: pd.DataFrame, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "results.csv") as tmp:
        table.to_csv(tmp, index=False)
    records = json.loads(table.to_json(orient="records"))
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps({"meta": meta, "runs": records}, indent=2) + "\n")


def consensus_rows(table: pd.DataFrame, folder: str | os.PathLike | None = None) -> pd.DataFrame:
    """One row per seed group with two or more finished runs: consensus domains of the seeds' KMeans domains.

    Reads each run's ``results/domains.csv`` (column ``domain``: the unrefined KMeans domains, whose ARI is
    ``all_ari``) and combines them with :func:`spavae.analysis.consensus.consensus_summary`. The row has
    ``kind`` ``'consensus'``, ``n_runs``, ``seed_agreement_ari`` (mean pairwise ARI between the seeds) and,
    with ground truth, ``all_ari``/``all_nmi`` of the consensus next to ``mean_ari``/``sd_ari`` of the seeds. The
    consensus labels go to ``<folder>/<group>.csv``.
    """
    rows = []
    ok = table[(table["kind"] == "run") & table["status"].isin(["trained", "skipped"])]
    for group, members in ok.groupby("group", sort=False):
        if len(members) < 2:
            continue
        frames = [pd.read_csv(Path(run_dir) / "results" / "domains.csv", index_col=0)
                  for run_dir in members["run_dir"]]
        index = frames[0].index
        if any(not frame.index.equals(index) for frame in frames[1:]):
            logger.warning("group %s: the runs label different spots; no consensus", group)
            continue
        truth = frames[0]["truth"].astype(str).to_numpy() if "truth" in frames[0] else None
        summary = consensus_summary([frame["domain"].to_numpy() for frame in frames], truth)
        row = {"kind": "consensus", "name": f"{group}_consensus", "group": group, "status": "consensus",
               "data": members["data"].iloc[0], "n_runs": summary["n_runs"],
               "seed_agreement_ari": round(summary["seed_agreement_ari"], 4), "n_domains": summary["n_domains"]}
        for key in members.columns:
            if key not in row and key in table.columns and _is_grid_key(key):
                row[key] = members[key].iloc[0]
        if truth is not None:
            row |= {"all_ari": round(summary["consensus_ari"], 4), "all_nmi": round(summary["consensus_nmi"], 4),
                    "mean_ari": round(summary["mean_ari"], 4), "sd_ari": round(summary["sd_ari"], 4)}
        if folder is not None:
            labels = pd.DataFrame({"consensus": summary["labels"]}, index=index)
            if truth is not None:
                labels["truth"] = truth
            with atomic_path(Path(folder) / f"{group}.csv") as tmp:
                labels.to_csv(tmp)
        rows.append(row)
    return pd.DataFrame(rows)


def _is_grid_key(column: str) -> bool:
    return "." in column  # grid keys are config key paths (model.n_gp); metric columns have no dot
