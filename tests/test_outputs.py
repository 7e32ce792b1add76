"""Output files: atomic writes that survive a power cut, `spavae run` refusing to replace an earlier run, and
`SpaVAE.write_results` writing values for the model's genes only."""

from __future__ import annotations

import json
import logging
import os
import stat

import h5py
import numpy as np
import pytest

import spavae
from spavae.cli import main
from spavae.utils import atomic_path


def test_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace

    def record_fsync(descriptor):
        info = os.fstat(descriptor)
        events.append(("fsync", "folder" if stat.S_ISDIR(info.st_mode) else info.st_ino))
        fsync(descriptor)

    def record_replace(source, target):
        events.append(("replace", os.stat(source).st_ino))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_replace)
    target = tmp_path / "result.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("complete")
        written = os.stat(tmp).st_ino
    assert events == [("fsync", written), ("replace", written), ("fsync", "folder")]
    assert target.read_text() == "complete"


def test_a_failed_write_syncs_nothing_and_leaves_the_earlier_file(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "fsync", calls.append)
    target = tmp_path / "result.txt"
    target.write_text("earlier")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert calls == [] and target.read_text() == "earlier" and os.listdir(tmp_path) == ["result.txt"]


@pytest.fixture(scope="module")
def h5_file(tmp_path_factory):
    """144 simulated spots and 30 genes in the spaVAE layout, without labels."""
    adata = spavae.simulate_spatial_counts(n_rows=12, n_cols=12, n_genes=30, n_domains=3, seed=3)
    path = tmp_path_factory.mktemp("outputs") / "section.h5"
    with h5py.File(path, "w") as h5:
        h5["X"], h5["pos"] = adata.X, adata.obsm["spatial"]
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_a_second_run_into_the_same_folder_is_refused_unless_overwrite(h5_file, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["run", str(h5_file), "--out", str(out), "--epochs", "1", "--quiet", "--threads", "1"]
    assert main([*common, "--n-domains", "auto", "--k-range", "2:3"]) == 0
    earlier = {path.name: path.read_bytes() for path in out.iterdir()}
    assert {"results.h5ad", "model.pt", "n_domains_selection.csv"} <= set(earlier)
    capsys.readouterr()
    assert main([*common, "--n-domains", "2"]) == 2
    err = one_line_error(capsys)
    assert "already holds the outputs of an earlier run" in err and "results.h5ad" in err and "model.pt" in err
    assert "--overwrite" in err and "--out NEWDIR" in err
    assert {path.name: path.read_bytes() for path in out.iterdir()} == earlier
    assert main([*common, "--n-domains", "2", "--overwrite"]) == 0
    assert json.loads((out / "metrics.json").read_text())["n_domains_chosen_by"] == "given"
    assert (out / "model.pt").read_bytes() != earlier["model.pt"]
    assert not (out / "n_domains_selection.csv").exists()  # the earlier run's, which this run does not describe


def test_a_second_default_run_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spavae_out").mkdir()
    (tmp_path / "spavae_out" / "results.h5ad").write_text("an earlier run")
    assert main(["run", "--quiet"]) == 2
    err = one_line_error(capsys)
    assert "spavae_out already holds the outputs of an earlier run (results.h5ad)" in err
    assert "--overwrite" in err and "--out NEWDIR" in err
    assert os.listdir(tmp_path / "spavae_out") == ["results.h5ad"]


def test_a_folder_with_other_files_is_not_an_earlier_run(h5_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["run", str(h5_file), "--out", str(out), "--epochs", "1", "--n-domains", "2", "--quiet",
                 "--threads", "1"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.pt").is_file()


@pytest.fixture(scope="module")
def gene_subset_model():
    """A model trained (one epoch) on 20 of the 30 genes of a section, and the section with all 30."""
    adata = spavae.simulate_spatial_counts(n_rows=12, n_cols=12, n_genes=30, n_domains=3, seed=3)
    model = spavae.SpaVAE(adata[:, 5:25].copy(), seed=0, device="cpu")
    model.train(max_epochs=1, progress=False)
    return adata, model


def test_write_results_gives_genes_outside_the_model_no_values(gene_subset_model, tmp_path):
    adata, model = gene_subset_model
    adata = adata.copy()
    model.write_results(adata, n_samples=2)
    assert "spavae_denoised" not in adata.layers  # no zeros for the 10 genes the model never saw
    assert adata.uns["spavae"]["denoised_genes"] == list(model.var_names) == list(adata.var_names[5:25])
    np.testing.assert_array_equal(adata.obsm["spavae_denoised"], model.get_denoised_counts(n_samples=2))
    adata.write_h5ad(tmp_path / "results.h5ad")
    again = spavae.read_h5ad(tmp_path / "results.h5ad")
    assert list(again.uns["spavae"]["denoised_genes"]) == list(model.var_names)


def test_write_results_puts_the_model_genes_in_the_order_of_the_data(gene_subset_model):
    adata, model = gene_subset_model
    reordered = adata[:, list(reversed(model.var_names))].copy()
    model.write_results(reordered, n_samples=2)
    denoised = model.get_denoised_counts(n_samples=2)
    np.testing.assert_array_equal(reordered.layers["spavae_denoised"], denoised[:, ::-1])
    assert "denoised_genes" not in reordered.uns["spavae"] and "spavae_denoised" not in reordered.obsm


def test_write_results_checks_the_size_limit_on_what_it_writes(gene_subset_model, monkeypatch, caplog):
    adata, model = gene_subset_model
    monkeypatch.setattr(spavae.api, "DENSE_OUTPUT_LIMIT", adata.n_obs * 20)  # the model's genes, not adata's 30
    written = adata.copy()
    model.write_results(written, n_samples=2)
    assert written.obsm["spavae_denoised"].shape == (adata.n_obs, 20)
    monkeypatch.setattr(spavae.api, "DENSE_OUTPUT_LIMIT", adata.n_obs * 20 - 1)
    skipped = adata.copy()
    with caplog.at_level(logging.WARNING, logger="spavae"):
        model.write_results(skipped, n_samples=2)
    assert "spavae_denoised" not in skipped.obsm and "spavae_denoised" not in skipped.layers
    assert f"not writing the denoised counts: {adata.n_obs} spots x 20 genes" in caplog.text


def test_denoise_gives_genes_outside_the_model_no_values(gene_subset_model):
    from spavae.analysis import denoise

    adata, model = gene_subset_model
    adata = adata.copy()
    denoise(adata, model, n_samples=2)  # a shape error before: the layer held only the model's 20 genes
    assert "spavae_denoised" not in adata.layers
    assert adata.uns["spavae_denoised"]["denoised_genes"] == list(model.var_names)
    np.testing.assert_array_equal(adata.obsm["spavae_denoised"], model.get_denoised_counts(n_samples=2))
