"""Seurat v3 highly variable genes: the loess, the chunked passes, input kinds, scanpy parity, planted genes."""

from __future__ import annotations

import warnings

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from spavae.data.genes import highly_variable_genes, loess_fit
from spavae.data.simulate import simulate_many_genes_section


def _counts(n_spots: int = 300, n_genes: int = 400, seed: int = 0) -> np.ndarray:
    """NB counts with gene means over three orders of magnitude, a fifth of the genes overdispersed, 3 empty."""
    rng = np.random.default_rng(seed)
    mean = np.exp(rng.normal(-1.0, 1.5, size=n_genes)) * rng.lognormal(0, 0.3, size=(n_spots, 1))
    mean = mean * np.exp(rng.normal(0, 0.8, size=(n_spots, n_genes)) * (rng.random(n_genes) < 0.2))
    counts = rng.negative_binomial(3, 3 / (3 + mean)).astype(np.float32)
    counts[:, :3] = 0
    return counts


def _brute_force_loess(x: np.ndarray, y: np.ndarray, span: float) -> np.ndarray:
    """Direct loess: at every point, a weighted least-squares quadratic over all points (tricube weights)."""
    n_neighbours = int(np.floor(len(x) * span))
    fitted = np.empty(len(x))
    for i, x0 in enumerate(x):
        distance = np.abs(x - x0)
        radius = np.sort(distance)[n_neighbours - 1]
        root_weight = np.sqrt(np.clip(1 - (distance / radius) ** 3, 0, None) ** 3)
        design = np.column_stack([np.ones_like(x), x - x0, (x - x0) ** 2]) * root_weight[:, None]
        fitted[i] = np.linalg.lstsq(design, y * root_weight, rcond=None)[0][0]
    return fitted


def _reference_hvg(counts: np.ndarray, n_top_genes: int) -> pd.DataFrame:
    """Seurat v3 written out on the dense matrix in one go."""
    n_spots = counts.shape[0]
    mean, variance = counts.mean(0, dtype=np.float64), counts.var(0, ddof=1, dtype=np.float64)
    log_expected = np.zeros(counts.shape[1])
    varying = variance > 0
    log_expected[varying] = loess_fit(np.log10(mean[varying]), np.log10(variance[varying]), span=0.3)
    sd = np.sqrt(10**log_expected)
    standardised = np.minimum((counts - mean) / sd, np.sqrt(n_spots))
    variance_norm = (standardised**2).sum(0) / (n_spots - 1)
    top = np.argsort(-variance_norm, kind="stable")[:n_top_genes]
    return pd.DataFrame({"means": mean, "variances": variance, "variances_norm": variance_norm,
                         "highly_variable": np.isin(np.arange(counts.shape[1]), top)})


class RowSliceRecorder:
    """A matrix that only offers ``shape`` and row slicing, and records the slices it was asked for."""

    def __init__(self, matrix):
        self.matrix = matrix
        self.shape = matrix.shape
        self.requests: list[int] = []

    def __getitem__(self, rows: slice):
        self.requests.append(rows.stop - rows.start)
        return self.matrix[rows]


@pytest.mark.parametrize("ties", [False, True])
def test_direct_loess_matches_a_brute_force_weighted_least_squares(ties):
    rng = np.random.default_rng(1)
    x = rng.normal(size=120)
    x = np.round(x, 1) if ties else x
    y = np.sin(x) + rng.normal(scale=0.2, size=120)
    np.testing.assert_allclose(loess_fit(x, y, span=0.3, surface="direct"), _brute_force_loess(x, y, 0.3),
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("decimals", [None, 1, 2])
@pytest.mark.parametrize("surface", ["interpolate", "direct"])
def test_loess_matches_scikit_misc(surface, decimals):
    loess = pytest.importorskip("skmisc.loess").loess
    rng = np.random.default_rng(2)
    x = rng.normal(-1.0, 1.2, size=2000)
    x = x if decimals is None else np.round(x, decimals)
    y = 0.4 * x + 0.1 * x**2 + rng.normal(scale=0.3, size=2000)
    model = loess(x, y, span=0.3, degree=2, surface=surface)
    model.fit()
    np.testing.assert_allclose(loess_fit(x, y, span=0.3, surface=surface), model.outputs.fitted_values,
                               rtol=0, atol=1e-9)


def test_interpolated_loess_is_close_to_the_direct_fit():
    rng = np.random.default_rng(3)
    x = rng.uniform(-3, 1, size=5000)
    y = 1.2 * x + 0.1 * x**2 + rng.normal(scale=0.2, size=5000)
    direct, interpolated = loess_fit(x, y, surface="direct"), loess_fit(x, y)
    assert np.abs(direct - interpolated).max() < 0.01
    assert np.abs(direct - interpolated).max() > 0  # really two computations


def test_loess_rejects_unusable_input():
    with pytest.raises(ValueError, match="finite"):
        loess_fit(np.array([0.0, np.inf, 1.0, 2.0]), np.zeros(4))
    with pytest.raises(ValueError, match="at least"):
        loess_fit(np.arange(5.0), np.arange(5.0))
    with pytest.raises(ValueError, match="surface"):
        loess_fit(np.arange(50.0), np.arange(50.0), surface="kd")


def test_matches_a_dense_one_pass_reimplementation():
    counts = _counts()
    result = highly_variable_genes(counts, n_top_genes=60, chunk_size=64)
    reference = _reference_hvg(counts, 60)
    for column in ("means", "variances", "variances_norm"):
        np.testing.assert_allclose(result[column], reference[column], rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(result["highly_variable"], reference["highly_variable"])
    assert result["highly_variable"].sum() == 60
    ranks = result["highly_variable_rank"].to_numpy()
    np.testing.assert_array_equal(np.sort(ranks[result["highly_variable"]]), np.arange(60))
    assert np.isnan(ranks[~result["highly_variable"]]).all()
    assert result["variances_norm"].to_numpy()[:3].tolist() == [0.0, 0.0, 0.0]  # empty genes


def test_chunked_sparse_dense_and_on_disk_agree(tmp_path):
    counts = _counts(seed=4)
    whole = highly_variable_genes(counts, n_top_genes=50, chunk_size=len(counts))
    path = tmp_path / "counts.h5"
    with h5py.File(path, "w") as handle:
        handle["X"] = counts
    with h5py.File(path, "r") as handle:
        on_disk = highly_variable_genes(handle["X"], n_top_genes=50, chunk_size=100)
    for other in (highly_variable_genes(counts, n_top_genes=50, chunk_size=1),
                  highly_variable_genes(counts, n_top_genes=50, chunk_size=37),
                  highly_variable_genes(sp.csr_matrix(counts), n_top_genes=50, chunk_size=37),
                  highly_variable_genes(sp.csc_matrix(counts), n_top_genes=50),
                  on_disk):
        pd.testing.assert_frame_equal(other, whole, check_exact=False, rtol=1e-12)


def test_reads_only_row_chunks_and_keeps_them_sparse():
    counts = sp.csr_matrix(_counts(n_spots=250, seed=5))
    recorder = RowSliceRecorder(counts)
    highly_variable_genes(recorder, n_top_genes=20, chunk_size=60)
    assert recorder.requests == [60, 60, 60, 60, 10] * 2  # two passes, never more than a chunk


def test_matches_scanpy_seurat_v3():
    counts = _counts(n_spots=500, n_genes=800, seed=6)
    adata = anndata.AnnData(sp.csr_matrix(counts))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=100, inplace=False)
    result = highly_variable_genes(adata.X, n_top_genes=100)
    for column in ("means", "variances", "variances_norm"):
        np.testing.assert_allclose(result[column].to_numpy(), reference[column].to_numpy(), rtol=1e-9, atol=1e-12)
    differ = result["highly_variable"].to_numpy() != reference["highly_variable"].to_numpy()
    cut = np.sort(result["variances_norm"].to_numpy())[::-1][99]
    # scanpy's unstable argsort may order exact ties at the cut-off differently; nothing else may differ
    assert np.all(result["variances_norm"].to_numpy()[differ] == cut)


def _sections(n_spots: int = 300, n_genes: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Three sections (of 300, 150 and 300 spots) of the same genes: near-Poisson counts, every tenth gene
    overdispersed within each section; gene 0 is Poisson within each section, but its level differs between them
    (1 count on average in the first section, 8 in the others)."""
    sizes = (n_spots, n_spots // 2, n_spots)
    gene_mean = np.exp(np.random.default_rng(0).normal(-1.0, 1.5, size=n_genes))
    blocks = []
    for seed, size in enumerate(sizes):
        rng = np.random.default_rng(10 + seed)
        mean = gene_mean * rng.lognormal(0, 0.3, size=(size, 1))
        mean = mean * np.exp(rng.normal(0, 0.8, size=(size, n_genes)) * (np.arange(n_genes) % 10 == 5))
        blocks.append(rng.negative_binomial(30, 30 / (30 + mean)).astype(np.float32))
    counts = np.vstack(blocks)
    labels = np.repeat(np.array(["s1", "s2", "s3"]), sizes)
    counts[:, 0] = np.random.default_rng(9).poisson(np.where(labels == "s1", 1.0, 8.0))
    return counts, labels


def test_a_gene_shifted_between_sections_but_flat_within_them_is_not_selected():
    counts, labels = _sections()
    pooled = highly_variable_genes(counts, n_top_genes=30)
    assert pooled["highly_variable"][0]  # pooling the sections makes the shift look like variability
    result = highly_variable_genes(counts, n_top_genes=30, batches=labels, chunk_size=128)
    assert not result["highly_variable"][0]
    assert result["highly_variable_nbatches"][0] == 0 and np.isnan(result["highly_variable_rank"][0])
    assert result["highly_variable"].sum() == 30


@pytest.mark.parametrize("flavor", ["seurat_v3", "seurat_v3_paper"])
def test_matches_scanpy_seurat_v3_with_batch_key(flavor):
    counts, labels = _sections()
    adata = anndata.AnnData(sp.csr_matrix(counts))
    adata.obs["section"] = labels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = sc.pp.highly_variable_genes(adata, flavor=flavor, n_top_genes=60, batch_key="section",
                                                inplace=False)
    result = highly_variable_genes(adata.X, n_top_genes=60, batches=labels, flavor=flavor, chunk_size=100)
    for column in ("means", "variances", "variances_norm"):
        np.testing.assert_allclose(result[column].to_numpy(), reference[column].to_numpy(), rtol=1e-9, atol=1e-12)
    # scanpy ranks each section with an unstable argsort, so genes tied in normalised variance within a section
    # (low counts with equal sums) may swap ranks; every difference must come from such a tie
    tied = np.zeros(len(result), dtype=bool)
    for section in np.unique(labels):
        norm = highly_variable_genes(counts[labels == section], n_top_genes=60)["variances_norm"].to_numpy()
        _, inverse, count = np.unique(norm, return_inverse=True, return_counts=True)
        tied |= count[inverse] > 1
    rank, reference_rank = result["highly_variable_rank"].to_numpy(), reference["highly_variable_rank"].to_numpy()
    rank_differs = ~((rank == reference_rank) | (np.isnan(rank) & np.isnan(reference_rank)))
    rank_differs |= result["highly_variable_nbatches"].to_numpy() != reference["highly_variable_nbatches"].to_numpy()
    assert tied[rank_differs].all() and rank_differs.sum() <= 10
    selection_differs = result["highly_variable"].to_numpy() != reference["highly_variable"].to_numpy()
    assert rank_differs[selection_differs].all()
    assert result["highly_variable"].sum() == 60


def test_sections_are_read_in_the_same_row_chunks_dense_sparse_or_on_disk(tmp_path):
    counts, labels = _sections(n_spots=120)
    whole = highly_variable_genes(counts, n_top_genes=30, batches=labels, chunk_size=len(counts))
    recorder = RowSliceRecorder(sp.csr_matrix(counts))
    chunked = highly_variable_genes(recorder, n_top_genes=30, batches=labels, chunk_size=50)
    assert recorder.requests == [50, 50, 50, 50, 50, 50] * 2
    pd.testing.assert_frame_equal(chunked, whole, check_exact=False, rtol=1e-12)
    pd.testing.assert_frame_equal(highly_variable_genes(counts, n_top_genes=30, batches=labels, chunk_size=7),
                                  whole, check_exact=False, rtol=1e-12)


def test_planted_domain_genes_beat_mean_matched_noise_genes():
    adata = simulate_many_genes_section(seed=0)
    planted = adata.var["is_domain_gene"].to_numpy()
    assert planted.sum() == 300 and adata.n_vars == 10_000
    result = highly_variable_genes(adata.X, n_top_genes=500)
    found = (result["highly_variable"].to_numpy() & planted).sum()
    assert found > 0.8 * 300
    # not just "pick the highly expressed genes": means are matched, and the top 500 by mean miss most planted
    means = result["means"].to_numpy()
    assert 0.7 < np.median(means[planted]) / np.median(means[~planted]) < 1.4
    by_mean = np.argsort(-means)[:500]
    assert planted[by_mean].sum() < 0.3 * found


def test_selects_every_gene_when_asked_for_more_than_there_are():
    result = highly_variable_genes(_counts(n_genes=80), n_top_genes=1000)
    assert result["highly_variable"].all()
    np.testing.assert_array_equal(np.sort(result["highly_variable_rank"]), np.arange(80))


def test_rejects_bad_input_with_one_line_errors():
    counts = _counts(n_genes=60)
    with pytest.raises(ValueError, match="negative"):
        highly_variable_genes(counts - 1)
    with pytest.raises(ValueError, match="n_top_genes"):
        highly_variable_genes(counts, n_top_genes=0)
    with pytest.raises(ValueError, match="2-D"):
        highly_variable_genes(counts[0])
    with pytest.raises(ValueError, match="adata.X"):
        highly_variable_genes(anndata.AnnData(counts))
    with pytest.raises(ValueError, match="at least 2 spots"):
        highly_variable_genes(counts[:1])
    with pytest.warns(UserWarning, match="non-integer"):
        highly_variable_genes(counts + 0.5)
    with pytest.raises(ValueError, match="batches has 2 labels for 300 spots"):
        highly_variable_genes(counts, batches=["a", "b"])
    with pytest.raises(ValueError, match="batches has 1 missing label"):
        highly_variable_genes(counts, batches=[None] + ["a"] * 299)
    with pytest.raises(ValueError, match="section 'b' has 1 spot"):
        highly_variable_genes(counts, batches=["a"] * 299 + ["b"])
    with pytest.raises(ValueError, match="flavor must be 'seurat_v3' or 'seurat_v3_paper', got 'seurat'"):
        highly_variable_genes(counts, flavor="seurat")


def test_default_chunks_shrink_when_there_are_many_genes():
    counts = sp.random(2000, 25_000, density=0.01, format="csr", random_state=0, dtype=np.float32)
    counts.data = np.ceil(counts.data * 5)
    recorder = RowSliceRecorder(counts)
    highly_variable_genes(recorder, n_top_genes=100)
    assert max(recorder.requests) == 800 and sum(recorder.requests) == 2 * 2000
