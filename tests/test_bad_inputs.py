"""Wrong inputs to every public entry point give a one-line error that names the problem and the fix.

Never a traceback from deep inside torch/numpy/h5py, never a silent NaN or a silently ignored argument, and never a
half-written output file. One tiny section (30 spots x 10 genes) and one model trained for two epochs serve the
whole module.
"""

from __future__ import annotations

import json
import os
import re
import tempfile

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import spavae
from spavae import SpaVAE
from spavae.analysis import (
    cluster_kmeans,
    denoised_samples,
    differential_expression,
    find_domains,
    predict,
    predict_latent,
    rank_genes_domains,
    refine_labels,
)
from spavae.cli import main

TINY = {"encoder_layers": (8,), "decoder_layers": (8,), "n_gauss": 2, "inducing_steps": 2, "device": "cpu"}


@pytest.fixture(scope="module")
def section() -> ad.AnnData:
    """30 spots x 10 genes, every spot and gene with counts, labels in obs['ground_truth']."""
    return spavae.simulate_spatial_counts(n_rows=5, n_cols=6, n_genes=10, n_domains=2, seed=0)


@pytest.fixture(scope="module")
def untrained(section) -> SpaVAE:
    return SpaVAE(section.copy(), **TINY)


@pytest.fixture(scope="module")
def trained(section) -> SpaVAE:
    torch.set_num_threads(2)
    return SpaVAE(section.copy(), **TINY).train(max_epochs=2, progress=False)


@pytest.fixture(scope="module")
def model_file(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.pt"
    trained.save(path)
    return path


@pytest.fixture(scope="module")
def two_sections(section) -> tuple[ad.AnnData, SpaVAE]:
    """Two copies of the section side by side as sections 'a' and 'b', with a model trained for one epoch."""
    halves = [section.copy(), section.copy()]
    for name, half in zip("ab", halves):
        half.obs_names = [f"{name}_{spot}" for spot in half.obs_names]
        half.obs["section"] = name
    both = ad.concat(halves)
    return both, SpaVAE(both.copy(), batch_key="section", **TINY).train(max_epochs=1, progress=False)


def changed(adata: ad.AnnData, **changes) -> ad.AnnData:
    """A copy of ``adata`` with ``X`` or ``obsm['spatial']`` replaced by the result of a function of the old one."""
    out = adata.copy()
    if "X" in changes:
        out.X = changes["X"](np.asarray(out.X))
    if "spatial" in changes:
        out.obsm["spatial"] = changes["spatial"](np.asarray(out.obsm["spatial"], dtype=np.float64))
    return out


def with_value(array: np.ndarray, value, dtype=np.float64) -> np.ndarray:
    array = array.astype(dtype)
    array[0, 0] = value
    return array


def folder_listing(path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# ---------------------------------------------------------------------- counts
@pytest.mark.parametrize("change,match", [
    (lambda x: x.astype(str).astype(object), r"adata.X: counts must be real numbers, got dtype object; convert"),
    (lambda x: x.astype(np.complex64), r"adata.X: counts must be real numbers, got dtype complex64"),
    (lambda x: x > 0, r"adata.X: counts must be real numbers, got dtype bool; convert"),
    (lambda x: x + 0.5, r"counts must be integers \(e.g. \d+.5 at row 0, column 0\); pass the raw count layer"),
    (lambda x: with_value(x, -1), r"1 count value\(s\) are negative; spavae models raw counts"),
    (lambda x: with_value(x, np.nan), r"1 count value\(s\) are NaN or infinite; spavae needs raw counts"),
    (lambda x: with_value(x, np.inf), r"1 count value\(s\) are NaN or infinite; spavae needs raw counts"),
], ids=["text", "complex", "bool", "non-integer", "negative", "nan", "inf"])
def test_counts_that_are_not_raw_counts_are_refused(section, change, match):
    with pytest.raises(ValueError, match=match):
        SpaVAE(changed(section, X=change), **TINY)


def test_text_counts_in_a_layer_name_the_layer(section):
    adata = section.copy()
    adata.layers["counts"] = np.asarray(adata.X).astype(str).astype(object)
    with pytest.raises(ValueError, match=r"adata.layers\['counts'\]: counts must be real numbers, got dtype object"):
        SpaVAE(adata, layer="counts", **TINY)


@pytest.mark.parametrize("option,match", [
    ({"layer": "counts"}, r"adata has no layer 'counts' \(layer=\); layers present: \['true_log_mean'\]"),
    ({"spatial_key": "xy"}, r"adata.obsm has no 'xy' with spot coordinates \(spatial_key=\)"),
    ({"batch_key": "slide"}, r"adata.obs has no column 'slide' \(batch_key\); columns: \['ground_truth'\]"),
    ({"protein_key": "adt"}, r"adata.obsm has no 'adt' with protein counts \(protein_key=\)"),
])
def test_missing_keys_name_the_key_and_what_is_there(section, option, match):
    with pytest.raises(KeyError, match=match):
        SpaVAE(section.copy(), **option, **TINY)


@pytest.mark.parametrize("axis,fix", [("obs", "obs_names_make_unique"), ("var", "var_names_make_unique")])
def test_duplicated_names_are_refused_with_the_fix(section, axis, fix):
    adata = section.copy()
    names = list(getattr(adata, f"{axis}_names"))
    names[1] = names[0]
    setattr(adata, f"{axis}_names", names)
    with pytest.raises(ValueError, match=rf"duplicated (spot|gene) names \(e.g. \['{names[0]}'\]\).*{fix}\(\)"):
        SpaVAE(adata, **TINY)


def test_too_few_spots_one_gene_and_empty_genes_are_refused(section):
    with pytest.raises(ValueError, match=r"adata has 19 spots; spavae needs at least 20"):
        SpaVAE(section[:19].copy(), **TINY)
    with pytest.raises(ValueError, match=r"adata.X has 1 gene\(s\); spavae needs at least 2"):
        SpaVAE(section[:, :1].copy(), **TINY)
    empty_gene = changed(section, X=lambda x: x * (np.arange(x.shape[1]) > 0))
    with pytest.raises(ValueError, match=r"0 spot\(s\) and 1 gene\(s\) with zero total count.*filter_empty"):
        SpaVAE(empty_gene, **TINY)


# ---------------------------------------------------------------------- locations
@pytest.mark.parametrize("change,match", [
    (lambda xy: with_value(xy, np.nan), r"obsm\['spatial'\]: 1 spot location\(s\) are NaN/inf"),
    (lambda xy: with_value(xy, -np.inf), r"obsm\['spatial'\]: 1 spot location\(s\) are NaN/inf"),
    (lambda xy: xy[:, :1], r"locations must be a spots x 2 array, got shape \(30, 1\)"),
    (lambda xy: np.hstack([xy, xy[:, :1]]), r"locations must be a spots x 2 array, got shape \(30, 3\)"),
    (lambda xy: xy.astype(str), r"locations must be real numbers, got dtype <U\d+; convert them first"),
    (lambda xy: xy.astype(complex), r"locations must be real numbers, got dtype complex128"),
    (lambda xy: xy > xy.mean(0), r"locations must be real numbers, got dtype bool"),
    (lambda xy: pd.DataFrame(xy).astype(object), r"locations must be real numbers, got dtype object"),
], ids=["nan", "inf", "one-column", "three-columns", "text", "complex", "bool", "object-frame"])
def test_bad_locations_are_refused(section, change, match):
    adata = section.copy()
    value = change(np.asarray(adata.obsm["spatial"], dtype=np.float64))
    if isinstance(value, pd.DataFrame):
        value.index = adata.obs_names
    adata.obsm["spatial"] = value
    with pytest.raises(ValueError, match=match):
        SpaVAE(adata, **TINY)


# ---------------------------------------------------------------------- views, backed and sparse input
def test_views_backed_and_sparse_input_give_the_same_model_inputs(section, tmp_path):
    reference = SpaVAE(section.copy(), **TINY).data
    path = tmp_path / "section.h5ad"
    sparse = section.copy()
    sparse.X = sp.csr_matrix(sparse.X)
    sparse.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    view = section[np.arange(section.n_obs)]
    assert view.is_view
    for adata in (view, sparse, backed):
        data = SpaVAE(adata, **TINY).data
        np.testing.assert_array_equal(data.counts.take(np.arange(section.n_obs)),
                                      np.asarray(section.X, dtype=np.float32))
        np.testing.assert_array_equal(data.scaled_locations, reference.scaled_locations)
    backed.file.close()


# ---------------------------------------------------------------------- model options
@pytest.mark.parametrize("option,error,match", [
    ({"n_top_genes": "many"}, ValueError, r"n_top_genes must be an integer >= 2, 'auto' or None, got 'many'"),
    ({"device": "tpu"}, ValueError, r"unknown device 'tpu'; use 'auto', 'cpu', 'cuda'"),
    ({"encoder_layers": (0,)}, ValueError, r"encoder_layers must be a sequence of integer layer widths >= 1"),
    ({"decoder_layers": (-1,)}, ValueError, r"decoder_layers must be a sequence of integer layer widths >= 1"),
    ({"encoder_layers": "64"}, ValueError, r"encoder_layers must be a sequence of integer layer widths"),
    ({"inducing": "kmeans", "n_inducing": 0}, ValueError, r"n_inducing must be an integer >= 1, got 0"),
    ({"inducing": "kmeans", "n_inducing": 31}, ValueError,
     r"n_inducing must be an integer between 1 and the number of spots \(30\), got 31"),
    ({"inducing_steps": 0}, ValueError, r"inducing_steps must be a positive integer, got 0"),
    ({"dtype": "float16"}, ValueError, r"dtype must be one of \['float32', 'float64'\], got 'float16'"),
    ({"n_gp": 0}, ValueError, r"n_gp must be an integer >= 1, got 0"),
    ({"kernel": "gaussian"}, ValueError, r"unknown kernel 'gaussian'; use one of"),
    ({"loc_range": -1}, ValueError, r"loc_range must be positive, got -1"),
    ({"hidden": 3}, TypeError, r"SpaVAE got unknown option\(s\) \[.hidden.\]; the architecture options are"),
])
def test_bad_model_options_are_refused(section, option, error, match):
    with pytest.raises(error, match=match):
        SpaVAE(section.copy(), **(TINY | option))


def test_not_an_anndata_and_a_single_section_batch_key_are_refused(section):
    with pytest.raises(TypeError, match=r"adata must be an AnnData, got ndarray"):
        SpaVAE(np.asarray(section.X), **TINY)
    one = section.copy()
    one.obs["section"] = "a"
    with pytest.raises(ValueError, match=r"obs\['section'\] has a single section; drop batch_key"):
        SpaVAE(one, batch_key="section", **TINY)


# ---------------------------------------------------------------------- training settings
@pytest.mark.parametrize("settings,match", [
    ({"max_steps": 0}, r"max_steps must be a positive integer, 'auto' or None, got 0"),
    ({"batch_size": 1}, r"batch_size must be an integer >= 2 or 'auto', got 1"),
    ({"batch_size": 2.5}, r"batch_size must be an integer >= 2 or 'auto', got 2.5"),
    ({"train_size": 0}, r"train_size must be in \(0, 1\], got 0"),
    ({"train_size": 1.5}, r"train_size must be in \(0, 1\], got 1.5"),
    ({"lr": -1.0}, r"lr must be a finite number > 0, got -1.0"),
    ({"lr": float("nan")}, r"lr must be a finite number > 0, got nan"),
    ({"lr": "0.01"}, r"lr must be a finite number > 0, got '0.01'"),
    ({"max_epochs": 0}, r"max_epochs must be an integer >= 1, got 0"),
    ({"max_epochs": 1.5}, r"max_epochs must be an integer >= 1, got 1.5"),
    ({"patience": 0}, r"patience must be an integer >= 1, got 0"),
    ({"num_samples": 1.5}, r"num_samples must be an integer >= 1, got 1.5"),
    ({"weight_decay": -1.0}, r"weight_decay must be a finite number >= 0, got -1.0"),
    ({"beta": 0.0, "dynamic_beta": False}, r"beta must be a finite number > 0, got 0.0"),
    ({"beta_min": -1.0}, r"beta_min must be a finite number > 0, got -1.0"),
    ({"beta_min": 30.0}, r"beta_min \(30.0\) must not exceed beta_max \(25.0\)"),
    ({"kl_target": -0.1}, r"kl_target must be a finite number > 0, got -0.1"),
    ({"lr_scheduler": {"factr": 0.5}}, r"lr_scheduler must be None or a dict of ReduceLROnPlateau options.*'factr'"),
    ({"resume": {"epoch": 3}}, r"resume must be a Trainer.state_dict\(\)"),
])
def test_bad_training_settings_are_refused_before_training(untrained, settings, match):
    settings = {"max_epochs": 1, "progress": False} | settings
    with pytest.raises(ValueError, match=match):
        untrained.train(**settings)
    assert not untrained.is_trained and untrained.history.empty


def test_an_untrained_model_says_to_train_first(untrained):
    with pytest.raises(RuntimeError, match=r"not trained yet: call .train\(\) first"):
        untrained.get_latent_representation()


# ---------------------------------------------------------------------- model files
def test_load_refuses_files_that_are_not_models(model_file, section, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    checkpoint = tmp_path / "checkpoint-epoch3.pth"
    torch.save({"format": 1, "epoch": 3, "config": {}, "trainer": {"module": {}}}, checkpoint)
    not_a_dict = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_a_dict)
    cases = [
        (tmp_path / "missing.pt", FileNotFoundError, r"missing.pt: no such model file"),
        (tmp_path, ValueError, r"is a folder; give the model file \(e.g. a run's checkpoint/model_best.pth\)"),
        (text, ValueError, r"notes.txt is not a readable spavae model file \(UnpicklingError: .*SpaVAE.save"),
        (truncated, ValueError, r"truncated.pt is not a readable spavae model file .*SpaVAE.save"),
        (checkpoint, ValueError, r"is a training checkpoint, not a model file; load the run's "
                                 r"checkpoint/model_best.pth, or continue training with `spavae resume RUN_DIR`"),
        (not_a_dict, ValueError, r"list.pt is not a spavae model file; give a file written by SpaVAE.save"),
    ]
    for path, error, match in cases:
        with pytest.raises(error, match=match):
            SpaVAE.load(path, section.copy())


@pytest.mark.parametrize("file_format,match", [
    (1, r"without the fitted data setup that spavae .* needs \(model format 2\); train the model again"),
    (3, r"\(model format 3\), newer than this spavae .* \(format 2\); upgrade spavae to load it"),
])
def test_load_refuses_model_files_of_another_version(model_file, section, tmp_path, file_format, match):
    payload = torch.load(model_file, weights_only=False)
    payload["format"] = file_format
    torch.save(payload, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=match):
        SpaVAE.load(tmp_path / "other.pt", section.copy())


def test_load_refuses_spots_without_the_models_genes_or_sections(model_file, two_sections, section, tmp_path):
    with pytest.raises(ValueError, match=r"adata lacks 5 of the model's 10 genes .*genes the model was trained on"):
        SpaVAE.load(model_file, section[:, :5].copy())
    both, model = two_sections
    model.save(tmp_path / "two.pt")
    with pytest.raises(KeyError, match=r"adata.obs has no column 'section' with the section of each spot"):
        SpaVAE.load(tmp_path / "two.pt", section.copy())


# ---------------------------------------------------------------------- outputs
def test_save_refuses_folders_and_existing_files(trained, tmp_path):
    (tmp_path / "model.pt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"model.pt exists; pass overwrite=True to replace it"):
        trained.save(tmp_path / "model.pt")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"is a folder, not a file; give the path of the file to write"):
            trained.save(tmp_path, overwrite=overwrite)
    assert (tmp_path / "model.pt").read_text() == "keep me"
    assert folder_listing(tmp_path) == ["model.pt"]


def test_save_creates_a_missing_output_folder(trained, section, tmp_path):
    path = tmp_path / "new" / "folder" / "model.pt"
    trained.save(path)
    np.testing.assert_allclose(SpaVAE.load(path, section.copy()).get_latent_representation(),
                               trained.get_latent_representation(), rtol=1e-5, atol=1e-6)


def test_output_inside_a_file_is_refused(trained, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"a part of .*afile is a file, not a folder; choose another output path"):
        trained.save(tmp_path / "afile" / "model.pt")
    assert folder_listing(tmp_path) == ["afile"]


def test_an_unwritable_folder_is_a_permission_error(trained, tmp_path, monkeypatch):
    def refuse(*args, dir=None, **kwargs):  # what the OS answers for a folder without write permission
        raise PermissionError(13, "Permission denied", os.path.join(dir, "tmpfile"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    for write in (lambda: trained.save(tmp_path / "model.pt"), lambda: trained.write_denoised(tmp_path / "d.h5ad")):
        with pytest.raises(PermissionError, match=r"cannot write .*: no permission to write in .*; choose a writable"):
            write()
    assert folder_listing(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_a_read_only_folder_is_a_permission_error(trained, tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match=r"no permission to write in .*read_only"):
            trained.save(folder / "model.pt")
    finally:
        folder.chmod(0o700)
    assert folder_listing(folder) == []


@pytest.mark.parametrize("name,options,error,match", [
    ("denoised.csv", {}, ValueError, r"denoised.csv: the denoised layer is written to an .h5ad file; give a path"),
    ("folder.h5ad", {"overwrite": True}, ValueError, r"folder.h5ad is a folder, not a file"),
    ("exists.h5ad", {}, FileExistsError, r"exists.h5ad exists; pass overwrite=True to replace it"),
    ("new.h5ad", {"key": ""}, ValueError, r"key must be a non-empty layer name without '/', got ''"),
    ("new.h5ad", {"n_samples": 0}, ValueError, r"n_samples must be an integer >= 1, got 0"),
    ("new.h5ad", {"library_size": "raw"}, ValueError, r"library_size must be 'observed' or 'normalized', got 'raw'"),
])
def test_write_denoised_refuses_bad_paths_and_leaves_no_partial_file(trained, tmp_path, name, options, error, match):
    (tmp_path / "folder.h5ad").mkdir()
    (tmp_path / "exists.h5ad").write_text("keep me")
    with pytest.raises(error, match=match):
        trained.write_denoised(tmp_path / name, **options)
    assert folder_listing(tmp_path) == ["exists.h5ad", "folder.h5ad"]
    assert (tmp_path / "exists.h5ad").read_text() == "keep me"


# ---------------------------------------------------------------------- outputs of a trained model
def test_denoising_and_latent_arguments_are_checked(trained, section):
    cases = [
        (KeyError, r"gene\(s\) \['Actb'\] are not among the model's 10 genes", {"genes": ["gene0", "Actb"]}),
        (ValueError, r"genes= is empty; give at least one of the model's genes", {"genes": []}),
        (ValueError, r"n_samples must be an integer >= 1, got 0", {"n_samples": 0}),
        (ValueError, r"batch_size must be a positive integer, got 0", {"batch_size": 0}),
        (ValueError, r"mode must be 'full' or 'chunked', got 'exact'", {"mode": "exact"}),
        (ValueError, r"modality must be one of this model's \['genes'\]; got 'proteins'", {"modality": "proteins"}),
    ]
    for error, match, options in cases:
        with pytest.raises(error, match=match):
            trained.get_denoised_counts(**options)
    with pytest.raises(ValueError, match=r"obsm\['spatial'\]: 1 spot location\(s\) are NaN/inf"):
        trained.get_latent_representation(adata=changed(section, spatial=lambda xy: with_value(xy, np.nan)))
    with pytest.raises(ValueError, match=r"adata does not hold the spots of the model \(names or order differ\)"):
        trained.write_results(section[::-1].copy())


def test_domain_arguments_are_checked(trained, section):
    adata = section.copy()
    trained.write_results(adata, denoise=False)
    with pytest.raises(ValueError, match=r"n_domains must be 'auto' or an integer from 1 to the number of spots - 1 "
                                         r"\(29\), got 31"):
        find_domains(adata, 31, n_init=1)
    with pytest.raises(ValueError, match=r"n_domains must be 'auto' or an integer .*got 2.5"):
        find_domains(adata, 2.5, n_init=1)
    with pytest.raises(ValueError, match=r"number of clusters must be an integer .*got '2'"):
        cluster_kmeans(adata.obsm["X_spavae"], "2")
    with pytest.raises(KeyError, match=r"adata.obsm has no 'X_scvi' \(the latent; write it with model.write_results"):
        find_domains(adata, 2, use_rep="X_scvi")
    with pytest.raises(KeyError, match=r"adata.obs has no column 'truth'; columns: \['ground_truth'\]"):
        find_domains(adata, 2, truth_key="truth")
    with pytest.raises(ValueError, match=r"locations must be one x, y pair per label \(30 x 2\), got shape \(10, 2\)"):
        refine_labels(np.zeros(30, int), adata.obsm["spatial"][:10])


def test_differential_expression_arguments_are_checked(trained, section):
    adata = section.copy()
    with pytest.raises(KeyError, match=r"adata.obs has no column 'domain'; columns: \['ground_truth'\]"):
        differential_expression(adata, trained, groupby="domain", group1="0")
    with pytest.raises(KeyError, match=r"adata.obs has no column 'domain'; columns: \['ground_truth'\]"):
        rank_genes_domains(adata, trained, groupby="domain")
    with pytest.raises(ValueError, match=r"unknown group label\(s\) \['domain7'\]; the labels are \['domain0'"):
        differential_expression(adata, trained, groupby="ground_truth", group1="domain7", n_draws=10)
    with pytest.raises(ValueError, match=r"n_draws must be an integer >= 1, got 2.5"):
        differential_expression(adata, trained, groupby="ground_truth", group1="domain0", n_draws=2.5)


@pytest.mark.parametrize("spots", [[30], [-1], [0.5], np.ones(3, bool), np.zeros(30, bool)],
                         ids=["past-the-end", "negative", "float", "short-mask", "empty-mask"])
def test_denoised_samples_refuses_bad_spot_selections(trained, spots):
    with pytest.raises(ValueError, match=r"spots must be a boolean mask of length 30 or integer positions in "
                                         r"\[0, 30\), selecting at least one spot"):
        denoised_samples(trained, n_samples=2, spots=spots)


@pytest.mark.parametrize("locations,match", [
    (np.array([[np.nan, 1.0]]), r"locations contain NaN/inf values"),
    (np.array([1.0, 2.0]), r"locations must be a non-empty n x 2 array, got shape \(2,\)"),
    (np.zeros((2, 3)), r"locations must be a non-empty n x 2 array, got shape \(2, 3\)"),
    (np.zeros((0, 2)), r"locations must be a non-empty n x 2 array, got shape \(0, 2\)"),
    (np.array([["1", "2"]]), r"locations must be real numbers, got dtype <U1"),
    (np.zeros((2, 2), complex), r"locations must be real numbers, got dtype complex128"),
])
def test_predict_refuses_bad_locations(trained, locations, match):
    with pytest.raises(ValueError, match=match):
        predict(trained, locations)


def test_predict_refuses_wrong_sections(trained, two_sections):
    with pytest.raises(ValueError, match=r"fitted on a single section; give no section labels \(sections=None\)"):
        predict(trained, np.zeros((2, 2)), sections=["a", "b"])
    _, model = two_sections
    locations = np.asarray(two_sections[0].obsm["spatial"])[:2]
    with pytest.raises(ValueError, match=r"fitted on 2 sections \(section\); give the section of each spot"):
        predict_latent(model, locations)
    with pytest.raises(ValueError, match=r"unknown section\(s\) \['c'\]; the model knows \['a', 'b'\]"):
        predict(model, locations, sections=["a", "c"])
    with pytest.raises(ValueError, match=r"1 section labels for 2 locations"):
        predict(model, locations, sections=["a"])
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer, got 0"):
        predict(model, locations, sections=["a", "b"], batch_size=0)


# ---------------------------------------------------------------------- readers
def test_readers_refuse_unreadable_files(section, tmp_path):
    (tmp_path / "text.h5ad").write_text("not hdf5")
    section.write_h5ad(tmp_path / "whole.h5ad")
    (tmp_path / "cut.h5ad").write_bytes((tmp_path / "whole.h5ad").read_bytes()[:600])
    (tmp_path / "text.h5").write_text("not hdf5")
    (tmp_path / "table.csv").write_text("a,b\n")
    with h5py.File(tmp_path / "strings.h5", "w") as h5:
        h5["X"], h5["pos"] = np.array([[b"1", b"2"]] * 3), np.zeros((3, 2))
    with h5py.File(tmp_path / "complex.h5", "w") as h5:
        h5["X"], h5["pos"] = np.ones((3, 2)), np.zeros((3, 2), complex)
    cases = [
        ("missing.h5ad", FileNotFoundError, r"missing.h5ad: no such file or folder"),
        ("text.h5ad", ValueError, r"text.h5ad is not a readable .h5ad file \(truncated, damaged or another format\)"),
        ("cut.h5ad", ValueError, r"cut.h5ad is not a readable .h5ad file \(truncated, damaged or another format\)"),
        ("text.h5", ValueError, r"text.h5 is not a readable HDF5 file"),
        ("table.csv", ValueError, r"spavae cannot tell the format of .*table.csv; it reads a Space Ranger Visium"),
        ("strings.h5", ValueError, r"strings.h5:X: the counts must be an array of real numbers, got dtype \|S1"),
        ("complex.h5", ValueError, r"complex.h5:pos: the locations must be an array of real numbers, got dtype "
                                   r"complex128"),
    ]
    for name, error, match in cases:
        with pytest.raises(error, match=match):
            spavae.read(tmp_path / name)
    with pytest.raises(KeyError, match=r"whole.h5ad has no obsm\['xy'\] with spot coordinates.*spatial_key="):
        spavae.read(tmp_path / "whole.h5ad", spatial_key="xy")


def test_duplicated_gene_names_of_an_h5_file_are_made_unique(tmp_path):
    with h5py.File(tmp_path / "dup.h5", "w") as h5:
        h5["X"], h5["pos"] = np.ones((3, 2)), np.arange(6.0).reshape(3, 2)
        h5["gene"] = np.array([b"Actb", b"Actb"])
    assert list(spavae.read(tmp_path / "dup.h5").var_names) == ["Actb", "Actb-1"]


# ---------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def h5_file(section, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "section.h5"
    with h5py.File(path, "w") as h5:
        h5["X"], h5["pos"] = np.asarray(section.X), np.asarray(section.obsm["spatial"])
    return path


@pytest.fixture(scope="module")
def config_file(h5_file):
    path = h5_file.parent / "config.json"
    path.write_text(json.dumps({"data": {"path": str(h5_file)}, "save_dir": str(h5_file.parent / "runs"), "name": "r",
                                "model": {"encoder_layers": [8], "decoder_layers": [8], "n_gauss": 2},
                                "trainer": {"max_epochs": 1}}))
    return path


def assert_one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(match, err), err


@pytest.mark.parametrize("options,match", [
    (["--epochs", "0"], r"max_epochs must be an integer >= 1, got 0"),
    (["--lr", "-1"], r"lr must be a finite number > 0, got -1.0"),
    (["--device", "tpu"], r"unknown device 'tpu'"),
    (["--inducing-steps", "0"], r"inducing_steps must be a positive integer, got 0"),
])
def test_cli_run_refuses_bad_options_and_writes_nothing(capsys, h5_file, tmp_path, options, match):
    out = tmp_path / "out"
    assert_one_line_error(capsys, ["run", str(h5_file), "--out", str(out), "--n-domains", "2", "--quiet", *options],
                          match)
    assert not out.exists() or folder_listing(out) == []


def test_cli_run_refuses_unreadable_input(capsys, tmp_path):
    (tmp_path / "text.h5ad").write_text("x")
    assert_one_line_error(capsys, ["run", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "o")],
                          r"missing.h5: no such file or folder")
    assert_one_line_error(capsys, ["run", str(tmp_path / "text.h5ad"), "--out", str(tmp_path / "o")],
                          r"text.h5ad is not a readable .h5ad file")
    assert folder_listing(tmp_path / "o") == []


def test_cli_experiment_commands_refuse_bad_input(capsys, config_file, tmp_path):
    (tmp_path / "broken.json").write_text("{")
    runs = config_file.parent / "runs"
    (runs / "r").mkdir(parents=True, exist_ok=True)
    (runs / "r" / "notes.txt").write_text("an earlier run")
    cases = [
        (["train", "-c", str(tmp_path / "missing.json")], r"config file .*missing.json: no such file"),
        (["train", "-c", str(tmp_path / "broken.json")], r"broken.json: not valid JSON"),
        (["train", "-c", str(config_file), "--set", "trainer.max_epochs"], r"expected KEY.PATH=VALUE"),
        (["train", "-c", str(config_file), "--set", "trainer.max_epochs=0", "--name", "s"],
         r"trainer.max_epochs: must be >= 1, got 0"),
        (["train", "-c", str(config_file)], r"run folder .*r already exists: continue it with `spavae resume"),
        (["train", "-c", str(config_file), "--name", "t", "--log-config", str(tmp_path / "log.json")],
         r"logging config .*log.json: no such file \(--log-config\)"),
        (["resume", str(tmp_path / "nowhere")], r"nowhere is not a spavae run folder \(no checkpoint/config.json\)"),
        (["evaluate", str(tmp_path)], r"model_best.pth not found: train the run first"),
    ]
    for argv, match in cases:
        assert_one_line_error(capsys, argv, match)
    assert folder_listing(runs) == ["r"] and folder_listing(runs / "r") == ["notes.txt"]


def test_cli_resume_skips_an_unreadable_checkpoint(capsys, config_file, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "config.json").write_text(config_file.read_text())
    (run / "checkpoint" / "checkpoint-epoch1.pth").write_text("garbage")
    assert main(["resume", str(run), "--no-evaluate"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: no readable checkpoint in ")


@pytest.mark.parametrize("options,match", [
    (["--n-domains", "2", "--threads", "-1"], r"--threads must be >= 1, got -1"),
    (["--n-domains", "2", "--out", "FILE"], r"--out .*FILE is a file; give a folder"),
    (["--n-domains", "31", "--epochs", "1"], r"--n-domains must be below the number of spots \(\d+\), got 31"),
], ids=["threads", "out-is-a-file", "too-many-domains"])
def test_cli_run_refuses_bad_options_before_training(capsys, h5_file, tmp_path, options, match):
    (tmp_path / "FILE").write_text("x")
    options = [str(tmp_path / "FILE") if option == "FILE" else option for option in options]
    out = ["--out", str(tmp_path / "o")] if "--out" not in options else []
    assert_one_line_error(capsys, ["run", str(h5_file), "--quiet", *out, *options], match)
