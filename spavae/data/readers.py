"""Readers for the spaVAE HDF5 layout and for AnnData ``.h5ad`` files, and :func:`read`, which tells
the format of a path and calls the right reader (10x folders: :mod:`spavae.data.tenx`; SpatialData:
:mod:`spavae.data.spatialdata_io`).

All return an :class:`anndata.AnnData` with raw counts in ``.X``, the spot coordinates in
``obsm['spatial']`` and, when the file has them, ground-truth labels in ``obs['ground_truth']``.
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd

from spavae.data import spatialdata_io, tenx
from spavae.data.hdf5 import decode_strings, open_hdf5
from spavae.data.preprocess import check_counts, check_locations

#: The obs column of the ground-truth labels.
LABEL_KEY = "ground_truth"
#: The label of unannotated spots.
UNLABELLED = "NA"


def _real_array(dataset, where: str, what: str) -> np.ndarray:
    """An HDF5 dataset of real numbers as float64; a one-line error for text, bool, complex or compound data."""
    if not isinstance(dataset, h5py.Dataset) or dataset.dtype.kind not in "iuf":
        kind = "a group" if not isinstance(dataset, h5py.Dataset) else f"dtype {dataset.dtype}"
        raise ValueError(f"{where}: the {what} must be an array of real numbers, got {kind}")
    return np.asarray(dataset[()], dtype=np.float64)


def read_spavae_h5(
    path: str | os.PathLike,
    *,
    counts_key: str = "X",
    spatial_key: str = "pos",
    label_key: str | None = "Y",
) -> ad.AnnData:
    """Read a file in the original spaVAE layout (``X``, ``pos``, optional ``Y``, ``gene``, ``cell``).

    Parameters
    ----------
    path
        The ``.h5`` file.
    counts_key
        Dataset with the spots x genes raw counts.
    spatial_key
        Dataset with the spots x 2 locations (some spaPeakVAE files use ``Pos``).
    label_key
        Optional dataset with one label per spot (``'NA'`` = unannotated); ``None`` skips it.

    Returns
    -------
    AnnData with counts in ``.X`` (float32), locations in ``obsm['spatial']`` and labels, when
    present, in ``obs['ground_truth']``.
    """
    path = Path(path)
    with open_hdf5(path) as h5:
        missing = [k for k in (counts_key, spatial_key) if k not in h5]
        if missing:
            raise KeyError(
                f"{path} has no dataset {missing}; the spaVAE layout needs '{counts_key}' (spots x genes raw "
                f"counts) and '{spatial_key}' (spots x 2 locations). Datasets present: {sorted(h5.keys())}"
            )
        counts = _real_array(h5[counts_key], f"{path}:{counts_key}", "counts")
        locations = _real_array(h5[spatial_key], f"{path}:{spatial_key}", "locations")
        genes = decode_strings(h5["gene"][()]) if "gene" in h5 else None
        cells = decode_strings(h5["cell"][()]) if "cell" in h5 else None
        labels = decode_strings(h5[label_key][()]) if label_key and label_key in h5 else None
    check_counts(counts, where=f"{path}:{counts_key}")
    check_locations(locations, counts.shape[0], where=f"{path}:{spatial_key}")
    n_spots, n_genes = counts.shape
    obs = pd.DataFrame(index=pd.Index(cells if cells is not None else [f"spot{i}" for i in range(n_spots)]))
    var = pd.DataFrame(index=pd.Index(genes if genes is not None else [f"gene{j}" for j in range(n_genes)]))
    for name, frame, size in (("cell", obs, n_spots), ("gene", var, n_genes)):
        if len(frame) != size:
            raise ValueError(f"{path}: '{name}' has {len(frame)} entries but '{counts_key}' implies {size}")
    if labels is not None:
        if len(labels) != n_spots:
            raise ValueError(f"{path}: '{label_key}' has {len(labels)} labels for {n_spots} spots")
        obs[LABEL_KEY] = pd.Categorical(labels)
    adata = ad.AnnData(X=counts.astype(np.float32), obs=obs, var=var)
    if not obs.index.is_unique:
        adata.obs_names_make_unique()
    if not var.index.is_unique:
        adata.var_names_make_unique()
    adata.obsm["spatial"] = locations
    adata.uns["spavae_source"] = {"path": str(path), "format": "spavae-h5"}
    return adata


def read_h5ad(
    path: str | os.PathLike,
    *,
    layer: str | None = None,
    spatial_key: str = "spatial",
    label_key: str | None = None,
) -> ad.AnnData:
    """Read an ``.h5ad`` file and check that it carries counts and locations.

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    layer
        Layer holding the raw counts; ``None`` uses ``.X``. The counts are moved to ``.X``.
    spatial_key
        Key of the spots x 2 coordinates in ``obsm``.
    label_key
        Optional ``obs`` column with ground-truth labels, copied to ``obs['ground_truth']``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        adata = ad.read_h5ad(path)
    except OSError as err:
        raise ValueError(f"{path} is not a readable .h5ad file (truncated, damaged or another format): "
                         f"{str(err).splitlines()[0]}") from None
    if layer is not None:
        if layer not in adata.layers:
            raise KeyError(f"{path} has no layer '{layer}'; layers present: {list(adata.layers.keys())}")
        adata.X = adata.layers[layer]
    if spatial_key not in adata.obsm:
        raise KeyError(
            f"{path} has no obsm['{spatial_key}'] with spot coordinates; keys present: {list(adata.obsm.keys())}. "
            "Pass spatial_key= to name the right one."
        )
    check_counts(adata.X, where=f"{path}:{'layers/' + layer if layer else 'X'}")
    check_locations(np.asarray(adata.obsm[spatial_key]), adata.n_obs, where=f"{path}:obsm/{spatial_key}")
    if spatial_key != "spatial":
        adata.obsm["spatial"] = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
    if label_key is not None:
        if label_key not in adata.obs:
            raise KeyError(f"{path} has no obs column '{label_key}'; columns: {list(adata.obs.columns)}")
        adata.obs[LABEL_KEY] = pd.Categorical(adata.obs[label_key].astype(str))
    return adata


SUPPORTED_FORMATS = (
    "a Space Ranger Visium folder (filtered_feature_bc_matrix.h5 + spatial/)",
    "a Visium HD folder (binned_outputs/ or a square_XXXum bin folder)",
    "a Xenium folder (cell_feature_matrix.h5 + cells.parquet or cells.csv.gz)",
    "a SpatialData .zarr store",
    "an .h5ad file",
    "a spaVAE-layout .h5 file (X, pos[, Y, gene, cell])",
)


def detect_format(path: str | os.PathLike) -> str:
    """Name the format of ``path`` without reading it.

    Returns
    -------
    ``'visium'``, ``'visium-hd'``, ``'xenium'``, ``'spatialdata'``, ``'h5ad'`` or ``'spavae-h5'``;
    anything else raises a ValueError listing the supported formats.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.suffix == ".zarr":
        return "spatialdata"
    if path.is_dir():
        if (path / "binned_outputs").is_dir() or tenx.BIN_FOLDER.match(path.name):
            return "visium-hd"
        if (path / tenx.MATRIX_FILE).is_file() and (path / "spatial").is_dir():
            return "visium"
        if (path / tenx.XENIUM_MATRIX_FILE).is_file():
            return "xenium"
    elif path.suffix == ".h5ad":
        return "h5ad"
    elif path.suffix in (".h5", ".hdf5"):
        if path.name in (tenx.MATRIX_FILE, tenx.XENIUM_MATRIX_FILE):
            raise ValueError(f"{path} is a 10x count matrix without coordinates; pass the folder that holds it "
                             "(the Space Ranger 'outs' folder or the Xenium output folder)")
        return "spavae-h5"
    raise ValueError(f"spavae cannot tell the format of {path}; it reads " + "; ".join(SUPPORTED_FORMATS))


def read(path: str | os.PathLike, **kwargs) -> ad.AnnData:
    """Read spatial counts, telling the format from ``path`` (see :func:`detect_format`).

    Parameters
    ----------
    path
        A Visium, Visium HD or Xenium output folder, a SpatialData ``.zarr`` store, an ``.h5ad``
        file or a spaVAE-layout ``.h5`` file.
    **kwargs
        Passed to the format's reader: :func:`spavae.data.read_visium`,
        :func:`~spavae.data.read_visium_hd` (e.g. ``bin_size=16``), :func:`~spavae.data.read_xenium`,
        :func:`~spavae.data.read_spatialdata` (e.g. ``table_key``), :func:`read_h5ad` or
        :func:`read_spavae_h5`.

    Returns
    -------
    AnnData with raw counts in ``.X`` and coordinates in ``obsm['spatial']``.
    """
    readers = {
        "visium": tenx.read_visium,
        "visium-hd": tenx.read_visium_hd,
        "xenium": tenx.read_xenium,
        "spatialdata": spatialdata_io.read_spatialdata,
        "h5ad": read_h5ad,
        "spavae-h5": read_spavae_h5,
    }
    return readers[detect_format(path)](path, **kwargs)
