"""The shared DLPFC sections: both load, and a few epochs of training run on one."""

import numpy as np
import pytest

import spavae
from spavae.analysis import cluster_kmeans, refine_labels, score_clustering

from conftest import dlpfc_path

EXPECTED = {"151507": (4226, 1159, {"Layer1": 817, "WM": 354, "NA": 5}),
            "151510": (4634, 1011, {"Layer1": 1180, "WM": 184, "NA": 39})}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_both_sections_load(name):
    adata = spavae.read_spavae_h5(dlpfc_path(name))
    n_spots, n_genes, counts = EXPECTED[name]
    assert adata.shape == (n_spots, n_genes)
    assert adata.obsm["spatial"].shape == (n_spots, 2)
    labels = adata.obs["ground_truth"].value_counts()
    for label, count in counts.items():
        assert labels[label] == count
    assert adata.var_names[0].startswith("ENSG") and adata.obs_names[0].endswith("-1")


@pytest.mark.slow
def test_a_few_epochs_on_151507():
    adata = spavae.read_spavae_h5(dlpfc_path("151507"))
    model = spavae.SpaVAE(adata, device="cpu").train(max_epochs=3, progress=False)
    assert len(model.history) == 3
    assert model.history["train_loss"].iloc[-1] < model.history["train_loss"].iloc[0]
    latent = model.get_latent_representation()
    assert latent.shape == (4226, 10) and np.isfinite(latent).all()
    labels = cluster_kmeans(latent, 7, n_init=3)
    scores = score_clustering(adata.obs["ground_truth"], refine_labels(labels, adata.obsm["spatial"]))
    assert scores["n_scored"] == 4221 and 0 <= scores["nmi"] <= 1
