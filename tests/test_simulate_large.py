"""The large sparse section simulator: layout, domains, count model, chunking, memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.spatial import cKDTree

from spavae.data.simulate import simulate_large_section, simulate_many_genes_section, tissue_lattice


@pytest.fixture(scope="module")
def section():
    return simulate_large_section(6000, 300, n_domain_genes=60, density=0.1, seed=3, chunk_size=1000)


def test_output_layout_and_types(section):
    counts = section.X
    assert isinstance(counts, sp.csr_matrix) and counts.shape == (6000, 300)
    assert counts.dtype == np.float32 and counts.indices.dtype == np.int32 and counts.indptr.dtype == np.int32
    assert counts.has_sorted_indices and counts.has_canonical_format
    assert np.all(counts.data >= 1) and np.all(counts.data == np.round(counts.data))
    assert section.obsm["spatial"].dtype == np.float64 and section.obsm["spatial"].shape == (6000, 2)
    assert list(section.obs["ground_truth"].cat.categories) == [f"domain{d}" for d in range(5)]
    assert section.var["is_domain_gene"].sum() == 60
    assert abs(counts.nnz / (6000 * 300) - 0.1) < 0.01
    assert section.uns["simulation"]["density"] == counts.nnz / (6000 * 300)


@pytest.mark.parametrize("lattice", ["hex", "square"])
def test_lattice_has_unit_spacing_and_an_irregular_tissue_outline(lattice):
    locations = tissue_lattice(5000, lattice=lattice, seed=1)
    assert locations.shape == (5000, 2) and len(np.unique(locations, axis=0)) == 5000
    distance, _ = cKDTree(locations).query(locations, k=2)
    np.testing.assert_allclose(distance[:, 1], 1.0, atol=1e-9)
    # neither a rectangle nor a disc: the bounding box is only partly filled, and the outline is not round
    box = np.ptp(locations, axis=0)
    area_per_spot = np.sqrt(3) / 2 if lattice == "hex" else 1.0
    fill = 5000 * area_per_spot / np.prod(box)
    assert 0.6 < fill < 0.95
    centred = locations - locations.mean(0)
    radius = np.hypot(*centred.T)
    edge = np.sort(radius)[-200:]
    assert edge.std() / edge.mean() > 0.01


def test_domains_keep_their_share_of_the_section_at_any_size():
    shares = []
    for n_spots in (2000, 40_000):
        adata = simulate_large_section(n_spots, 20, seed=5, density=0.2)
        shares.append(adata.obs["ground_truth"].value_counts(normalize=True).sort_index().to_numpy())
        unit = (adata.obsm["spatial"] - adata.obsm["spatial"].min(0)) / np.ptp(adata.obsm["spatial"], axis=0)
        # layers: each domain spans the width and is contiguous in depth (mean height ordered by label)
        heights = [unit[adata.obs["ground_truth"] == d, 1].mean() for d in adata.obs["ground_truth"].cat.categories]
        assert np.all(np.diff(heights) > 0)
    np.testing.assert_allclose(shares[0], shares[1], atol=0.02)
    assert shares[0].min() > 0.05


@pytest.mark.parametrize("dispersion", [3.0, None])
def test_counts_follow_the_planted_means(dispersion):
    adata = simulate_large_section(8000, 40, n_domain_genes=20, density=0.3, dispersion=dispersion,
                                   field_lfc=0.5, seed=7, chunk_size=1500)
    domains = adata.obs["ground_truth"].cat.codes.to_numpy()
    log_mean = (np.log(adata.var["mean_expression"].to_numpy())
                + adata.varm["domain_effect"].T[domains]
                + np.outer(adata.obsm["true_field"][:, 0], adata.var["field_loading"].to_numpy()))
    mean = adata.obs["library_size"].to_numpy()[:, None] * np.exp(log_mean)
    counts = adata.X.toarray()
    if dispersion is None:
        variance, zero = mean, np.exp(-mean)
    else:
        variance, zero = mean + mean**2 / dispersion, (1 + mean / dispersion) ** -dispersion
    # summed counts per gene and domain, and zeros per gene, against their expectations (4.5 standard errors)
    one_hot = np.eye(5)[domains].T
    count_z = (one_hot @ counts - one_hot @ mean) / np.sqrt(one_hot @ variance)
    zero_z = ((counts == 0).sum(0) - zero.sum(0)) / np.sqrt((zero * (1 - zero)).sum(0))
    assert np.abs(count_z).max() < 4.5 and np.abs(zero_z).max() < 4.5
    assert abs(adata.uns["simulation"]["density"] - 0.3) < 0.02
    # the domains really differ: a domain gene's library-normalised mean is higher in its domain than elsewhere
    effect = adata.varm["domain_effect"]
    normalised = counts / adata.obs["library_size"].to_numpy()[:, None]
    for gene in np.flatnonzero(adata.var["is_domain_gene"])[:5]:
        home = domains == np.argmax(effect[gene])
        assert normalised[home, gene].mean() > 1.5 * normalised[~home, gene].mean()


def test_same_seed_same_data_whatever_the_chunk_size():
    for n_genes in (30, 31):  # an odd number of genes splits 64-bit draws across spots
        whole = simulate_large_section(700, n_genes, seed=11, chunk_size=700, field_lfc=0.3)
        chunked = simulate_large_section(700, n_genes, seed=11, chunk_size=37, field_lfc=0.3)
        assert (whole.X != chunked.X).nnz == 0
        np.testing.assert_array_equal(whole.obsm["spatial"], chunked.obsm["spatial"])
    assert (simulate_large_section(700, 31, seed=12).X != whole.X).nnz > 0


def test_many_genes_mode_has_few_domain_genes_among_many():
    adata = simulate_many_genes_section(n_spots=300, seed=2)
    assert adata.shape == (300, 10_000) and adata.var["is_domain_gene"].sum() == 300
    assert (adata.varm["domain_effect"][~adata.var["is_domain_gene"].to_numpy()] == 0).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"lattice": "triangle"}, "lattice"),
    ({"density": 1.0}, "density"),
    ({"n_domain_genes": 500}, "n_domain_genes"),
    ({"n_domains": 1}, "n_domains"),
    ({"dispersion": 0.0}, "dispersion"),
])
def test_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate_large_section(500, 100, **kwargs)
    with pytest.raises(ValueError, match="n_spots"):
        simulate_large_section(50, 100)


def test_memory_stays_near_the_sparse_matrix():
    """Peak memory of a 20,000 x 2,000 section (dense: 160 MB in float32) stays near its 16 MB CSR matrix."""
    script = (
        "import json, resource\n"
        "from spavae.data.simulate import simulate_large_section\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "adata = simulate_large_section(20_000, 2000, density=0.05, chunk_size=1000, seed=0)\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "X = adata.X\n"
        "print(json.dumps({'grown_mb': (after - before) / 1024,\n"
        "                  'matrix_mb': (X.data.nbytes + X.indices.nbytes + X.indptr.nbytes) / 2**20}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert 12 < measured["matrix_mb"] < 20
    assert measured["grown_mb"] < 110, measured  # a dense float32 copy alone would add 160 MB
