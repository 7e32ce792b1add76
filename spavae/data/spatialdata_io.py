"""SpatialData in and out: read one table of a :class:`spatialdata.SpatialData` (object or ``.zarr``
store) as the AnnData spavae trains on, and write spavae's results back into that table.

SpatialData keeps counts in *tables* (AnnData) that annotate *regions* (shapes, points or labels
elements): ``table.uns['spatialdata_attrs']`` names the ``region`` (one element or several), the
``region_key`` column of ``obs`` telling each row's region and the ``instance_key`` column matching
each row to an instance (a shape's index, a label value) of its region. Needs the ``spatialdata``
extra: ``pip install spavae[spatialdata]``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from spavae.data.preprocess import check_counts, check_locations

if TYPE_CHECKING:
    from spatialdata import SpatialData

SPATIALDATA_EXTRA_HINT = "pip install spavae[spatialdata]"
RESULT_TAG = "spavae"


def _spatialdata():
    try:
        import spatialdata
    except ImportError as err:
        raise ImportError(f"SpatialData support needs the spatialdata package; install it with: "
                          f"{SPATIALDATA_EXTRA_HINT}") from err
    return spatialdata


def _load(source: SpatialData | str | os.PathLike) -> SpatialData:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such SpatialData store")
        spatialdata = _spatialdata()
        try:
            return spatialdata.read_zarr(path)
        except Exception as err:  # zarr/ome-zarr raise many types for a store that is not SpatialData
            raise ValueError(f"{path} is not a readable SpatialData zarr store ({type(err).__name__}: {err})") from err
    return source


def _table_key(sdata: SpatialData, table_key: str | None) -> str:
    keys = list(sdata.tables.keys())
    if not keys:
        raise ValueError("the SpatialData object has no table; spavae needs a table of counts (an AnnData "
                         "store written with write_zarr is not SpatialData: save it with write_h5ad and read that)")
    if table_key is None:
        return keys[0]
    if table_key not in keys:
        raise KeyError(f"the SpatialData object has no table '{table_key}'; tables: {keys}")
    return table_key


def _table_attrs(table: ad.AnnData, table_key: str) -> dict[str, Any]:
    from spatialdata.models import TableModel

    attrs = table.uns.get(TableModel.ATTRS_KEY)
    if not attrs:
        raise ValueError(f"table '{table_key}' annotates no region (no uns['{TableModel.ATTRS_KEY}']); "
                         "parse it with spatialdata.models.TableModel.parse(table, region=..., region_key=..., "
                         "instance_key=...)")
    return {"regions": [str(r) for r in np.atleast_1d(attrs[TableModel.REGION_KEY])],
            "region_key": attrs[TableModel.REGION_KEY_KEY], "instance_key": attrs[TableModel.INSTANCE_KEY]}


def _region_rows(
    table: ad.AnnData, attrs: dict[str, Any], region: str | None, table_key: str
) -> tuple[str, np.ndarray]:
    regions = attrs["regions"]
    if region is None:
        if len(regions) > 1:
            raise ValueError(f"table '{table_key}' annotates several regions {regions}; choose one with region=")
        region = regions[0]
    elif region not in regions:
        raise KeyError(f"table '{table_key}' does not annotate region '{region}'; it annotates {regions}")
    return region, (table.obs[attrs["region_key"]].astype(str) == region).to_numpy()


def _centroids(sdata: SpatialData, region: str, instances: pd.Series, coordinate_system: str) -> np.ndarray:
    """Centroids of ``instances`` of the region element, in ``coordinate_system``."""
    spatialdata = _spatialdata()
    if region not in sdata:
        raise KeyError(f"the table's region '{region}' is not an element of the SpatialData object")
    centroids = spatialdata.get_centroids(sdata[region], coordinate_system=coordinate_system).compute()
    missing = pd.Index(instances).difference(centroids.index)
    if len(missing):
        raise ValueError(f"{len(missing)} instance(s) of the table are not in region '{region}' (e.g. "
                         f"{list(missing[:3])}); the table and the region do not match")
    return centroids.loc[instances.to_numpy(), ["x", "y"]].to_numpy(dtype=np.float64)


def read_spatialdata(
    source: SpatialData | str | os.PathLike,
    *,
    table_key: str | None = None,
    region: str | None = None,
    layer: str | None = None,
    coordinate_system: str = "global",
) -> ad.AnnData:
    """Read one table of a SpatialData object or ``.zarr`` store as spavae's input.

    Parameters
    ----------
    source
        A :class:`spatialdata.SpatialData` or the path of its ``.zarr`` store.
    table_key
        Name of the table in ``sdata.tables``; default: the first (usually the only) table.
    region
        The region (element) whose rows to read, when the table annotates several.
    layer
        Layer of the table holding the raw counts; ``None`` uses ``.X``.
    coordinate_system
        Coordinate system of the region's centroids, used when the table has no ``obsm['spatial']``.

    Returns
    -------
    AnnData of the table rows of ``region``: raw counts (CSR, float32) in ``.X``, the table's
    ``obs`` (with its region and instance columns) and ``var``, and coordinates in
    ``obsm['spatial']``, taken from the table's ``obsm['spatial']`` or else the centroids of the
    region's shapes, points or labels. ``uns['spavae_source']`` records the table and region, for
    :func:`write_spatialdata`.
    """
    sdata = _load(source)
    table_key = _table_key(sdata, table_key)
    table = sdata.tables[table_key]
    attrs = _table_attrs(table, table_key)
    region, rows = _region_rows(table, attrs, region, table_key)
    table = table[rows]
    if layer is not None and layer not in table.layers:
        raise KeyError(f"table '{table_key}' has no layer '{layer}'; layers: {list(table.layers.keys())}")
    counts = table.X if layer is None else table.layers[layer]
    if counts is None:
        raise ValueError(f"table '{table_key}' has no .X; name the layer with the raw counts with layer=")
    counts = sp.csr_matrix(counts, dtype=np.float32)
    where = f"SpatialData table '{table_key}'"
    check_counts(counts, where=where)
    if "spatial" in table.obsm:
        locations = np.asarray(table.obsm["spatial"], dtype=np.float64)[:, :2]
    else:
        locations = _centroids(sdata, region, table.obs[attrs["instance_key"]], coordinate_system)
    check_locations(locations, table.n_obs, where=where)
    adata = ad.AnnData(X=counts, obs=table.obs.copy(), var=table.var.copy())
    adata.obsm["spatial"] = locations
    adata.uns["spavae_source"] = {"format": "spatialdata", "table_key": table_key, "region": region,
                                  "path": str(source) if isinstance(source, (str, os.PathLike)) else ""}
    return adata


def write_spatialdata(
    adata: ad.AnnData,
    target: SpatialData | str | os.PathLike,
    *,
    table_key: str | None = None,
    obsm_keys: tuple[str, ...] | None = None,
    obs_keys: tuple[str, ...] | None = None,
) -> SpatialData:
    """Write spavae's results (latent, domains) from ``adata`` back into a SpatialData table.

    Rows are matched by ``obs_names``; table rows that ``adata`` lacks (another region, spots
    removed as empty) get NaN in the latent and a missing domain.

    Parameters
    ----------
    adata
        The AnnData read by :func:`read_spatialdata` after :meth:`spavae.SpaVAE.write_results` and
        clustering.
    target
        The :class:`spatialdata.SpatialData` to update in memory, or the path of its ``.zarr``
        store, whose table is then rewritten on disk.
    table_key
        The table to update; default: the one ``adata`` was read from.
    obsm_keys, obs_keys
        What to copy; default every ``obsm`` and ``obs`` entry whose name contains ``'spavae'``
        (``obsm['X_spavae']``, ``obs['spavae_domain']``, ...).

    Returns
    -------
    The updated SpatialData.
    """
    sdata = _load(target)
    table_key = _table_key(sdata, table_key or adata.uns.get("spavae_source", {}).get("table_key"))
    table = sdata.tables[table_key]
    obsm_keys = obsm_keys if obsm_keys is not None else tuple(k for k in adata.obsm if RESULT_TAG in k)
    obs_keys = obs_keys if obs_keys is not None else tuple(c for c in adata.obs if RESULT_TAG in c)
    missing = [k for k in obsm_keys if k not in adata.obsm] + [k for k in obs_keys if k not in adata.obs]
    if missing:
        raise KeyError(f"adata has no {missing} to write; run model.write_results(adata) first")
    if not obsm_keys and not obs_keys:
        raise ValueError("adata holds no spavae results (no obsm/obs key containing 'spavae'); "
                         "run model.write_results(adata) first")
    if not table.obs_names.is_unique:
        raise ValueError(f"table '{table_key}' has duplicate obs_names, so rows cannot be matched; run "
                         "table.obs_names_make_unique() before read_spatialdata")
    unknown = adata.obs_names.difference(table.obs_names)
    if len(unknown):
        raise ValueError(f"{len(unknown)} row(s) of adata are not in table '{table_key}' (e.g. {list(unknown[:3])}); "
                         "write back into the SpatialData the data were read from")
    rows = table.obs_names.get_indexer(adata.obs_names)
    for key in obsm_keys:
        values = np.asarray(adata.obsm[key], dtype=np.float64)
        full = np.full((table.n_obs, values.shape[1]), np.nan)
        full[rows] = values
        table.obsm[key] = full
    for key in obs_keys:
        column = adata.obs[key]
        if column.dtype == object:  # strings: categorical, so that missing rows stay missing on disk
            column = column.astype("category")
        table.obs[key] = column.reindex(table.obs_names).array  # keeps categories; NaN where missing
    if isinstance(target, (str, os.PathLike)):
        _rewrite_table_on_disk(sdata, table_key)
    return sdata


def _rewrite_table_on_disk(sdata: SpatialData, table_key: str) -> None:
    """Replace the table in the store, keeping a full copy on disk at every moment.

    SpatialData refuses to overwrite an element of its own store in place; its documented way is to
    delete and write again, so a copy is written first and removed once the table is back.
    """
    backup = f"{table_key}_spavae_backup"
    if backup in sdata.tables:
        raise ValueError(f"the store holds a table '{backup}' left by an interrupted write_spatialdata; check "
                         f"table '{table_key}', then remove it with sdata.delete_element_from_disk('{backup}')")
    sdata.tables[backup] = sdata.tables[table_key]
    sdata.write_element(backup)
    sdata.delete_element_from_disk(table_key)
    sdata.write_element(table_key)
    sdata.delete_element_from_disk(backup)
    del sdata.tables[backup]
