"""The shared DLPFC sections: both load, their Visium array coordinates map to a hexagonal lattice, and a few
epochs of training on one already separate the layers."""

import numpy as np
import pytest
from scipy.spatial import cKDTree

import spavae
from spavae.analysis import cluster_kmeans, refine_labels, score_clustering, visium_array_to_xy

from conftest import dlpfc_path

EXPECTED = {"151507": (4226, 1159, {"Layer1": 817, "WM": 354, "NA": 5}),
            "151510": (4634, 1011, {"Layer1": 1180, "WM": 184, "NA": 39})}
HEX_OFFSETS = {(0, 2), (0, -2), (1, 1), (1, -1), (-1, 1), (-1, -1)}  # (array_row, array_col) of the six neighbours


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


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_lattice_neighbours_are_the_six_hexagonal_neighbours(name):
    array = spavae.read_spavae_h5(dlpfc_path(name)).obsm["spatial"].astype(int)
    lattice = visium_array_to_xy(array)
    distance, index = cKDTree(lattice).query(lattice, k=7)
    interior = np.isclose(distance[:, 1:], 2.0).all(1)  # spots whose six nearest spots are all one step away
    assert interior.mean() > 0.9
    for spot in np.flatnonzero(interior)[::50]:
        assert {tuple(o) for o in array[index[spot, 1:]] - array[spot]} == HEX_OFFSETS
    # in raw array coordinates the nearest spots are not the hexagonal neighbours: (r, c +- 2) ties with (r +- 2, c)
    _, raw_index = cKDTree(array).query(array, k=7)
    spot = np.flatnonzero(interior)[0]
    assert {tuple(o) for o in array[raw_index[spot, 1:]] - array[spot]} != HEX_OFFSETS


@pytest.mark.slow
def test_a_few_epochs_on_151507():
    adata = spavae.read_spavae_h5(dlpfc_path("151507"))
    model = spavae.SpaVAE(adata, device="cpu").train(max_epochs=3, progress=False)
    assert len(model.history) == 3
    assert model.history["train_loss"].iloc[-1] < model.history["train_loss"].iloc[0]
    latent = model.get_latent_representation()
    assert latent.shape == (4226, 10) and np.isfinite(latent).all()
    labels = cluster_kmeans(latent, 7, n_init=3)
    refined = refine_labels(labels, visium_array_to_xy(adata.obsm["spatial"]))
    scores = score_clustering(adata.obs["ground_truth"], refined)
    chance = score_clustering(adata.obs["ground_truth"], np.random.default_rng(0).permutation(refined))
    # 3 epochs give NMI 0.64-0.68 and ARI 0.41-0.53 (seeds 0, 1); shuffled labels score below 0.01
    assert scores["n_scored"] == 4221 and scores["nmi"] > 0.4 and scores["ari"] > 0.2, scores
    assert chance["nmi"] < 0.05, chance
