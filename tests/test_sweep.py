"""Sweeps on a local Ray with 2 CPUs: run folders, one results table, failures, skipping finished runs, the CLI."""

import ast
import json
import math
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

import spavae
from spavae.analysis.tasks import TaskResult, import_ray, run_tasks
from spavae.cli import build_parser, grid_option, main
from spavae.sweep import grid_points, run_sweep

CONFIG = {"name": "tiny",
          "model": {"encoder_layers": [16, 8], "decoder_layers": [16], "inducing": "kmeans", "n_inducing": 9},
          "trainer": {"max_epochs": 3, "patience": 100, "checkpoint_every": 3, "progress": False},
          "evaluation": {"kmeans_n_init": 2, "denoise_samples": 2, "n_marker_genes": 2, "umap": False}}


@pytest.fixture(scope="module")
def ray():
    """One local Ray with 2 CPUs for the whole module (the sweep reuses a running Ray and leaves it running)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def write_section(path: Path, n: int, seed: int = 1) -> Path:
    adata = spavae.simulate_spatial_counts(n_rows=n, n_cols=n, n_genes=40, n_domains=3, seed=seed)
    with h5py.File(path, "w") as h5:
        h5["X"] = adata.X
        h5["pos"] = adata.obsm["spatial"]
        h5["Y"] = np.array([s.encode() for s in adata.obs["ground_truth"]])
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    config = folder / "config.json"
    config.write_text(json.dumps(CONFIG | {"data": {"path": str(write_section(folder / "big.h5", 12))}}))
    return {"folder": folder, "config": config, "big": folder / "big.h5",
            "small": write_section(folder / "small.h5", 6)}  # 36 spots


def snapshot(folder: Path) -> dict[str, int]:
    """Modification time (ns) of every file under ``folder``."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def sweep(ray, files):
    """2 configs x 2 seeds on the 144-spot section."""
    out = files["folder"] / "out"
    table = run_sweep(files["config"], {"model.n_gp": [2, 3]}, [0, 1], out_dir=out, threads_per_task=1)
    return out, table


def test_a_grid_of_two_configs_and_two_seeds_gives_four_run_folders_and_one_table(sweep):
    out, table = sweep
    runs = table[table["kind"] == "run"]
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(runs["name"]) and len(runs) == 4
    assert set(runs["name"]) == {f"tiny_model.n_gp={k}_seed{s}" for k in (2, 3) for s in (0, 1)}
    assert (runs["status"] == "trained").all(), runs[["name", "error"]]
    for _, row in runs.iterrows():  # each run trained its own config and wrote its own metrics
        saved = json.loads((Path(row["run_dir"]) / "checkpoint" / "config.json").read_text())
        assert (saved["model"]["n_gp"], saved["trainer"]["seed"], saved["trainer"]["threads"]) == \
               (row["model.n_gp"], row["seed"], 1)
        metrics = json.loads((Path(row["run_dir"]) / "results" / "metrics.json").read_text())
        assert row["all_ari"] == metrics["all"]["ari"] and row["epochs"] == 3
    written = pd.read_csv(out / "results.csv")
    assert list(written["name"]) == list(table["name"])
    assert json.loads((out / "results.json").read_text())["runs"][0]["name"] == table["name"].iloc[0]


def test_each_seed_group_gets_a_consensus_row_that_rescoring_its_files_reproduces(sweep):
    out, table = sweep
    consensus = table[table["kind"] == "consensus"].set_index("group")
    assert sorted(consensus.index) == ["tiny_model.n_gp=2", "tiny_model.n_gp=3"]
    runs = table[table["kind"] == "run"]
    for group, row in consensus.iterrows():
        seeds = runs[runs["group"] == group]
        assert row["n_runs"] == 2 and row["mean_ari"] == pytest.approx(seeds["all_ari"].mean(), abs=1e-3)
        domains = [pd.read_csv(Path(run_dir) / "results" / "domains.csv", index_col=0) for run_dir in seeds["run_dir"]]
        labels = pd.read_csv(out / "consensus" / f"{group}.csv", index_col=0)
        assert list(labels.index) == list(domains[0].index) and len(labels) == 144
        # the files re-scored here, with sklearn, against the simulated truth
        truth = spavae.simulate_spatial_counts(n_rows=12, n_cols=12, n_genes=40, n_domains=3, seed=1).obs["ground_truth"]
        np.testing.assert_array_equal(labels["truth"].astype(str), truth.astype(str))
        assert row["all_ari"] == pytest.approx(adjusted_rand_score(truth, labels["consensus"]), abs=1e-4)
        assert row["seed_agreement_ari"] == pytest.approx(
            adjusted_rand_score(domains[0]["domain"], domains[1]["domain"]), abs=1e-4)
        assert row["n_domains"] == labels["consensus"].nunique()
        # two seeds: every disagreement is a tie, won by the reference, so the consensus is one of the two runs
        assert max(adjusted_rand_score(labels["consensus"], d["domain"]) for d in domains) == 1.0


def test_running_the_sweep_again_trains_nothing(sweep, files):
    out, first = sweep
    before = snapshot(out / "runs")
    table = run_sweep(files["config"], {"model.n_gp": [2, 3]}, [0, 1], out_dir=out)
    runs = table[table["kind"] == "run"]
    assert (runs["status"] == "skipped").all()
    assert snapshot(out / "runs") == before  # no file of any run folder was rewritten
    pd.testing.assert_series_equal(runs["all_ari"], first[first["kind"] == "run"]["all_ari"])


def test_a_failing_task_is_reported_and_the_others_finish_then_only_it_is_retried(ray, files):
    out = files["folder"] / "failing"
    # 40 k-means inducing points cannot be fitted on the 36-spot section: that one training raises
    grid = {"model.n_inducing": [9, 40]}
    table = run_sweep(files["config"], grid, [0], [files["big"], files["small"]], out_dir=out)
    runs = table[table["kind"] == "run"].set_index("name")
    bad = "tiny_model.n_inducing=40_small_seed0"
    assert runs.loc[bad, "status"] == "failed"
    assert "n_inducing must be an integer between 1 and the number of spots" in runs.loc[bad, "error"]
    assert "Traceback" in (out / "errors" / f"{bad}.txt").read_text()
    others = runs.drop(bad)
    assert (others["status"] == "trained").all() and others["all_ari"].notna().all() and len(others) == 3
    assert pd.read_csv(out / "results.csv").set_index("name").loc[bad, "status"] == "failed"
    again = run_sweep(files["config"], grid, [0], [files["big"], files["small"]], out_dir=out)
    again = again[again["kind"] == "run"].set_index("name")["status"]
    assert again[bad] == "failed" and (again.drop(bad) == "skipped").all()


def test_cli_sweep_reads_the_grid_and_reuses_the_finished_runs(sweep, files, capsys):
    out, _ = sweep
    assert main(["sweep", str(files["config"]), "--grid", "model.n_gp=2,3", "--seeds", "0", "1",
                 "--out", str(out)]) == 0
    assert "4 runs: 0 trained, 4 skipped (finished before), 0 failed" in capsys.readouterr().out


def test_cli_help_and_grid_values():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sweep", "--help"])
    assert grid_option("model.n_gp=2,5") == ("model.n_gp", [2, 5])
    assert grid_option("model.encoder_layers=[128,64],[64,32]") == ("model.encoder_layers", [[128, 64], [64, 32]])
    assert grid_option("model.kernel=cauchy,eq") == ("model.kernel", ["cauchy", "eq"])
    assert grid_points({"a": [1, 2], "b": ["x", "y"]}) == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"},
                                                          {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
    assert grid_points([{"a": 1}, {"b": 2}]) == [{"a": 1}, {"b": 2}]


def test_run_tasks_in_series_and_on_ray_agree_and_keep_errors(ray):
    tasks = [(4.0,), (-1.0,), (9.0,)]  # math.sqrt: importable by the Ray workers (this test module is not)
    serial = run_tasks(math.sqrt, tasks, use_ray=False)
    on_ray = run_tasks(math.sqrt, tasks, threads_per_task=1)
    for results in (serial, on_ray):
        assert [r.value for r in results] == [2.0, None, 3.0]
        assert results[1].error == "ValueError: math domain error" and isinstance(results[1], TaskResult)


def test_missing_ray_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install spavae\[distributed\]"):
        import_ray()


def test_the_analyses_do_not_import_the_sweep_or_experiment_layer():
    """The arrows point down: spavae.sweep uses the analyses (consensus, the task executor), never the reverse."""
    layer = {"spavae.sweep", "spavae.experiment", "spavae.cli"}
    for path in sorted(Path(spavae.__file__).parent.joinpath("analysis").glob("*.py")):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):  # also the imports inside functions
            if isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        assert not imported & layer, f"{path.name} imports {sorted(imported & layer)}"
