"""Row access to a spots x genes count matrix that never holds a dense ``N x G`` array.

:class:`CountRows` restricts the matrix to the model's genes, in the model's order, and hands out rows: as a
dense ``float32`` block for a mini-batch (``b x G``), or as CSR chunks for a streaming pass. The matrix is
either an **owned copy in CSR** (``float32`` data, ``int32`` indices: 8 bytes per non-zero entry, whatever the
input's format, so that editing ``adata.X`` afterwards cannot change a built model), or the **on-disk matrix** of
an AnnData opened with ``backed='r'`` (``anndata``'s sparse dataset or an HDF5 dense dataset), read block by block.
"""

from __future__ import annotations

from collections.abc import Iterator

import anndata as ad
import numpy as np
import scipy.sparse as sp

#: Spots read at once by the streaming passes (a chunk of 4096 x 20,000 genes is at most 330 MB dense).
CHUNK_SIZE = 4096


def count_matrix(adata: ad.AnnData, layer: str | None):
    """The raw-count matrix of ``adata`` (``.X`` or ``layers[layer]``), with a clear error when it is missing."""
    if layer is not None:
        if layer not in adata.layers:
            raise KeyError(f"adata has no layer '{layer}' (layer=); layers present: {list(adata.layers.keys())}")
        matrix, where = adata.layers[layer], f"adata.layers['{layer}']"
    elif adata.X is None:
        raise ValueError("adata.X is empty; pass layer= to name the layer with the raw counts")
    else:
        matrix, where = adata.X, "adata.X"
    dtype = np.dtype(matrix.dtype if hasattr(matrix, "dtype") else np.asarray(matrix).dtype)
    if not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        raise ValueError(f"{where}: counts must be real numbers, got dtype {dtype}; convert them first, e.g. "
                         f"{where} = {where}.astype(np.float32) for numbers stored as text or bool")
    return matrix


def as_csr(block) -> sp.csr_matrix:
    """Any 2-D block (dense, scipy sparse, numpy matrix) as a CSR matrix."""
    if sp.issparse(block):
        return block.tocsr()
    return sp.csr_matrix(np.asarray(block))


def row_chunks(matrix, chunk_size: int = CHUNK_SIZE) -> Iterator[tuple[int, sp.csr_matrix]]:
    """``(start, csr_block)`` over consecutive row blocks of any row-sliceable matrix (in memory or on disk)."""
    n = matrix.shape[0]
    for start in range(0, n, chunk_size):
        yield start, as_csr(matrix[start:min(start + chunk_size, n)])


def _compact_csr(block: sp.csr_matrix) -> sp.csr_matrix:
    """``float32`` values, ``int32`` columns, and each stored entry a nonzero count of one gene in one spot."""
    block = block.astype(np.float32, copy=False)
    block.sum_duplicates()
    block.eliminate_zeros()
    block.indices = block.indices.astype(np.int32, copy=False)
    return block


class CountRows:
    """The spots x genes counts of the model's genes, row by row.

    Parameters
    ----------
    matrix
        A CSR matrix owned by this object, or an on-disk matrix (read lazily).
    columns
        Positions of the model's genes in ``matrix`` (``None``: all, in order). Ignored for an owned matrix,
        which is already restricted.
    on_disk
        Whether ``matrix`` is read from disk at each access.
    """

    def __init__(self, matrix, columns: np.ndarray | None = None, *, on_disk: bool = False):
        self.matrix, self.columns, self.on_disk = matrix, columns, on_disk

    @classmethod
    def from_anndata(cls, adata: ad.AnnData, layer: str | None, columns: np.ndarray | None) -> CountRows:
        """Owned CSR copy of the ``columns`` of the count matrix, or an on-disk reader for a backed AnnData.

        The copy is built chunk by chunk, so a dense input is never copied densely.
        """
        matrix = count_matrix(adata, layer)
        if adata.isbacked and layer is None:
            return cls(matrix, columns, on_disk=True)
        blocks = []
        for _, block in row_chunks(matrix):
            blocks.append(_compact_csr(block if columns is None else block[:, columns]))
        owned = sp.vstack(blocks, format="csr") if len(blocks) > 1 else blocks[0]
        return cls(_compact_csr(owned))

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_spots, n_genes)`` of the model's genes."""
        n_genes = self.matrix.shape[1] if self.columns is None or not self.on_disk else len(self.columns)
        return self.matrix.shape[0], n_genes

    @property
    def nbytes(self) -> int:
        """Host memory held by the counts (0 when they stay on disk)."""
        if self.on_disk:
            return 0
        return int(self.matrix.data.nbytes + self.matrix.indices.nbytes + self.matrix.indptr.nbytes)

    def _restrict(self, block) -> sp.csr_matrix:
        block = as_csr(block)
        if self.on_disk and self.columns is not None:
            block = block[:, self.columns]
        return block

    def take_sparse(self, index: np.ndarray) -> sp.csr_matrix:
        """CSR ``float32`` rows ``index`` (``len(index) x G``), in the order given."""
        index = np.asarray(index)
        if self.on_disk:  # on-disk readers want increasing positions
            order = np.argsort(index, kind="stable")
            block = self._restrict(self.matrix[index[order]])
            inverse = np.empty_like(order)
            inverse[order] = np.arange(len(order))
            return _compact_csr(block[inverse])
        return self.matrix[index]

    def take(self, index: np.ndarray) -> np.ndarray:
        """Dense ``float32`` rows ``index`` (``len(index) x G``), in the order given."""
        return self.take_sparse(index).toarray()

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[tuple[int, sp.csr_matrix]]:
        """``(start, csr_block)`` over consecutive row blocks of the model's genes."""
        for start, block in row_chunks(self.matrix, chunk_size):
            yield start, self._restrict(block) if self.on_disk else block
