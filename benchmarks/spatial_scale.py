"""The spatial scale of each section's expression, in the GP's frame: could it set the kernel's starting scale?

Usage: python benchmarks/spatial_scale.py [--cases NAME ...] [--max-spots 2500] [--bins 40]

For every case of ``benchmarks/panel.py`` (seed 0 for the simulator): the first 10 principal components of the
normalised expression (the baseline's, :func:`dlpfc.expression_pcs`), each scaled to unit variance, and the spot
locations in the frame the GP sees (:class:`spavae.data.frame.LocationFrame`, the default ``'aligned'`` rule; a
square section spans ``[0, 20]^2``). Pairs of spots (all pairs of at most ``--max-spots`` spots drawn at random) are
binned by squared distance into ``--bins`` bins of equal counts, and the correlogram is the mean over components of
``pc_i * pc_j`` in each bin. Two readings of it:

* ``d2_half``: the squared distance of the first bin whose correlation is under half of the nearest bin's: the
  ``s`` of a Cauchy kernel ``1 / (1 + d^2 / s)``, which is one half at ``d^2 = s``, with the same half distance;
* ``s_fit``: the ``s`` of the least-squares fit of ``c / (1 + d^2 / s) + b`` to the correlogram (``s`` on a
  logarithmic grid from 0.1 to 400).

The package starts the kernel at ``s = 20`` and the learnt scale ends near its start (``docs/sizing.md``). One JSON
line per case.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.spatial.distance import pdist

from spavae.data.frame import LocationFrame

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from dlpfc import expression_pcs  # noqa: E402
from panel import SHARED, case_names, load_case  # noqa: E402

SCALES = np.geomspace(0.1, 400, 200)


def correlogram(components: np.ndarray, locations: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean squared distance and mean correlation of the pairs in each of ``n_bins`` equal-count distance bins."""
    squared = pdist(locations, "sqeuclidean")
    first, second = np.triu_indices(len(locations), 1)  # pdist's pair order
    products = (components[first] * components[second]).mean(1)
    edges = np.quantile(squared, np.linspace(0, 1, n_bins + 1))
    which = np.clip(np.searchsorted(edges, squared, side="right") - 1, 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    return (np.bincount(which, squared, n_bins) / counts, np.bincount(which, products, n_bins) / counts)


def half_distance2(squared: np.ndarray, correlation: np.ndarray) -> float | None:
    """The squared distance of the first bin whose correlation is under half of the first bin's."""
    below = correlation < correlation[0] / 2
    return float(squared[np.argmax(below)]) if below.any() else None


def fit_cauchy(squared: np.ndarray, correlation: np.ndarray) -> tuple[float, float, float]:
    """``(s, c, b)`` of the least-squares fit of ``c / (1 + d^2 / s) + b``, ``s`` on :data:`SCALES`."""
    best = None
    for scale in SCALES:
        design = np.column_stack([1.0 / (1.0 + squared / scale), np.ones_like(squared)])
        coefficients, *_ = np.linalg.lstsq(design, correlation, rcond=None)
        residual = float(((design @ coefficients - correlation) ** 2).sum())
        if best is None or residual < best[0]:
            best = (residual, float(scale), *map(float, coefficients))
    return best[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", help="case names (default: every case of benchmarks/panel.py)")
    parser.add_argument("--max-spots", type=int, default=2500, help="spots drawn for the pairs (default 2500)")
    parser.add_argument("--bins", type=int, default=40, help="distance bins (default 40)")
    args = parser.parse_args()
    names = case_names(SHARED / "panel", SHARED / "dlpfc")
    for name in args.cases or list(names):
        adata, _ = load_case(*names[name], seed=0)
        locations = LocationFrame().fit(adata.obsm["spatial"]).transform(adata.obsm["spatial"])
        components = expression_pcs(adata)
        components /= components.std(0)
        drawn = np.random.default_rng(0).permutation(adata.n_obs)[:args.max_spots]
        squared, correlation = correlogram(components[drawn], locations[drawn], args.bins)
        scale, height, floor = fit_cauchy(squared, correlation)
        half = half_distance2(squared, correlation)
        print(json.dumps({"case": name, "n_spots": adata.n_obs, "nearest_bin_d2": round(float(squared[0]), 3),
                          "nearest_bin_correlation": round(float(correlation[0]), 3),
                          "d2_half": None if half is None else round(half, 2), "s_fit": round(scale, 2),
                          "fit_height": round(height, 3), "fit_floor": round(floor, 3)}), flush=True)


if __name__ == "__main__":
    main()
