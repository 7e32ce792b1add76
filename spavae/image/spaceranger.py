"""Attach a Space Ranger ``spatial/`` folder (images, scale factors, spot pixel positions) to an AnnData read
without them, matching spots by barcode.

Files in the original spaVAE layout (e.g. the DLPFC ``sample_<section>.h5``) hold only array coordinates;
the thumbnail, ``scalefactors_json.json`` and ``tissue_positions_list.csv`` of the section's ``spatial/``
folder give what the image features need.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import anndata as ad
import numpy as np

from spavae.data.tenx import IMAGE_FILES, read_tissue_positions

SCALEFACTORS_FILE = "scalefactors_json.json"


def add_spaceranger_image(
    adata: ad.AnnData,
    spatial_dir: str | os.PathLike,
    *,
    library_id: str | None = None,
    spatial_key: str = "spatial_fullres",
) -> None:
    """Add a Space Ranger ``spatial/`` folder's images, scale factors and spot pixel positions to ``adata``.

    Parameters
    ----------
    adata
        Spots named by their barcodes (``obs_names``), all of which must be in the folder's positions file.
        Modified in place.
    spatial_dir
        The ``spatial/`` folder: ``scalefactors_json.json``, a positions file (``tissue_positions.csv``,
        ``tissue_positions_list.csv`` or ``tissue_positions.parquet``) and ``tissue_lowres_image.png`` and/or
        ``tissue_hires_image.png``.
    library_id
        Key of ``uns['spatial']`` to fill; default: the folder's name (its parent's when it is called
        ``spatial``).
    spatial_key
        Key of ``obsm`` for the full-resolution pixel positions (x = ``pxl_col_in_fullres``, y =
        ``pxl_row_in_fullres``). The default leaves ``obsm['spatial']`` (the model's coordinates) alone; pass
        it to :func:`spavae.image.extract_image_features` as ``spatial_key``.

    Notes
    -----
    Fills ``uns['spatial'][library_id]`` with ``images`` (float32 RGB(A) in [0, 1] as
    :func:`spavae.read`), ``scalefactors`` (the JSON) and ``metadata`` (empty), and ``obsm[spatial_key]``.
    """
    from matplotlib.image import imread

    folder = Path(spatial_dir)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; give the Space Ranger spatial/ folder")
    scalefactors_path = folder / SCALEFACTORS_FILE
    if not scalefactors_path.is_file():
        raise ValueError(f"{folder} has no {SCALEFACTORS_FILE}; copy the whole spatial/ folder of the Space Ranger "
                         "output (the image scale and spot diameter are in it)")
    positions = read_tissue_positions(folder)
    missing = adata.obs_names.difference(positions.index)
    if len(missing):
        raise ValueError(f"{len(missing)} of {adata.n_obs} spots of adata are not in the positions file of {folder} "
                         f"(e.g. {list(missing[:3])}); obs_names must be the barcodes of this section's spots")
    if library_id is None:
        library_id = folder.parent.name if folder.name == "spatial" else folder.name
    images = {res: imread(folder / name) for res, name in IMAGE_FILES.items() if (folder / name).is_file()}
    adata.uns.setdefault("spatial", {})[library_id] = {
        "images": images, "scalefactors": json.loads(scalefactors_path.read_text()), "metadata": {}}
    adata.obsm[spatial_key] = positions.loc[adata.obs_names, ["pxl_col_in_fullres", "pxl_row_in_fullres"]] \
        .to_numpy(dtype=np.float64)
