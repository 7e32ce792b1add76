"""Readers for 10x Genomics outputs: the 10x HDF5 feature-barcode matrix, Space Ranger Visium and
Visium HD folders, and Xenium Ranger/Onboard Analysis folders.

Every reader returns an :class:`anndata.AnnData` with raw counts (CSR, float32) in ``.X``, the
barcodes (spots, bins or cells) as ``obs_names`` in the order of the matrix, only the
``'Gene Expression'`` features, and the coordinates in ``obsm['spatial']`` (float64, x then y).
The Visium readers also fill ``uns['spatial'][library_id]`` with ``images``, ``scalefactors`` and
``metadata`` exactly as :func:`scanpy.read_visium` and :func:`squidpy.read.visium` do, so scanpy and
squidpy plots work on the result.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from spavae.data.hdf5 import decode_strings, open_hdf5
from spavae.data.preprocess import check_locations

GENE_EXPRESSION = "Gene Expression"
MATRIX_FILE = "filtered_feature_bc_matrix.h5"
XENIUM_MATRIX_FILE = "cell_feature_matrix.h5"
POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
POSITION_FILES = ("tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv")
IMAGE_FILES = {"hires": "tissue_hires_image.png", "lowres": "tissue_lowres_image.png"}
BIN_FOLDER = re.compile(r"^square_(\d{3})um$")
IO_EXTRA_HINT = "pip install spavae[io]"


def _read_matrix(path: Path) -> tuple[ad.AnnData, dict]:
    """The 10x HDF5 matrix as (AnnData with every feature, file attributes)."""
    with open_hdf5(path) as h5:
        if "matrix" not in h5:
            raise ValueError(
                f"{path} has no 'matrix' group: it is not a 10x feature-barcode matrix of Cell Ranger/Space Ranger "
                f"3 or later (groups present: {sorted(h5.keys())})"
            )
        group = h5["matrix"]
        needed = ["data", "indices", "indptr", "shape", "barcodes", "features/id", "features/name",
                  "features/feature_type"]
        missing = [name for name in needed if name not in group]
        if missing:
            raise KeyError(f"{path}: the 10x matrix lacks matrix/{missing}; the file is truncated or not a 10x matrix")
        n_features, n_barcodes = (int(n) for n in group["shape"][()])
        data, indices, indptr = group["data"][()], group["indices"][()], group["indptr"][()]
        barcodes = decode_strings(group["barcodes"][()])
        features = group["features"]
        var = pd.DataFrame({
            "gene_ids": decode_strings(features["id"][()]),
            "gene_names": decode_strings(features["name"][()]),
            "feature_types": decode_strings(features["feature_type"][()]),
        })
        if "genome" in features:
            var["genome"] = decode_strings(features["genome"][()])
        attrs = {key: (value.decode() if isinstance(value, bytes) else value) for key, value in h5.attrs.items()}
    if n_barcodes == 0 or n_features == 0:
        raise ValueError(f"{path}: the matrix is empty ({n_barcodes} barcodes x {n_features} features)")
    if len(barcodes) != n_barcodes or len(var) != n_features or len(indptr) != n_barcodes + 1 \
            or len(indices) != len(data) or indptr[-1] != len(data):
        raise ValueError(
            f"{path}: matrix/shape says {n_features} features x {n_barcodes} barcodes but the file holds "
            f"{len(var)} features, {len(barcodes)} barcodes, {len(indptr) - 1} columns and {len(data)} values for "
            f"{len(indices)} indices (indptr ends at {indptr[-1]}); the file is damaged"
        )
    # 10x stores features x barcodes in CSC, which is the same arrays as barcodes x features in CSR.
    counts = sp.csr_matrix((data.astype(np.float32), indices, indptr), shape=(n_barcodes, n_features))
    var.index = pd.Index(var.pop("gene_names"))
    adata = ad.AnnData(X=counts, obs=pd.DataFrame(index=pd.Index(barcodes)), var=var)
    return adata, attrs


def read_10x_h5(path: str | os.PathLike, *, gene_expression_only: bool = True) -> ad.AnnData:
    """Read a 10x HDF5 feature-barcode matrix (Cell Ranger, Space Ranger, Xenium; version 3 or later).

    Parameters
    ----------
    path
        The ``.h5`` file, e.g. ``filtered_feature_bc_matrix.h5`` or ``cell_feature_matrix.h5``.
    gene_expression_only
        Keep only the ``'Gene Expression'`` features (drops antibody capture, Xenium control probes
        and codewords).

    Returns
    -------
    AnnData with barcodes x features counts (CSR, float32) in ``.X``, the barcodes as ``obs_names``
    in file order, gene names (made unique) as ``var_names`` and ``var['gene_ids']``,
    ``var['feature_types']`` and, when present, ``var['genome']``. No coordinates.
    """
    adata, _ = _read_matrix(Path(path))
    return _gene_expression(adata, Path(path)) if gene_expression_only else _unique_var_names(adata)


def _gene_expression(adata: ad.AnnData, path: Path) -> ad.AnnData:
    keep = (adata.var["feature_types"] == GENE_EXPRESSION).to_numpy()
    if not keep.any():
        raise ValueError(
            f"{path} has no '{GENE_EXPRESSION}' features (feature types: {sorted(set(adata.var['feature_types']))})"
        )
    return _unique_var_names(adata[:, keep].copy())


def _unique_var_names(adata: ad.AnnData) -> ad.AnnData:
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    return adata


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        import pyarrow  # noqa: F401
    except ImportError as err:
        raise ImportError(f"reading {path.name} needs pyarrow; install it with: {IO_EXTRA_HINT}") from err
    return pd.read_parquet(path, engine="pyarrow")


def _positions_file(spatial_dir: Path) -> Path:
    for name in POSITION_FILES:
        if (spatial_dir / name).is_file():
            return spatial_dir / name
    raise FileNotFoundError(
        f"{spatial_dir} has no positions file (one of {', '.join(POSITION_FILES)}); copy the whole spatial/ "
        "folder of the Space Ranger output"
    )


def read_tissue_positions(spatial_dir: str | os.PathLike) -> pd.DataFrame:
    """Read the spot/bin positions of a Space Ranger ``spatial/`` folder.

    Looks for ``tissue_positions.parquet`` (Visium HD), ``tissue_positions.csv`` (Space Ranger 2.0+,
    with header) and ``tissue_positions_list.csv`` (older, no header), in that order.

    Returns
    -------
    DataFrame indexed by barcode with ``in_tissue``, ``array_row``, ``array_col``,
    ``pxl_row_in_fullres`` and ``pxl_col_in_fullres``.
    """
    path = _positions_file(Path(spatial_dir))
    if path.suffix == ".parquet":
        positions = _read_parquet(path)
    elif path.name == "tissue_positions.csv":
        positions = pd.read_csv(path)
    else:
        positions = pd.read_csv(path, header=None)
        if positions.shape[1] != len(POSITION_COLUMNS):
            raise ValueError(f"{path}: expected {len(POSITION_COLUMNS)} columns {POSITION_COLUMNS}, "
                             f"found {positions.shape[1]}")
        positions.columns = POSITION_COLUMNS
    missing = [c for c in POSITION_COLUMNS if c not in positions.columns]
    if missing:
        raise KeyError(f"{path} lacks the column(s) {missing}; columns present: {list(positions.columns)}")
    positions["barcode"] = decode_strings(positions["barcode"].to_numpy())
    if not positions["barcode"].is_unique:
        raise ValueError(f"{path}: {int(positions['barcode'].duplicated().sum())} barcode(s) appear twice")
    return positions.set_index("barcode")[POSITION_COLUMNS[1:]]


def _match(barcodes: pd.Index, table: pd.DataFrame, *, matrix: Path, table_path: Path, what: str) -> pd.DataFrame:
    """Rows of ``table`` in the order of ``barcodes``; a clear error when some barcodes are missing."""
    missing = barcodes.difference(table.index)
    if len(missing):
        raise ValueError(
            f"{len(missing)} of {len(barcodes)} {what} in {matrix.name} are not in {table_path} (e.g. "
            f"{list(missing[:3])}); the two files come from different runs"
        )
    return table.loc[barcodes]


def _read_images(spatial_dir: Path) -> dict[str, np.ndarray]:
    from matplotlib.image import imread

    return {res: imread(spatial_dir / name) for res, name in IMAGE_FILES.items() if (spatial_dir / name).is_file()}


def _read_spaceranger(folder: Path, *, library_id: str | None, load_images: bool, fmt: str) -> ad.AnnData:
    """A Space Ranger folder holding ``filtered_feature_bc_matrix.h5`` and ``spatial/`` (Visium or one HD bin)."""
    matrix_path, spatial_dir = folder / MATRIX_FILE, folder / "spatial"
    if not matrix_path.is_file():
        raise FileNotFoundError(f"{folder} has no {MATRIX_FILE}; pass the Space Ranger 'outs' folder")
    if not spatial_dir.is_dir():
        raise FileNotFoundError(f"{folder} has no spatial/ folder with the positions and scale factors")
    positions_file, scalefactors_path = _positions_file(spatial_dir), spatial_dir / "scalefactors_json.json"
    if not scalefactors_path.is_file():
        raise FileNotFoundError(f"{spatial_dir} has no scalefactors_json.json; copy the whole spatial/ folder")
    adata, attrs = _read_matrix(matrix_path)
    adata = _gene_expression(adata, matrix_path)
    positions = _match(adata.obs_names, read_tissue_positions(spatial_dir), matrix=matrix_path,
                       table_path=positions_file, what="barcodes")
    in_tissue = positions["in_tissue"].to_numpy() == 1
    if not in_tissue.any():
        raise ValueError(f"none of the {adata.n_obs} barcodes of {matrix_path} is in the tissue (in_tissue == 1 in "
                         f"{positions_file}); check that the positions file belongs to this run")
    if not in_tissue.all():
        warnings.warn(f"{int((~in_tissue).sum())} of the {adata.n_obs} barcodes of {matrix_path} are outside the "
                      "tissue (in_tissue == 0 in the positions file) and were dropped", stacklevel=3)
        adata, positions = adata[in_tissue].copy(), positions.loc[in_tissue]
    for column in ("in_tissue", "array_row", "array_col"):
        adata.obs[column] = positions[column].to_numpy().astype(np.int64)
    adata.obsm["spatial"] = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    check_locations(adata.obsm["spatial"], adata.n_obs, where=str(positions_file))
    if library_id is None:
        library_ids = attrs.get("library_ids")
        library_id = decode_strings(np.atleast_1d(library_ids))[0] if library_ids is not None else folder.name
    adata.uns["spatial"] = {library_id: {
        "images": _read_images(spatial_dir) if load_images else {},
        "scalefactors": json.loads(scalefactors_path.read_text()),
        "metadata": {k: str(attrs[k]) for k in ("chemistry_description", "software_version") if k in attrs},
    }}
    adata.uns["spavae_source"] = {"path": str(folder), "format": fmt}
    return adata


def read_visium(
    path: str | os.PathLike, *, library_id: str | None = None, load_images: bool = True
) -> ad.AnnData:
    """Read a 10x Space Ranger Visium output folder (the ``outs`` folder).

    Parameters
    ----------
    path
        Folder with ``filtered_feature_bc_matrix.h5`` and ``spatial/`` holding
        ``tissue_positions.csv`` (or the older header-less ``tissue_positions_list.csv``),
        ``scalefactors_json.json`` and, optionally, ``tissue_hires_image.png`` and
        ``tissue_lowres_image.png``.
    library_id
        Key of ``uns['spatial']``; default: the library id stored in the matrix file, else the
        folder name.
    load_images
        Read the hires/lowres PNG images into ``uns['spatial'][library_id]['images']``.

    Returns
    -------
    AnnData of the in-tissue spots: raw counts (CSR, float32) of the Gene Expression features in
    ``.X``; ``obs`` with ``in_tissue``, ``array_row``, ``array_col``; ``obsm['spatial']`` in
    full-resolution pixels (x = ``pxl_col_in_fullres``, y = ``pxl_row_in_fullres``, as scanpy);
    ``uns['spatial'][library_id]`` with ``images`` (``'hires'``/``'lowres'``, float32 RGB(A) in
    [0, 1]), ``scalefactors`` (the JSON) and ``metadata`` (``chemistry_description``,
    ``software_version``).
    """
    return _read_spaceranger(Path(path), library_id=library_id, load_images=load_images, fmt="visium")


def find_visium_hd_bin(path: str | os.PathLike, bin_size: int | None = None) -> Path:
    """The ``square_XXXum`` folder of a Visium HD output for ``bin_size`` micrometres.

    ``path`` is a bin folder itself (``binned_outputs/square_008um``), the ``binned_outputs``
    folder, or the Space Ranger ``outs`` folder holding ``binned_outputs/``.
    """
    path = Path(path)
    match = BIN_FOLDER.match(path.name)
    if match:
        if bin_size is not None and int(match.group(1)) != bin_size:
            raise ValueError(f"{path} holds {int(match.group(1))} um bins but bin_size={bin_size} was asked for; "
                             "pass the binned_outputs folder to choose the bin size")
        return path
    binned = path / "binned_outputs" if (path / "binned_outputs").is_dir() else path
    available = {int(m.group(1)): child for child in sorted(binned.iterdir()) if child.is_dir()
                 and (m := BIN_FOLDER.match(child.name))} if binned.is_dir() else {}
    if not available:
        raise FileNotFoundError(f"{path} has no square_XXXum bin folders (looked in {binned})")
    size = 8 if bin_size is None and 8 in available else bin_size
    if size is None:
        raise ValueError(f"{path}: no 8 um bins; choose bin_size from {sorted(available)}")
    if size not in available:
        raise ValueError(f"{path} has no {size} um bins; bin_size must be one of {sorted(available)}")
    return available[size]


def read_visium_hd(
    path: str | os.PathLike,
    *,
    bin_size: int | None = None,
    library_id: str | None = None,
    load_images: bool = True,
) -> ad.AnnData:
    """Read one bin size of a 10x Space Ranger Visium HD output.

    Parameters
    ----------
    path
        A bin folder (``binned_outputs/square_008um``), the ``binned_outputs`` folder, or the
        Space Ranger ``outs`` folder. The bin folder holds ``filtered_feature_bc_matrix.h5`` and
        ``spatial/`` with ``tissue_positions.parquet`` (needs pyarrow: ``pip install spavae[io]``),
        ``scalefactors_json.json`` and optional images.
    bin_size
        Bin size in micrometres (2, 8 or 16); default 8 when ``path`` is not a bin folder itself.
    library_id, load_images
        As in :func:`read_visium`.

    Returns
    -------
    AnnData of the in-tissue bins laid out as :func:`read_visium`'s (``obsm['spatial']`` in
    full-resolution pixels; ``uns['spatial'][library_id]['scalefactors']`` also holds
    ``bin_size_um`` and ``microns_per_pixel`` when Space Ranger wrote them).
    """
    folder = find_visium_hd_bin(path, bin_size)
    return _read_spaceranger(folder, library_id=library_id, load_images=load_images, fmt="visium-hd")


def _read_xenium_cells(folder: Path) -> tuple[pd.DataFrame, Path]:
    parquet, csv = folder / "cells.parquet", folder / "cells.csv.gz"
    if parquet.is_file():
        try:
            return _read_parquet(parquet), parquet
        except ImportError:
            if not csv.is_file():
                raise
    if csv.is_file():
        return pd.read_csv(csv), csv
    raise FileNotFoundError(f"{folder} has no cells.parquet or cells.csv.gz with the cell centroids")


def read_xenium(path: str | os.PathLike) -> ad.AnnData:
    """Read a 10x Xenium output folder.

    Parameters
    ----------
    path
        Folder with ``cell_feature_matrix.h5`` and ``cells.parquet`` (needs pyarrow:
        ``pip install spavae[io]``) or ``cells.csv.gz``, whose columns include ``cell_id``,
        ``x_centroid`` and ``y_centroid`` (micrometres).

    Returns
    -------
    AnnData of the cells in matrix order: raw counts (CSR, float32) of the Gene Expression
    features in ``.X`` (negative-control probes and codewords dropped), the other columns of the
    cells table (``transcript_counts``, ``cell_area``, ...) in ``obs`` and the centroids in
    ``obsm['spatial']`` (micrometres, x then y).
    """
    folder = Path(path)
    matrix_path = folder / XENIUM_MATRIX_FILE
    adata, _ = _read_matrix(matrix_path)
    adata = _gene_expression(adata, matrix_path)
    cells, cells_path = _read_xenium_cells(folder)
    missing = [c for c in ("cell_id", "x_centroid", "y_centroid") if c not in cells.columns]
    if missing:
        raise KeyError(f"{cells_path} lacks the column(s) {missing}; columns present: {list(cells.columns)}")
    cells = cells.assign(cell_id=decode_strings(cells["cell_id"].to_numpy())).set_index("cell_id")
    cells = _match(adata.obs_names, cells, matrix=matrix_path, table_path=cells_path, what="cell ids")
    adata.obsm["spatial"] = cells[["x_centroid", "y_centroid"]].to_numpy(dtype=np.float64)
    check_locations(adata.obsm["spatial"], adata.n_obs, where=str(cells_path))
    for column in cells.columns.drop(["x_centroid", "y_centroid"]):
        adata.obs[column] = cells[column].to_numpy()
    adata.uns["spavae_source"] = {"path": str(folder), "format": "xenium"}
    return adata


def write_visium(adata: ad.AnnData, folder: str | os.PathLike, *, library_id: str | None = None,
                 layer: str | None = None, overwrite: bool = False) -> Path:
    """Write ``adata`` as a Space Ranger Visium output folder that :func:`read_visium` reads back.

    The folder gets ``filtered_feature_bc_matrix.h5`` (the counts of ``.X`` or ``layers[layer]`` as integers, every
    gene a ``'Gene Expression'`` feature, the spot names as barcodes) and ``spatial/`` with
    ``tissue_positions.csv`` (every spot in tissue; ``obs['array_row']``/``obs['array_col']`` and the
    full-resolution pixels of ``obsm['spatial']``, x then y), ``scalefactors_json.json`` and the ``hires``/``lowres``
    images of ``uns['spatial'][library_id]`` as PNGs. Useful to hand a section to tools that read Space Ranger
    output, and to build test folders.

    Parameters
    ----------
    adata
        Spots x genes with integer counts, ``obs['array_row']``, ``obs['array_col']`` and ``obsm['spatial']`` in
        full-resolution pixels; optionally ``uns['spatial'][library_id]`` with ``scalefactors`` and ``images``.
    folder
        The output folder (the ``outs/`` of a Space Ranger run); it must not exist unless ``overwrite``.
    library_id
        Key of ``uns['spatial']``; needed only when there are several.
    layer
        Layer with the counts (``None``: ``.X``).
    overwrite
        Write into an existing folder, replacing these files.
    """
    import h5py
    import matplotlib.pyplot as plt

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise ValueError(f"{folder} exists; give a new folder or overwrite=True")
    missing = [key for key in ("array_row", "array_col") if key not in adata.obs]
    if missing or "spatial" not in adata.obsm:
        raise ValueError(f"adata lacks {missing + ([] if 'spatial' in adata.obsm else ['obsm spatial'])}: a Visium "
                         "folder needs each spot's array row and column (obs) and full-resolution pixels "
                         "(obsm['spatial'])")
    counts = sp.csr_matrix(adata.layers[layer] if layer else adata.X)
    if counts.data.size and not (np.all(counts.data >= 0) and np.all(counts.data == np.round(counts.data))):
        raise ValueError(f"{'layers[' + repr(layer) + ']' if layer else 'adata.X'} does not hold integer counts; "
                         "a 10x matrix stores raw counts")
    library = {}
    libraries = adata.uns.get("spatial")
    if isinstance(libraries, dict) and libraries:
        if library_id is None and len(libraries) > 1:
            raise ValueError(f"uns['spatial'] holds several libraries {sorted(libraries)}; pass library_id=")
        library = libraries[library_id or next(iter(libraries))]
    spatial = folder / "spatial"
    spatial.mkdir(parents=True, exist_ok=True)
    csc = counts.T.tocsc().astype(np.int32)
    with h5py.File(folder / MATRIX_FILE, "w") as h5:
        group = h5.create_group("matrix")
        group["data"], group["indices"], group["indptr"] = csc.data, csc.indices, csc.indptr
        group["shape"] = np.array(csc.shape, dtype=np.int32)
        group["barcodes"] = np.array([str(name).encode() for name in adata.obs_names])
        features = group.create_group("features")
        genes = [str(name).encode() for name in adata.var_names]
        features["id"], features["name"] = np.array(genes), np.array(genes)
        features["feature_type"] = np.array([GENE_EXPRESSION.encode()] * len(genes))
    pixels = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    pd.DataFrame({"barcode": adata.obs_names.astype(str), "in_tissue": 1,
                  "array_row": adata.obs["array_row"].astype(int).to_numpy(),
                  "array_col": adata.obs["array_col"].astype(int).to_numpy(),
                  "pxl_row_in_fullres": pixels[:, 1], "pxl_col_in_fullres": pixels[:, 0]}).to_csv(
        spatial / "tissue_positions.csv", index=False)
    scalefactors = {key: float(value) for key, value in (library.get("scalefactors") or {}).items()}
    (spatial / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    for key, name in IMAGE_FILES.items():
        image = (library.get("images") or {}).get(key)
        if image is not None:
            plt.imsave(spatial / name, np.clip(np.asarray(image), 0, 1) if np.asarray(image).dtype.kind == "f"
                       else np.asarray(image))
    return folder
