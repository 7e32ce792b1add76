"""Principal axes of the encoder input: what the encoder reads on a section with many more genes than spots.

On a section of a few hundred spots and 2,000 genes the encoder's first layer has 256,000 weights for about 300
observations, and the z-scored expression of ``N`` spots spans at most ``N - 1`` directions, most of them noise
(the sample covariance of ``G > N`` genes has the Marchenko-Pastur bulk up to ``(1 + sqrt(G/N))**2``). There the
encoder reads the projection of the z-scored gene input onto its first :data:`AUTO_INPUT_AXES` principal axes
instead of the genes (``docs/sizing.md``: the rule, its reason and the panel); the decoder still models every gene.

:func:`auto_input_axes` is the rule, :func:`fit_input_axes` fits the axes in one streaming pass over a seeded
sample of at most :data:`MAX_AXES_SPOTS` spots (bytes: the sample's ``m x G`` float64 block, never ``N x G``).
The axes are part of the :class:`~spavae.data.setup.DataSetup` and travel with the model file, so a loaded model
projects new spots onto the training axes.
"""

from __future__ import annotations

import numpy as np

from spavae.data.counts import row_chunks

#: Principal axes the encoder reads when the rule applies: the default latent size (2 GP + 8 Gaussian). On the
#: panel, 10 axes did better than 50 and than the Marchenko-Pastur count on the sections with many more genes than
#: spots (``benchmarks/results/encoder_input.jsonl``).
AUTO_INPUT_AXES = 10
#: The rule applies when the model has more than this many genes per spot. The development panel has no section
#: between 1.4 (Visium 151673) and 4 (the 500-spot simulator); 2 sits in the gap. At 2 genes per spot the noise
#: edge of the sample covariance is already ``(1 + sqrt(2))**2 = 5.8`` times a gene's variance: weaker axes cannot
#: be told from noise.
AUTO_GENES_PER_SPOT = 2.0
#: The axes are fitted on a seeded sample of at most this many spots.
MAX_AXES_SPOTS = 2000


def auto_input_axes(n_spots: int, n_genes: int, binarize: bool) -> int | None:
    """The rule of ``input_axes='auto'``: :data:`AUTO_INPUT_AXES` axes above :data:`AUTO_GENES_PER_SPOT` genes per
    spot, else ``None`` (the encoder reads the genes). Binarised peaks (spaPeakVAE) are never projected: their
    input is the binary matrix itself."""
    if binarize or n_genes <= AUTO_GENES_PER_SPOT * n_spots:
        return None
    return min(AUTO_INPUT_AXES, n_spots - 1, n_genes)


def fit_input_axes(matrix, columns: np.ndarray, totals: np.ndarray, library_median: float, mean: np.ndarray,
                   sd: np.ndarray, n_axes: int, *, seed: int = 0) -> np.ndarray:
    """The first ``n_axes`` principal axes of the z-scored encoder input, ``G x n_axes`` (orthonormal columns).

    Parameters
    ----------
    matrix
        Spots x genes counts (sparse, dense or on disk), read in row chunks.
    columns
        Positions of the model's genes in ``matrix``.
    totals, library_median
        Each spot's library size and the median library size (size factor ``totals / library_median``).
    mean, sd
        Per-gene mean and SD of ``log1p(counts / s)`` of the model's genes (the encoder input's z-scoring).
    n_axes
        Number of axes, at most the sample's spots minus one and the number of genes.
    seed
        Seed of the sample of :data:`MAX_AXES_SPOTS` spots (all spots when there are fewer).

    Returns
    -------
    The axes as columns, each with the sign that makes its largest loading positive (so they do not depend on the
    SVD routine).
    """
    n_spots = matrix.shape[0]
    sample = np.sort(np.random.default_rng(seed).permutation(n_spots)[:MAX_AXES_SPOTS])
    if not (1 <= n_axes < len(sample) and n_axes <= len(columns)):
        raise ValueError(f"input_axes must be an integer between 1 and {min(len(sample) - 1, len(columns))} (the "
                         f"spots minus one and the genes), got {n_axes}")
    block = np.empty((len(sample), len(columns)))
    filled = 0
    for start, chunk in row_chunks(matrix):
        rows = sample[(sample >= start) & (sample < start + chunk.shape[0])]
        if len(rows):
            counts = chunk[rows - start][:, columns].toarray()
            factors = totals[rows] / library_median
            block[filled:filled + len(rows)] = (np.log1p(counts / factors[:, None]) - mean) / sd
            filled += len(rows)
    block -= block.mean(0)
    _, _, vt = np.linalg.svd(block, full_matrices=False)
    axes = vt[:n_axes].T
    signs = np.sign(axes[np.abs(axes).argmax(0), np.arange(n_axes)])
    return axes * signs
