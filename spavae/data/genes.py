"""Highly variable gene selection on raw counts (the Seurat v3 ``vst`` flavour), chunked over spots.

The selection follows Seurat v3 as implemented by scanpy's ``highly_variable_genes(flavor='seurat_v3')``:

1. per gene, the mean and the variance (``ddof=1``) of the raw counts;
2. a loess fit (span 0.3, degree 2) of ``log10(variance)`` on ``log10(mean)`` over the non-constant genes gives
   the expected standard deviation ``sigma_g`` of every gene (1 for constant genes);
3. counts are standardised, ``z = (x - mean) / sigma_g``, and clipped at ``sqrt(N)`` (the counts at
   ``mean + sigma_g * sqrt(N)``); ``sum(z_clipped^2) / (N - 1)`` is the normalised variance;
4. genes are ranked by normalised variance; the ``n_top_genes`` first are highly variable.

With several sections (scanpy's ``batch_key``), steps 1-4 run within each section, so a gene whose level differs
between sections but not within them is not mistaken for a variable one. A gene's highly-variable rank is then
its median rank over the sections where it is among the ``n_top_genes`` first, and the genes are sorted by that
median rank, ties broken by the number of such sections (``flavor='seurat_v3'``), or by the number of sections
first and the median rank second (``flavor='seurat_v3_paper'``, Seurat's ``SelectIntegrationFeatures``).

Both passes over the counts read ``chunk_size`` rows at a time, so a CSR matrix, a dense array or an on-disk backed
matrix is never densified whole. The loess is written in numpy: loess's k-d tree with vertex fits and cubic
Hermite interpolation (scikit-misc's default ``surface='interpolate'``, which scanpy uses) or a direct fit at every
gene (``surface='direct'``); both reproduce scikit-misc to rounding error, so the statistics equal scanpy's and the
selected genes differ only where scanpy's unstable sort orders exact ties at the cut-off differently (here ties keep
gene order).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

_LOESS_BLOCK_ELEMENTS = 4_000_000
_CHUNK_ELEMENTS = 20_000_000


def default_chunk_size(n_genes: int) -> int:
    """Rows per chunk: 10,000, or fewer so that a dense chunk holds at most 20 million values."""
    return max(1, min(10_000, _CHUNK_ELEMENTS // max(n_genes, 1)))


def _row_chunks(matrix, chunk_size: int) -> Iterator[tuple[int, np.ndarray | sp.csr_matrix]]:
    """``(start, block)`` over consecutive row blocks of ``matrix``, as float64 dense arrays or CSR matrices."""
    n_rows = matrix.shape[0]
    for start in range(0, n_rows, chunk_size):
        block = matrix[start:min(start + chunk_size, n_rows)]
        if sp.issparse(block):
            block = sp.csr_matrix(block, dtype=np.float64)
            block.sum_duplicates()
            yield start, block
        else:
            yield start, np.asarray(block, dtype=np.float64)


def _column_sums(block, codes: np.ndarray, n_batches: int, *,
                 clip: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-batch column sums and sums of squares of a block, its values first clipped from above at ``clip``.

    ``codes`` gives the batch of each row of the block; the sums are ``n_batches x n_columns``, and ``clip`` (if
    given) holds one row of clip values per batch.
    """
    n_cols = block.shape[1]
    if sp.issparse(block):
        row_codes = np.repeat(codes, np.diff(block.indptr))
        values = block.data if clip is None else np.minimum(block.data, clip[row_codes, block.indices])
        flat = row_codes * n_cols + block.indices
        return (np.bincount(flat, weights=values, minlength=n_batches * n_cols).reshape(n_batches, n_cols),
                np.bincount(flat, weights=values * values, minlength=n_batches * n_cols).reshape(n_batches, n_cols))
    values = block if clip is None else np.minimum(block, clip[codes])
    indicator = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(n_batches, len(codes)))
    return indicator @ values, indicator @ (values * values)


def _check_block(block) -> bool:
    """Raise on negative values; return whether the block holds only integers."""
    values = block.data if sp.issparse(block) else block
    if values.size and values.min() < 0:
        raise ValueError("highly_variable_genes expects raw counts, but the matrix has negative values; "
                         "pass the raw count matrix (e.g. adata.layers['counts']), not normalised data")
    return bool(np.all(values == np.round(values)))


def _local_quadratic(xs: np.ndarray, ys: np.ndarray, queries: np.ndarray,
                     n_neighbours: int) -> tuple[np.ndarray, np.ndarray]:
    """Value and slope at each query of the tricube-weighted quadratic fit to its ``n_neighbours`` nearest points.

    ``xs`` must be sorted. The radius ``h`` is the distance to the ``n_neighbours``-th nearest point; the weights
    are ``(1 - (|x - q| / h)^3)^3`` inside it. If ``h`` is 0 (more tied points than neighbours) the fit is the mean
    of the tied responses with slope 0 (the minimum-norm least-squares solution).
    """
    n = xs.size
    # the nearest neighbours of q are n_neighbours consecutive sorted points; the best window starts where its
    # two ends become equally far from q
    window_ends = xs[:n - n_neighbours + 1] + xs[n_neighbours - 1:]
    start = np.clip(np.searchsorted(window_ends, 2 * queries), 0, n - n_neighbours)
    before = np.maximum(start - 1, 0)
    radius_start = np.maximum(queries - xs[start], xs[start + n_neighbours - 1] - queries)
    radius_before = np.maximum(queries - xs[before], xs[before + n_neighbours - 1] - queries)
    first = np.where(radius_before < radius_start, before, start)
    radius = np.minimum(radius_start, radius_before)
    offsets = np.arange(n_neighbours)
    value, slope = np.empty(queries.size), np.empty(queries.size)
    block = max(1, _LOESS_BLOCK_ELEMENTS // n_neighbours)
    for lo in range(0, queries.size, block):
        hi = min(lo + block, queries.size)
        idx = first[lo:hi, None] + offsets
        h = radius[lo:hi, None]
        tied = h[:, 0] == 0
        u = (xs[idx] - queries[lo:hi, None]) / np.where(tied[:, None], 1.0, h)
        w = np.clip(1.0 - np.abs(u) ** 3, 0.0, None) ** 3
        w[tied] = u[tied] == 0
        wu = w * u
        wu2 = wu * u
        y = ys[idx]
        moments = np.stack([w.sum(1), wu.sum(1), wu2.sum(1), (wu2 * u).sum(1), (wu2 * u * u).sum(1)], axis=1)
        normal = moments[:, [[0, 1, 2], [1, 2, 3], [2, 3, 4]]]
        rhs = np.stack([(w * y).sum(1), (wu * y).sum(1), (wu2 * y).sum(1)], axis=1)
        coef = np.einsum("bij,bj->bi", np.linalg.pinv(normal, rcond=1e-12), rhs)
        value[lo:hi] = coef[:, 0]
        slope[lo:hi] = np.where(tied, 0.0, coef[:, 1] / np.where(tied, 1.0, h[:, 0]))
    return value, slope


def _kd_vertices(xs: np.ndarray, max_cell_points: int) -> np.ndarray:
    """Sorted vertices of loess's 1-D k-d tree over sorted ``xs`` (cells split at the median until small).

    The bounding box is widened by 0.5 % on each side; a cell with more than ``max_cell_points`` points is split
    at its median, moved to the nearest position between two distinct values when the median is tied, and left
    whole when the split would fall on one of its ends.
    """
    low, high = xs[0], xs[-1]
    margin = 0.005 * max(high - low, 1e-10 * max(abs(low), abs(high)) + 1e-30)
    vertices = [low - margin, high + margin]
    cells = [(0, xs.size - 1, low - margin, high + margin)]
    while cells:
        first, last, lower, upper = cells.pop()
        if last - first + 1 <= max_cell_points:
            continue
        middle = (first + last) // 2
        for offset in _split_offsets():
            position = middle + offset
            if position >= last or position < first:
                break
            if xs[position] != xs[position + 1]:
                middle = position
                break
        split = xs[middle]
        if split == lower or split == upper:
            continue
        vertices.append(split)
        cells += [(first, middle, lower, split), (middle + 1, last, split, upper)]
    return np.sort(np.asarray(vertices))


def _split_offsets() -> Iterator[int]:
    """0, 1, -1, 2, -2, ...: the order in which loess looks for an untied split next to the median."""
    yield 0
    step = 1
    while True:
        yield step
        yield -step
        step += 1


def loess_fit(x: np.ndarray, y: np.ndarray, *, span: float = 0.3, surface: str = "interpolate") -> np.ndarray:
    """Fitted values of a degree-2 loess of ``y`` on one predictor ``x`` (Gaussian family, no robustness steps).

    At a point ``x0`` the ``q = floor(n * span)`` nearest points define the radius ``h`` (distance to the
    ``q``-th nearest); points closer than ``h`` get tricube weights ``(1 - (|x - x0| / h)^3)^3`` and a weighted
    least-squares quadratic in ``x - x0`` is fitted. With ``surface='direct'`` that fit is evaluated at every
    point; with ``surface='interpolate'`` (loess's default, used by scanpy through scikit-misc) it is evaluated,
    value and slope, at the vertices of a k-d tree whose cells hold at most ``floor(n * span * 0.2)`` points, and
    cubic Hermite interpolation between a cell's two vertices gives the fitted values: far fewer local fits.

    Parameters
    ----------
    x, y
        Predictor and response, 1-D, finite and of the same length.
    span
        Fraction of the points in each neighbourhood, in (0, 1].
    surface
        ``'interpolate'`` or ``'direct'``, as in scikit-misc's ``loess``.

    Returns
    -------
    The fitted values, in the order of ``x``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"x and y must be 1-D of the same length, got shapes {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("loess needs finite x and y; drop the genes with zero mean or variance first")
    if not 0 < span <= 1:
        raise ValueError(f"span must be in (0, 1], got {span}")
    if surface not in ("interpolate", "direct"):
        raise ValueError(f"surface must be 'interpolate' or 'direct', got {surface!r}")
    n = x.size
    n_neighbours = min(n, int(np.floor(n * span)))
    if n_neighbours < 4:
        raise ValueError(f"a degree-2 loess with span {span} needs at least {int(np.ceil(4 / span))} points "
                         f"(genes with nonzero variance), got {n}")
    order = np.argsort(x, kind="stable")
    xs, ys = x[order], y[order]
    if surface == "direct":
        fitted, _ = _local_quadratic(xs, ys, xs, n_neighbours)
    else:
        vertices = _kd_vertices(xs, int(np.floor(n * (span * 0.2))))
        value, slope = _local_quadratic(xs, ys, vertices, n_neighbours)
        cell = np.clip(np.searchsorted(vertices, xs, side="left") - 1, 0, vertices.size - 2)
        width = vertices[cell + 1] - vertices[cell]
        t = (xs - vertices[cell]) / width
        fitted = ((1 - t) ** 2 * (1 + 2 * t) * value[cell] + t**2 * (3 - 2 * t) * value[cell + 1]
                  + (t * (1 - t) ** 2 * slope[cell] + t**2 * (t - 1) * slope[cell + 1]) * width)
    out = np.empty(n)
    out[order] = fitted
    return out


def _batch_codes(batches, n_spots: int) -> tuple[np.ndarray, np.ndarray]:
    """Batch index of each spot and the batch labels, with one-line errors for unusable labels."""
    if batches is None:
        return np.zeros(n_spots, dtype=np.int64), np.array([None])
    codes, labels = pd.factorize(pd.Series(np.asarray(batches, dtype=object)), sort=True)
    if len(codes) != n_spots:
        raise ValueError(f"batches has {len(codes)} labels for {n_spots} spots; give the section of every spot")
    if (codes < 0).any():
        raise ValueError(f"batches has {int((codes < 0).sum())} missing label(s); give the section of every spot")
    sizes = np.bincount(codes, minlength=len(labels))
    if sizes.min() < 2:
        raise ValueError(f"section {labels[np.argmin(sizes)]!r} has {sizes.min()} spot; highly variable genes need "
                         "at least 2 spots in each section: drop that section or merge it with another")
    return codes.astype(np.int64), np.asarray(labels)


def highly_variable_genes(matrix, n_top_genes: int = 2000, *, batches=None, flavor: str = "seurat_v3",
                          span: float = 0.3, chunk_size: int | None = None) -> pd.DataFrame:
    """Rank genes by Seurat v3 normalised variance of raw counts, in two chunked passes over the spots.

    Parameters
    ----------
    matrix
        Raw counts, spots x genes: a dense array, a scipy sparse matrix, or anything with ``shape`` whose row
        slices ``matrix[start:stop]`` are dense or sparse (an h5py dataset, a backed AnnData's ``X``).
    n_top_genes
        Number of genes flagged highly variable (all genes if there are fewer).
    batches
        Section (batch) label of each spot, as scanpy's ``adata.obs[batch_key]``: genes are ranked within each
        section and the ranks combined (see the module doc). ``None``: one section.
    flavor
        How ranks of several sections are combined, as in scanpy: ``'seurat_v3'`` sorts by median rank, then by
        the number of sections where the gene is highly variable; ``'seurat_v3_paper'`` the other way round.
        Both give the same genes for one section.
    span
        Loess span, the fraction of genes in each local fit of log10 variance on log10 mean.
    chunk_size
        Rows read at a time (default: 10,000, fewer when there are over 2,000 genes, so that a dense chunk holds
        at most 20 million values); memory scales with ``chunk_size x n_genes`` for dense input.

    Returns
    -------
    DataFrame indexed by gene position with scanpy's columns: ``means`` and ``variances`` (``ddof=1``) over all
    spots, ``variances_norm`` (averaged over the sections), ``highly_variable`` (bool), ``highly_variable_rank``
    (0 = most variable; with sections the median rank over the sections where the gene is among the
    ``n_top_genes`` first; NaN if it is in none) and, when ``batches`` is given, ``highly_variable_nbatches``.
    Ties in normalised variance keep gene order.
    """
    if isinstance(matrix, ad.AnnData):
        raise ValueError("highly_variable_genes takes the count matrix, not the AnnData: pass adata.X or the "
                         "layer with raw counts, e.g. adata.layers['counts']")
    if not hasattr(matrix, "shape") or len(matrix.shape) != 2:
        raise ValueError("matrix must be 2-D (spots x genes) with a shape and row slicing, "
                         f"got {type(matrix).__name__}")
    n_spots, n_genes = matrix.shape
    if n_spots < 2:
        raise ValueError(f"highly_variable_genes needs at least 2 spots, got {n_spots}")
    if int(n_top_genes) < 1:
        raise ValueError(f"n_top_genes must be at least 1, got {n_top_genes}")
    if flavor not in ("seurat_v3", "seurat_v3_paper"):
        raise ValueError(f"flavor must be 'seurat_v3' or 'seurat_v3_paper', got {flavor!r}")
    chunk_size = default_chunk_size(n_genes) if chunk_size is None else int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    n_top_genes = min(int(n_top_genes), n_genes)
    codes, labels = _batch_codes(batches, n_spots)
    n_batches = len(labels)
    spots = np.bincount(codes, minlength=n_batches)[:, None]

    total, total_sq = np.zeros((n_batches, n_genes)), np.zeros((n_batches, n_genes))
    integer = True
    for start, block in _row_chunks(matrix, chunk_size):
        integer &= _check_block(block)
        block_sum, block_sq = _column_sums(block, codes[start:start + block.shape[0]], n_batches)
        total += block_sum
        total_sq += block_sq
    if not integer:
        warnings.warn("highly_variable_genes expects raw counts, but non-integer values were found",
                      UserWarning, stacklevel=2)
    mean = total / spots
    variance = np.maximum(total_sq - spots * mean**2, 0.0) / (spots - 1)

    expected_sd = np.ones((n_batches, n_genes))
    for index in range(n_batches):
        varying = variance[index] > 0
        log_expected_variance = loess_fit(np.log10(mean[index, varying]), np.log10(variance[index, varying]),
                                          span=span)
        expected_sd[index, varying] = np.sqrt(10.0**log_expected_variance)

    clip = mean + expected_sd * np.sqrt(spots)
    clipped_sum, clipped_sq = np.zeros((n_batches, n_genes)), np.zeros((n_batches, n_genes))
    for start, block in _row_chunks(matrix, chunk_size):
        block_sum, block_sq = _column_sums(block, codes[start:start + block.shape[0]], n_batches, clip=clip)
        clipped_sum += block_sum
        clipped_sq += block_sq
    variance_norm = (spots * mean**2 + clipped_sq - 2 * clipped_sum * mean) / ((spots - 1) * expected_sd**2)

    rank = np.empty((n_batches, n_genes))
    for index in range(n_batches):
        rank[index, np.argsort(-variance_norm[index], kind="stable")] = np.arange(n_genes)
    top = rank < n_top_genes
    n_batches_top = top.sum(axis=0)
    median_rank = np.ma.median(np.ma.masked_array(rank, ~top), axis=0).filled(np.nan)
    keys = (-n_batches_top, median_rank) if flavor == "seurat_v3" else (median_rank, -n_batches_top)
    selected = np.zeros(n_genes, dtype=bool)
    selected[np.lexsort(keys)[:n_top_genes]] = True  # lexsort sorts by the last key first; NaN last; stable
    n_all = float(n_spots)
    all_mean = total.sum(axis=0) / n_all
    table = pd.DataFrame({
        "means": all_mean,
        "variances": np.maximum(total_sq.sum(axis=0) - n_all * all_mean**2, 0.0) / (n_all - 1),
        "variances_norm": variance_norm.mean(axis=0),
        "highly_variable": selected,
        "highly_variable_rank": median_rank,
    }, index=pd.RangeIndex(n_genes))
    if batches is not None:
        table["highly_variable_nbatches"] = n_batches_top
    return table
