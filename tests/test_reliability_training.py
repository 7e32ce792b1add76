"""Reliability of the training loop and the data checks (review items of issue 10 that live in the core)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import spavae
from spavae.train import MIN_STEPS_PER_EPOCH, Trainer

SMALL = {"encoder_layers": (16,), "decoder_layers": (16,), "device": "cpu"}


def scripted_validation(trainer, monkeypatch, losses):
    """Replace the validation loss by ``losses`` and keep a snapshot of the weights after each epoch."""
    real, values, snapshots = trainer._validate, iter(losses), []

    def validate():
        out = real()
        snapshots.append({k: v.clone() for k, v in trainer.module.state_dict().items()})
        return out | {"loss": next(values)}

    monkeypatch.setattr(trainer, "_validate", validate)
    return snapshots


def assert_weights(module, expected):
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


def test_best_weights_are_restored_when_max_epochs_is_reached(small_adata, monkeypatch):
    """Item 4: before, only an early stop restored the best weights."""
    model = spavae.SpaVAE(small_adata, seed=0, **SMALL)
    trainer = Trainer(model.module, model.data, patience=50, generator=torch.Generator().manual_seed(0))
    snapshots = scripted_validation(trainer, monkeypatch, [5.0, 3.0, 4.0, 6.0])
    trainer.fit(4, progress=False)
    assert trainer.state.stop_reason is None and trainer.state.best_epoch == 2
    assert_weights(model.module, snapshots[1])


def test_resuming_a_finished_checkpoint_gives_the_best_weights(small_adata, monkeypatch):
    """Item 4: train(resume=...) on a finished run kept its last weights."""
    model = spavae.SpaVAE(small_adata, seed=0, **SMALL)
    model.train(max_epochs=4, progress=False)
    state = model.trainer.state_dict()
    best_epoch = model.trainer.state.best_epoch
    state = {k: v for k, v in state.items()}
    state["module"] = {k: v + 1.0 if v.is_floating_point() else v for k, v in state["module"].items()}  # "last"
    resumed = spavae.SpaVAE(small_adata, seed=0, **SMALL).train(max_epochs=4, progress=False, resume=state)
    assert resumed.trainer.state.best_epoch == best_epoch
    assert_weights(resumed.module, model.trainer.state.best_state)


def test_cholesky_failure_ends_the_run_cleanly_with_the_best_weights(small_adata, monkeypatch):
    """Item 5: a failed Cholesky escaped fit() and left model.trainer unset."""
    model = spavae.SpaVAE(small_adata, seed=0, **SMALL)
    strategy = model.module.gp.variational_strategy
    real, training_calls = strategy.condition_on_statistics, []

    def failing(*args, **kwargs):
        if model.module.training:
            training_calls.append(1)
            if len(training_calls) > 2 * MIN_STEPS_PER_EPOCH:  # 256 spots at batch 128: one batch per pass, so an
                # epoch is MIN_STEPS_PER_EPOCH steps and this is the first step of epoch 3
                raise torch.linalg.LinAlgError("linalg.cholesky: The factorization could not be completed")
        return real(*args, **kwargs)

    monkeypatch.setattr(strategy, "condition_on_statistics", failing)
    with pytest.warns(RuntimeWarning, match=r"Cholesky factorisation failed .* in epoch 3; kept the weights of epoch "
                                            r"[12]\. .*fewer inducing points"):
        model.train(max_epochs=6, progress=False)
    assert model.trainer.state.stop_reason.startswith("the GP's Cholesky factorisation failed")
    assert len(model.history) == 2 and model.is_trained
    assert_weights(model.module, model.trainer.state.best_state)
    assert np.isfinite(model.get_latent_representation()).all()


def test_nan_validation_loss_is_not_recorded_and_names_its_epoch(small_adata, monkeypatch):
    """Item 11: a NaN validation loss was appended to the history and the message named the wrong epoch."""
    model = spavae.SpaVAE(small_adata, seed=0, **SMALL)
    trainer = Trainer(model.module, model.data, patience=50, generator=torch.Generator().manual_seed(0))
    snapshots = scripted_validation(trainer, monkeypatch, [5.0, 4.0, float("nan")])
    with pytest.warns(RuntimeWarning, match="validation loss became NaN/inf in epoch 3; kept the weights of epoch 2"):
        trainer.fit(5, progress=False)
    assert len(trainer.state.history) == 2
    assert all(np.isfinite(r["val_loss"]) for r in trainer.state.history)
    assert_weights(model.module, snapshots[1])


@pytest.mark.parametrize("n_rows, n_cols, train_size, n_validation", [(10, 2, 0.95, 0), (6, 5, 0.97, 0),
                                                                     (8, 5, 0.95, 2)])
def test_a_single_validation_spot_is_not_wasted(n_rows, n_cols, train_size, n_validation):
    """Item 11: when the split left one validation spot, that spot was used for neither training nor validation."""
    adata = spavae.simulate_spatial_counts(n_rows=n_rows, n_cols=n_cols, n_genes=12, seed=0, mean_count=3.0)
    assert adata.n_obs == n_rows * n_cols and (np.asarray(adata.X.sum(1)).ravel() > 0).all()
    model = spavae.SpaVAE(adata, seed=0, **SMALL).train(max_epochs=2, train_size=train_size, progress=False)
    assert len(model.trainer.val_index) == n_validation
    assert len(model.trainer.train_index) == adata.n_obs - n_validation
    assert ("val_loss" in model.history) == (n_validation > 0)


def test_inducing_points_never_pass_through_float32(small_adata):
    """Item 12: 20/6 became 3.3333332538604736."""
    model = spavae.SpaVAE(small_adata, seed=0, inducing="grid", inducing_steps=6, location_frame="minmax", **SMALL)
    points = model.module.gp.variational_strategy.inducing_points
    assert points.dtype == torch.float64
    assert float(points[:, 1].unique()[1]) == 20.0 / 6


def counts_adata(matrix, n_spots=None):
    matrix = np.asarray(matrix, dtype=np.float64)
    adata = ad.AnnData(matrix)
    adata.obsm["spatial"] = np.random.default_rng(0).uniform(0, 10, (matrix.shape[0], 2))
    return adata


def test_non_integer_counts_are_refused_at_construction_with_the_fix():
    """Item 1: non-integer counts were 'allowed' and then died inside torch's distribution checks."""
    values = np.random.default_rng(0).poisson(3.0, (40, 6)).astype(float) + 1
    values[7, 2] = 2.5
    with pytest.raises(ValueError, match=r"counts must be integers \(e.g. 2.5 at row 7, column 2\).*layer='counts'"):
        spavae.SpaVAE(counts_adata(values))
    sparse = counts_adata(values)
    sparse.X = sp.csr_matrix(values)
    with pytest.raises(ValueError, match="counts must be integers"):
        spavae.SpaVAE(sparse)
    rounded = counts_adata(np.rint(values))
    assert spavae.SpaVAE(rounded, **SMALL).data.counts.shape == (40, 6)


def test_filter_empty_follows_the_layer_the_error_names():
    """Item 9: filter_empty looked only at .X while the error recommending it could come from layer=."""
    rng = np.random.default_rng(0)
    raw = rng.poisson(3.0, (30, 5)).astype(float) + 1
    raw[:, 3] = 0
    adata = counts_adata(rng.poisson(3.0, (30, 5)) + 1)  # .X has no empty gene
    adata.layers["counts"] = raw
    with pytest.raises(ValueError, match=r"1 gene\(s\) with zero total count.*filter_empty\(adata, layer='counts'\)"):
        spavae.SpaVAE(adata, layer="counts")
    with pytest.warns(UserWarning, match="removed 1 gene"):
        filtered = spavae.data.filter_empty(adata, layer="counts")
    assert filtered.n_vars == 4 and "3" not in filtered.var_names
    assert spavae.SpaVAE(filtered, layer="counts", **SMALL).data.counts.shape == (30, 4)


@pytest.mark.parametrize("shape, message", [((8, 10), "8 spots; spavae needs at least 20"),
                                            ((40, 1), "1 gene\\(s\\); spavae needs at least 2")])
def test_tiny_inputs_are_refused(shape, message):
    """Item 10: 8 spots or a single gene trained and wrote results without a word."""
    values = np.random.default_rng(0).poisson(3.0, shape) + 1
    with pytest.raises(ValueError, match=message):
        spavae.SpaVAE(counts_adata(values))
