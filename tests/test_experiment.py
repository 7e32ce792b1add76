"""Experiment runs through the CLI: layout, TensorBoard events, figures, exact resume, a SIGKILL and a resume."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import KNeighborsClassifier
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import spavae
from spavae.cli import build_parser, main
from spavae.experiment import knn_accuracy, location_only_latents
from spavae.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
TAGS = ["train/total", "train/nb", "train/kl_gp", "train/kl_gauss", "train/noise", "validation/total",
        "validation/nb", "validation/kl_gp", "validation/kl_gauss", "validation/noise", "beta", "lr", "kernel_scale"]


@pytest.fixture
def config_file(tmp_path, small_adata):
    """A tiny experiment config on a spaVAE-layout .h5 file of the small simulated section."""
    data = tmp_path / "section.h5"
    with h5py.File(data, "w") as h5:
        h5["X"] = small_adata.X
        h5["pos"] = small_adata.obsm["spatial"]
        h5["Y"] = np.array([s.encode() for s in small_adata.obs["ground_truth"]])
    config = {"name": "tiny", "save_dir": str(tmp_path / "experiments"),
              "data": {"path": str(data), "test_size": 0.1},
              "model": {"encoder_layers": [16, 8], "decoder_layers": [16], "noise": 0.1},
              "optimizer": {"lr": 5e-3},
              "scheduler": {"type": "plateau", "patience": 1},
              "trainer": {"max_epochs": 4, "patience": 1000, "checkpoint_every": 2, "threads": 1, "progress": False},
              "evaluation": {"kmeans_n_init": 2, "denoise_samples": 2, "n_marker_genes": 2}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_help_explains_every_option(capsys):
    for command, options in (("train", ["--config", "--log-config", "--data", "--name", "--seed", "--set",
                                        "--overwrite", "--no-evaluate", "--threads", "--quiet"]),
                             ("resume", ["RUN_DIR", "--log-config", "--no-evaluate"]),
                             ("evaluate", ["RUN_DIR", "--log-config"])):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = capsys.readouterr().out
        for option in options:
            assert option in text, (command, option)


def test_train_evaluate_resume_through_the_cli(config_file, tmp_path, capsys):
    assert main(["train", "-c", str(config_file)]) == 0
    run = tmp_path / "experiments" / "tiny"
    names = {p.name for p in (run / "checkpoint").iterdir()}
    assert names == {"config.json", "split.json", "model_best.pth", "checkpoint-epoch2.pth", "checkpoint-epoch4.pth"}
    saved = json.loads((run / "checkpoint" / "config.json").read_text())
    assert saved["data"]["path"] == str(tmp_path / "section.h5") and saved["model"]["noise"] == 0.1
    assert len(json.loads((run / "checkpoint" / "split.json").read_text())["test_spots"]) == 26  # 10% of 256

    # the best model is a SpaVAE file, trained on the 230 training spots only
    best = torch.load(run / "checkpoint" / "model_best.pth", weights_only=False)
    assert best["n_spots"] == 230 and best["is_trained"]
    history = pd.read_csv(run / "log" / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3, 4]
    assert len(best["history"]["epoch"]) == int(history["val_loss"].idxmin()) + 1
    log = (run / "log" / "train.log").read_text()
    assert re.search(r"epoch 4: step \d+, train_loss", log) and "saved checkpoint-epoch4.pth" in log

    events = scalars(run / "log")
    assert set(TAGS) <= set(events)
    assert [step for step, _ in events["validation/total"]] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in events["validation/total"]], history["val_loss"], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in events["beta"]], history["beta"], rtol=1e-6)

    metrics = json.loads((run / "results" / "metrics.json").read_text())
    assert metrics["n_test"] == 26 and metrics["test"]["n_scored"] == 26 and metrics["all"]["n_scored"] == 256
    domains = pd.read_csv(run / "results" / "domains.csv", index_col=0)
    test = domains["test"].to_numpy()
    assert metrics["test"]["ari"] == round(adjusted_rand_score(domains["truth"][test], domains["domain"][test]), 4)
    assert "knn_accuracy" not in metrics  # two protocols, named apart
    adata = spavae.read(tmp_path / "section.h5")
    truth = adata.obs["ground_truth"].astype(str).to_numpy()
    train_latent, test_latent = location_only_latents(run / "checkpoint" / "model_best.pth", adata, test)
    for key, (fit, predict) in (("knn_accuracy_location_only", (train_latent, test_latent)),
                                ("knn_accuracy_with_expression", (latent_of(run)[~test], latent_of(run)[test]))):
        knn = KNeighborsClassifier(n_neighbors=11).fit(fit, truth[~test])
        assert metrics[key] == round(float((knn.predict(predict) == truth[test]).mean()), 4), key
    latent = latent_of(run)
    assert latent.shape == (256, 10) and np.isfinite(latent).all()
    for figure in ("domains.png", "umap.png", "markers.png", "training.png"):
        content = (run / "results" / figure).read_bytes()
        assert content[:4] == b"\x89PNG" and len(content) > 5000, figure

    # evaluate again, resume a finished run (nothing to train), refuse to overwrite silently
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == metrics
    assert main(["resume", str(run), "--no-evaluate"]) == 0
    assert "already finished at epoch 4" in (run / "log" / "train.log").read_text()
    assert {p.name for p in (run / "checkpoint").glob("checkpoint-*")} == {"checkpoint-epoch2.pth",
                                                                           "checkpoint-epoch4.pth"}
    assert main(["train", "-c", str(config_file)]) == 2
    assert "already exists" in capsys.readouterr().err


def latent_of(run: Path) -> np.ndarray:
    """The all-spots latent that evaluate wrote."""
    return pd.read_csv(run / "results" / "latent.csv", index_col=0).to_numpy()


def test_location_only_latents_never_read_the_test_expression(small_adata, tmp_path):
    test = np.zeros(small_adata.n_obs, dtype=bool)
    test[np.random.default_rng(0).permutation(small_adata.n_obs)[:26]] = True
    model = spavae.SpaVAE(small_adata[~test].copy(), device="cpu", encoder_layers=(16, 8), decoder_layers=(16,))
    model.train(max_epochs=3, progress=False).save(tmp_path / "model.pth")
    noisy = small_adata.copy()
    noisy.X[test] = np.random.default_rng(1).poisson(5.0, size=(26, small_adata.n_vars)) + 1.0
    train_latent, test_latent = location_only_latents(tmp_path / "model.pth", small_adata, test, device="cpu")
    noisy_train, noisy_test = location_only_latents(tmp_path / "model.pth", noisy, test, device="cpu")
    np.testing.assert_array_equal(noisy_train, train_latent)
    np.testing.assert_array_equal(noisy_test, test_latent)
    np.testing.assert_allclose(train_latent, model.get_latent_representation(), rtol=1e-6)  # the training spots only
    truth = small_adata.obs["ground_truth"].astype(str).to_numpy()
    assert knn_accuracy(noisy_train, truth[~test], noisy_test, truth[test]) == \
        knn_accuracy(train_latent, truth[~test], test_latent, truth[test])
    # the all-spots embedding does read the test spots' expression: there the noise moves their latents
    embedded = spavae.SpaVAE.load(tmp_path / "model.pth", small_adata, device="cpu").get_latent_representation()
    noisy_embedded = spavae.SpaVAE.load(tmp_path / "model.pth", noisy, device="cpu").get_latent_representation()
    assert np.abs(noisy_embedded[test] - embedded[test]).max() > 0.1
    with pytest.raises(ValueError, match="at least one test and one training spot"):
        location_only_latents(tmp_path / "model.pth", small_adata, np.zeros(small_adata.n_obs, dtype=bool))


def test_cli_errors_are_clear(config_file, tmp_path, capsys):
    assert main(["train", "-c", str(config_file), "--set", "model.kernel=rbf"]) == 2
    assert "model.kernel: expected one of 'cauchy', 'eq', got 'rbf'" in capsys.readouterr().err
    assert main(["resume", str(tmp_path)]) == 2
    assert "not a spavae run folder" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "model_best.pth not found" in capsys.readouterr().err


def _fit_and_snapshot(adata, epochs, snapshot_at=None, resume=None):
    model = spavae.SpaVAE(adata, device="cpu", encoder_layers=(16, 8), decoder_layers=(16,), seed=3)
    snapshot = {}

    def keep(trainer: Trainer, record: dict) -> None:
        if record["epoch"] == snapshot_at:
            buffer = io.BytesIO()
            torch.save(trainer.state_dict(), buffer)
            snapshot["state"] = buffer.getvalue()

    model.train(max_epochs=epochs, progress=False, noise=0.2, lr_scheduler={"factor": 0.5, "patience": 0, "threshold": 0.5},
                callbacks=[keep], resume=None if resume is None else torch.load(io.BytesIO(resume), weights_only=False))
    return model, snapshot.get("state")


def test_trainer_state_dict_resumes_exactly(small_adata):
    straight, state = _fit_and_snapshot(small_adata, 4, snapshot_at=2)
    resumed, _ = _fit_and_snapshot(small_adata, 4, resume=state)
    columns = [c for c in straight.history if c != "seconds"]
    pd.testing.assert_frame_equal(straight.history[columns], resumed.history[columns])
    assert straight.history["lr"].nunique() > 1  # the scheduler acted and its state was restored too
    for key, value in straight.module.state_dict().items():
        torch.testing.assert_close(value, resumed.module.state_dict()[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="differ in having a learning-rate scheduler"):
        model = spavae.SpaVAE(small_adata, device="cpu", encoder_layers=(16, 8), decoder_layers=(16,), seed=3)
        model.train(max_epochs=4, progress=False, resume=torch.load(io.BytesIO(state), weights_only=False))


def test_sigkill_then_resume_matches_an_uninterrupted_run(config_file, tmp_path):
    epochs = 40
    common = ["--no-evaluate", "--set", f"trainer.max_epochs={epochs}", "--set", "trainer.checkpoint_every=4"]
    process = subprocess.Popen([sys.executable, "-m", "spavae", "train", "-c", str(config_file), *common],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    run = tmp_path / "experiments" / "tiny"
    deadline = time.monotonic() + 120
    while not (run / "checkpoint" / "checkpoint-epoch4.pth").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    left = sorted(int(p.stem.split("epoch")[1]) for p in (run / "checkpoint").glob("checkpoint-epoch*.pth"))
    assert left and left[-1] < epochs
    for epoch in left:  # every checkpoint the kill left behind is complete
        assert torch.load(run / "checkpoint" / f"checkpoint-epoch{epoch}.pth", weights_only=False)["epoch"] == epoch

    assert main(["resume", str(run), "--no-evaluate"]) == 0
    resumed = pd.read_csv(run / "log" / "history.csv")
    assert list(resumed["epoch"]) == list(range(1, epochs + 1))
    assert [step for step, _ in scalars(run / "log")["train/total"]] == list(range(1, epochs + 1))

    assert main(["train", "-c", str(config_file), "--name", "straight", *common]) == 0
    straight = pd.read_csv(tmp_path / "experiments" / "straight" / "log" / "history.csv")
    columns = [c for c in straight if c != "seconds"]
    pd.testing.assert_frame_equal(straight[columns], resumed[columns])
