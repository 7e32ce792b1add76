"""The command line: help, a tiny end-to-end run on an h5 file, and clear errors."""

import json
import re

import h5py
import numpy as np
import pytest

import spavae
from spavae.cli import build_parser, main


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    text = capsys.readouterr().out
    for option in ("--out", "--epochs", "--kernel", "--n-domains", "--k-range", "--seed", "--threads", "--device",
                   "n_domains_selection.csv"):
        assert option in text


def test_run_on_an_h5_file_writes_every_output(tmp_path, small_adata):
    path = tmp_path / "section.h5"
    with h5py.File(path, "w") as h5:
        h5["X"] = small_adata.X
        h5["pos"] = small_adata.obsm["spatial"]
        h5["Y"] = np.array([s.encode() for s in small_adata.obs["ground_truth"]])
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--epochs", "2", "--quiet", "--threads", "1"]) == 0
    for name in ("results.h5ad", "latent.csv", "domains.png", "training.png", "model.pt", "metrics.json"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_domains"] == 4 and metrics["n_domains_chosen_by"] == "labels" and metrics["epochs"] == 2
    assert not (out / "n_domains_selection.csv").exists()
    results = spavae.read_h5ad(out / "results.h5ad")
    assert results.obsm["X_spavae"].shape == (256, 10)
    assert results.obs["spavae_domain"].nunique() == 4
    assert (out / "domains.png").read_bytes()[:4] == b"\x89PNG"


def test_run_on_labels_without_a_labelled_spot_finishes_like_unlabelled_data(tmp_path, capsys):
    adata = spavae.simulate_spatial_counts(n_rows=12, n_cols=12, n_genes=30, n_domains=3, seed=3)
    path = tmp_path / "section.h5"
    with h5py.File(path, "w") as h5:
        h5["X"], h5["pos"] = adata.X, adata.obsm["spatial"]
        h5["Y"] = np.array([b"NA"] * adata.n_obs)
    out = tmp_path / "out"
    code = main(["run", str(path), "--out", str(out), "--epochs", "1", "--k-range", "2:3", "--quiet",
                 "--threads", "1"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_domains_chosen_by"] == "leiden" and not any(key.startswith("ari") for key in metrics)
    assert f"no ARI/NMI: none of the {metrics['n_spots']} spots has a ground-truth label" in printed.out
    # the sizing choices, each with its reason
    assert "genes: all 30 (n_top_genes='auto': 6,000 genes or fewer" in printed.out
    assert re.search(r"inducing points: (\d+), a (\d+) x (\d+) grid over the section \(inducing='auto': a grid up to "
                     r"20,000 spots; 13 x 13 on a section of up to 2,000 spots, 7 x 7 above\)", printed.out)
    points, side_x, side_y = map(int, re.search(r"inducing points: (\d+), a (\d+) x (\d+) grid", printed.out).groups())
    assert points == side_x * side_y and abs(points - 169) <= 13  # 144 spots: a small section
    assert "encoder input: the genes (input_axes='auto': 0.21 genes per spot, 2 or fewer)" in printed.out
    assert "latent: 2 GP + 8 Gaussian dimensions (n_gp=2, the default, n_gauss=8, the default)" in printed.out
    assert (out / "n_domains_selection.csv").is_file() and (out / "results.h5ad").is_file()


def test_run_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.h5"), "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    for value in ("1", "many"):
        with pytest.raises(SystemExit) as exit_info:
            main(["run", "--n-domains", value])
        assert exit_info.value.code == 2 and "--n-domains" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--k-range", "3-12"])
    assert "LOW:HIGH" in capsys.readouterr().err


@pytest.mark.parametrize("script,args", [("quickstart.py", ["--epochs", "2"]), ("pyro_predictive.py", ["--epochs", "2"])])
def test_examples_run(script, args, tmp_path, monkeypatch):
    import runpy
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / script
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    runpy.run_path(str(path), run_name="__main__")
