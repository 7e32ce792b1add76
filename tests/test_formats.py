"""Readers for what users have: Space Ranger Visium and Visium HD folders, Xenium folders, SpatialData
stores, and :func:`spavae.read` telling them apart. Every fixture is a tiny folder written here in the
real layout (10x HDF5 matrix, positions csv/parquet, scale factors, PNG images)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from matplotlib.image import imsave

import spavae
from spavae.cli import main
from spavae.data import read_spatialdata, read_visium, read_visium_hd, read_xenium, write_spatialdata
from spavae.data.readers import detect_format

SCALEFACTORS = {"tissue_hires_scalef": 0.17, "tissue_lowres_scalef": 0.051, "fiducial_diameter_fullres": 144.5,
                "spot_diameter_fullres": 89.4}


def write_10x_h5(path: Path, counts: np.ndarray, barcodes, genes, feature_types=None, attrs=None) -> None:
    """Write ``counts`` (barcodes x features) as a 10x HDF5 matrix: features x barcodes in CSC."""
    csc = sp.csc_matrix(np.asarray(counts).T.astype(np.int32))
    feature_types = feature_types if feature_types is not None else ["Gene Expression"] * len(genes)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        for key, value in (attrs or {}).items():
            h5.attrs[key] = value
        group = h5.create_group("matrix")
        group["data"], group["indices"], group["indptr"] = csc.data, csc.indices, csc.indptr
        group["shape"] = np.array(csc.shape, dtype=np.int32)
        group["barcodes"] = np.array([b.encode() for b in barcodes])
        features = group.create_group("features")
        features["id"] = np.array([f"ENSG{i:05d}".encode() for i in range(len(genes))])
        features["name"] = np.array([g.encode() for g in genes])
        features["feature_type"] = np.array([t.encode() for t in feature_types])
        features["genome"] = np.array([b"GRCh38"] * len(genes))


def spot_table(n_spots: int, seed: int = 0) -> pd.DataFrame:
    """Positions of ``n_spots`` in-tissue spots on a grid, plus as many off-tissue spots (like Space Ranger)."""
    rng = np.random.default_rng(seed)
    n_all = 2 * n_spots
    side = int(np.ceil(np.sqrt(n_all)))
    rows, cols = np.divmod(np.arange(n_all), side)
    return pd.DataFrame({
        "barcode": [f"{''.join(rng.choice(list('ACGT'), 16))}-1" for _ in range(n_all)],
        "in_tissue": np.r_[np.ones(n_spots, int), np.zeros(n_all - n_spots, int)],
        "array_row": rows, "array_col": cols,
        "pxl_row_in_fullres": 1000 + 137 * rows + rng.integers(0, 5, n_all),
        "pxl_col_in_fullres": 2000 + 119 * cols + rng.integers(0, 5, n_all),
    })


def make_spaceranger(folder: Path, *, n_spots: int = 20, n_genes: int = 12, positions: str = "tissue_positions.csv",
                     images: bool = True, seed: int = 0) -> dict:
    """A Space Ranger folder (matrix + spatial/); returns what was written, for the checks."""
    rng = np.random.default_rng(seed)
    table = spot_table(n_spots, seed)
    in_tissue = table[table["in_tissue"] == 1].sample(frac=1.0, random_state=seed)  # matrix order != file order
    genes = [f"G{j}" for j in range(n_genes)] + ["CD3-TotalSeqB"]
    counts = rng.poisson(3.0, size=(n_spots, n_genes + 1))
    write_10x_h5(folder / "filtered_feature_bc_matrix.h5", counts, list(in_tissue["barcode"]), genes,
                 ["Gene Expression"] * n_genes + ["Antibody Capture"],
                 attrs={"library_ids": np.array([b"lib-A"]), "chemistry_description": "Spatial 3' v1",
                        "software_version": "spaceranger-2.1.0"})
    spatial = folder / "spatial"
    spatial.mkdir(parents=True, exist_ok=True)
    shuffled = table.sample(frac=1.0, random_state=seed + 1)
    if positions == "tissue_positions.csv":
        shuffled.to_csv(spatial / positions, index=False)
    elif positions == "tissue_positions_list.csv":
        shuffled.to_csv(spatial / positions, index=False, header=False)
    else:
        shuffled.to_parquet(spatial / positions, index=False)
    (spatial / "scalefactors_json.json").write_text(json.dumps(SCALEFACTORS))
    pictures = {"hires": rng.integers(0, 256, (12, 10, 3), dtype=np.uint8),
                "lowres": rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)}
    if images:
        for res, picture in pictures.items():
            imsave(spatial / f"tissue_{res}_image.png", picture)
    return {"counts": counts[:, :n_genes], "barcodes": list(in_tissue["barcode"]), "table": table,
            "pictures": pictures, "genes": genes[:n_genes]}


def make_xenium(folder: Path, *, n_cells: int = 15, cells_format: str = "csv.gz", seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    cell_ids = [f"aaa{chr(97 + i % 26)}{i:04d}-1" for i in range(n_cells)]
    genes = ["EPCAM", "CD3E", "ACTA2", "NegControlProbe_00031", "NegControlCodeword_0500", "BLANK_0006"]
    types = ["Gene Expression"] * 3 + ["Negative Control Probe", "Negative Control Codeword", "Unassigned Codeword"]
    counts = rng.poisson(2.0, size=(n_cells, len(genes)))
    write_10x_h5(folder / "cell_feature_matrix.h5", counts, cell_ids, genes, types)
    cells = pd.DataFrame({"cell_id": cell_ids, "x_centroid": rng.uniform(0, 500, n_cells).round(4),
                          "y_centroid": rng.uniform(0, 300, n_cells).round(4),
                          "transcript_counts": counts[:, :3].sum(1), "cell_area": rng.uniform(20, 80, n_cells).round(4)})
    cells = cells.sample(frac=1.0, random_state=seed)  # file order != matrix order
    if cells_format == "parquet":
        cells.to_parquet(folder / "cells.parquet", index=False)
    else:
        cells.to_csv(folder / "cells.csv.gz", index=False)
    return {"counts": counts[:, :3], "cell_ids": cell_ids, "cells": cells.set_index("cell_id")}


# --- Visium ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["tissue_positions.csv", "tissue_positions_list.csv"])
def test_visium_counts_coordinates_and_barcode_order(tmp_path, positions):
    written = make_spaceranger(tmp_path / "outs", positions=positions)
    adata = read_visium(tmp_path / "outs")
    assert list(adata.obs_names) == written["barcodes"]
    assert list(adata.var_names) == written["genes"]  # the antibody feature is dropped
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), written["counts"])
    table = written["table"].set_index("barcode").loc[written["barcodes"]]
    np.testing.assert_array_equal(adata.obsm["spatial"][:, 0], table["pxl_col_in_fullres"])  # x = column
    np.testing.assert_array_equal(adata.obsm["spatial"][:, 1], table["pxl_row_in_fullres"])  # y = row
    assert adata.obsm["spatial"].dtype == np.float64
    np.testing.assert_array_equal(adata.obs["array_row"], table["array_row"])
    np.testing.assert_array_equal(adata.obs["array_col"], table["array_col"])
    assert (adata.obs["in_tissue"] == 1).all()
    assert list(adata.var["feature_types"].unique()) == ["Gene Expression"]


def test_visium_uns_spatial_has_the_scanpy_layout(tmp_path):
    written = make_spaceranger(tmp_path / "outs")
    adata = read_visium(tmp_path / "outs")
    assert list(adata.uns["spatial"]) == ["lib-A"]
    library = adata.uns["spatial"]["lib-A"]
    assert set(library) == {"images", "scalefactors", "metadata"}
    assert library["scalefactors"] == SCALEFACTORS
    assert library["metadata"] == {"chemistry_description": "Spatial 3' v1", "software_version": "spaceranger-2.1.0"}
    for res, picture in written["pictures"].items():
        image = library["images"][res]
        assert image.dtype == np.float32 and image.shape[:2] == picture.shape[:2]
        np.testing.assert_allclose(image[..., :3], picture / 255.0, atol=1e-6)
    # scanpy's plots place spots at obsm['spatial'] * scalefactor on the image: check that lands inside
    hires_xy = adata.obsm["spatial"] * SCALEFACTORS["tissue_hires_scalef"]
    assert hires_xy.min() > 0


def test_visium_keeps_only_in_tissue_spots_and_images_are_optional(tmp_path):
    written = make_spaceranger(tmp_path / "outs", images=False)
    path = tmp_path / "outs" / "spatial" / "tissue_positions.csv"
    table = pd.read_csv(path)
    off = table["barcode"].isin(written["barcodes"][:3])
    table.loc[off, "in_tissue"] = 0
    table.to_csv(path, index=False)
    with pytest.warns(UserWarning, match="3 of the 20 barcodes .* are outside the tissue"):
        adata = read_visium(tmp_path / "outs", library_id="mine")
    assert list(adata.obs_names) == written["barcodes"][3:]
    np.testing.assert_array_equal(adata.X.toarray(), written["counts"][3:])
    assert adata.uns["spatial"]["mine"]["images"] == {}


def test_visium_positions_with_missing_pixels_are_refused(tmp_path):
    make_spaceranger(tmp_path / "outs", positions="tissue_positions_list.csv")
    path = tmp_path / "outs" / "spatial" / "tissue_positions_list.csv"
    table = pd.read_csv(path, header=None)
    table.loc[table[1] == 1, 5] = table.loc[table[1] == 1, 5].where(lambda v: v.index % 2 == 0)
    table.to_csv(path, header=False, index=False)
    with pytest.raises(ValueError, match=r"tissue_positions_list.csv: \d+ spot location\(s\) are NaN"):
        read_visium(tmp_path / "outs")


def test_visium_with_every_spot_outside_the_tissue_is_refused(tmp_path):
    make_spaceranger(tmp_path / "outs")
    path = tmp_path / "outs" / "spatial" / "tissue_positions.csv"
    pd.read_csv(path).assign(in_tissue=0).to_csv(path, index=False)
    with pytest.raises(ValueError, match="none of the 20 barcodes .* is in the tissue"):
        read_visium(tmp_path / "outs")


def test_visium_barcodes_not_in_the_positions_file_are_refused(tmp_path):
    make_spaceranger(tmp_path / "outs", seed=0)
    make_spaceranger(tmp_path / "other", seed=1)
    (tmp_path / "other" / "spatial" / "tissue_positions.csv").replace(
        tmp_path / "outs" / "spatial" / "tissue_positions.csv")
    with pytest.raises(ValueError, match="20 of 20 barcodes .* different runs"):
        read_visium(tmp_path / "outs")


@pytest.mark.parametrize("remove,match", [("spatial/tissue_positions.csv", "no positions file"),
                                          ("spatial/scalefactors_json.json", "no scalefactors_json.json"),
                                          ("filtered_feature_bc_matrix.h5", "no filtered_feature_bc_matrix.h5")])
def test_visium_missing_files_are_named(tmp_path, remove, match):
    make_spaceranger(tmp_path / "outs")
    (tmp_path / "outs" / remove).unlink()
    with pytest.raises(FileNotFoundError, match=match):
        read_visium(tmp_path / "outs")


def test_empty_or_damaged_matrix_is_refused(tmp_path):
    make_spaceranger(tmp_path / "outs")
    write_10x_h5(tmp_path / "outs" / "filtered_feature_bc_matrix.h5", np.zeros((0, 3)), [], ["A", "B", "C"])
    with pytest.raises(ValueError, match=r"the matrix is empty \(0 barcodes x 3 features\)"):
        read_visium(tmp_path / "outs")
    make_spaceranger(tmp_path / "outs")
    with h5py.File(tmp_path / "outs" / "filtered_feature_bc_matrix.h5", "r+") as h5:
        indptr = h5["matrix/indptr"][()]
        del h5["matrix/indptr"]
        h5["matrix/indptr"] = indptr[:-1]  # a column lost
    with pytest.raises(ValueError, match="20 barcodes, 19 columns .* the file is damaged"):
        read_visium(tmp_path / "outs")
    with h5py.File(tmp_path / "outs" / "filtered_feature_bc_matrix.h5", "w") as h5:
        h5["X"] = np.ones((2, 2))
    with pytest.raises(ValueError, match="no 'matrix' group"):
        read_visium(tmp_path / "outs")
    (tmp_path / "outs" / "filtered_feature_bc_matrix.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match="not a readable HDF5 file"):
        read_visium(tmp_path / "outs")


def test_only_non_gene_features_is_refused(tmp_path):
    make_spaceranger(tmp_path / "outs")
    write_10x_h5(tmp_path / "outs" / "filtered_feature_bc_matrix.h5", np.ones((2, 1)), ["a-1", "b-1"], ["CD3"],
                 ["Antibody Capture"])
    with pytest.raises(ValueError, match="no 'Gene Expression' features"):
        read_visium(tmp_path / "outs")


# --- Visium HD -------------------------------------------------------------------------------------------


def make_visium_hd(root: Path, sizes=(2, 8, 16)) -> dict:
    return {size: make_spaceranger(root / "binned_outputs" / f"square_{size:03d}um", n_spots=6 + size,
                                   positions="tissue_positions.parquet", seed=size) for size in sizes}


def test_visium_hd_bin_folder_root_and_bin_size(tmp_path):
    pytest.importorskip("pyarrow")
    written = make_visium_hd(tmp_path / "outs")
    for path, kwargs, size in [(tmp_path / "outs" / "binned_outputs" / "square_016um", {}, 16),
                               (tmp_path / "outs", {}, 8),
                               (tmp_path / "outs", {"bin_size": 2}, 2),
                               (tmp_path / "outs" / "binned_outputs", {"bin_size": 16}, 16)]:
        adata = read_visium_hd(path, **kwargs)
        assert list(adata.obs_names) == written[size]["barcodes"], (path, kwargs)
        np.testing.assert_array_equal(adata.X.toarray(), written[size]["counts"])
        table = written[size]["table"].set_index("barcode").loc[written[size]["barcodes"]]
        np.testing.assert_array_equal(adata.obsm["spatial"],
                                      table[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy())
        assert adata.uns["spavae_source"]["format"] == "visium-hd"
    assert spavae.read(tmp_path / "outs", bin_size=16).n_obs == 6 + 16


def test_visium_hd_wrong_bin_size_names_the_available_ones(tmp_path):
    pytest.importorskip("pyarrow")
    make_visium_hd(tmp_path / "outs", sizes=(2, 16))
    with pytest.raises(ValueError, match=r"no 4 um bins; bin_size must be one of \[2, 16\]"):
        read_visium_hd(tmp_path / "outs", bin_size=4)
    with pytest.raises(ValueError, match=r"no 8 um bins; choose bin_size from \[2, 16\]"):
        read_visium_hd(tmp_path / "outs")
    with pytest.raises(ValueError, match="holds 16 um bins but bin_size=2"):
        read_visium_hd(tmp_path / "outs" / "binned_outputs" / "square_016um", bin_size=2)
    with pytest.raises(FileNotFoundError, match="no square_XXXum bin folders"):
        read_visium_hd(tmp_path)


def test_parquet_without_pyarrow_says_which_extra(tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    make_visium_hd(tmp_path / "outs", sizes=(8,))
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    with pytest.raises(ImportError, match=r"tissue_positions.parquet needs pyarrow.*pip install spavae\[io\]"):
        read_visium_hd(tmp_path / "outs")


# --- Xenium ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cells_format", ["csv.gz", "parquet"])
def test_xenium_counts_centroids_and_controls_dropped(tmp_path, cells_format):
    if cells_format == "parquet":
        pytest.importorskip("pyarrow")
    written = make_xenium(tmp_path / "xenium", cells_format=cells_format)
    adata = read_xenium(tmp_path / "xenium")
    assert list(adata.obs_names) == written["cell_ids"]
    assert list(adata.var_names) == ["EPCAM", "CD3E", "ACTA2"]
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), written["counts"])
    cells = written["cells"].loc[written["cell_ids"]]
    np.testing.assert_allclose(adata.obsm["spatial"], cells[["x_centroid", "y_centroid"]].to_numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(adata.obs["cell_area"], cells["cell_area"])
    np.testing.assert_array_equal(adata.obs["transcript_counts"], written["counts"].sum(1))


def test_xenium_cells_of_another_run_and_missing_cells_file(tmp_path):
    make_xenium(tmp_path / "xenium")
    cells = pd.read_csv(tmp_path / "xenium" / "cells.csv.gz")
    cells.iloc[2:].to_csv(tmp_path / "xenium" / "cells.csv.gz", index=False)
    with pytest.raises(ValueError, match=r"2 of 15 cell ids in cell_feature_matrix.h5 are not in .*cells.csv.gz"):
        read_xenium(tmp_path / "xenium")
    cells.drop(columns="y_centroid").to_csv(tmp_path / "xenium" / "cells.csv.gz", index=False)
    with pytest.raises(KeyError, match="lacks the column"):
        read_xenium(tmp_path / "xenium")
    (tmp_path / "xenium" / "cells.csv.gz").unlink()
    with pytest.raises(FileNotFoundError, match="no cells.parquet or cells.csv.gz"):
        read_xenium(tmp_path / "xenium")


# --- spavae.read tells the format ----------------------------------------------------------------------


def test_read_tells_every_format_from_the_path(tmp_path, small_adata):
    make_spaceranger(tmp_path / "visium")
    make_xenium(tmp_path / "xenium")
    (tmp_path / "hd" / "binned_outputs" / "square_008um").mkdir(parents=True)
    (tmp_path / "store.zarr").mkdir()
    small_adata.write_h5ad(tmp_path / "a.h5ad")
    with h5py.File(tmp_path / "a.h5", "w") as h5:
        h5["X"], h5["pos"] = small_adata.X, small_adata.obsm["spatial"]
    expected = {"visium": "visium", "xenium": "xenium", "hd": "visium-hd",
                "hd/binned_outputs/square_008um": "visium-hd", "store.zarr": "spatialdata", "a.h5ad": "h5ad",
                "a.h5": "spavae-h5"}
    assert {name: detect_format(tmp_path / name) for name in expected} == expected
    assert spavae.read(tmp_path / "visium").uns["spavae_source"]["format"] == "visium"
    assert spavae.read(tmp_path / "xenium").n_obs == 15
    assert spavae.read(tmp_path / "a.h5").n_obs == small_adata.n_obs


def test_read_refuses_what_it_cannot_tell(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "counts.csv").write_text("a,b\n1,2\n")
    for path in (tmp_path / "notes", tmp_path / "counts.csv"):
        with pytest.raises(ValueError, match="cannot tell the format .* Visium folder .* Xenium .* .h5ad"):
            spavae.read(path)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        spavae.read(tmp_path / "missing")
    make_spaceranger(tmp_path / "outs")
    with pytest.raises(ValueError, match="10x count matrix without coordinates; pass the folder"):
        spavae.read(tmp_path / "outs" / "filtered_feature_bc_matrix.h5")


def test_cli_run_on_a_visium_folder(tmp_path):
    make_spaceranger(tmp_path / "outs", n_spots=100, n_genes=30)
    out = tmp_path / "results"
    assert main(["run", str(tmp_path / "outs"), "--out", str(out), "--epochs", "3", "--n-domains", "3", "--quiet",
                 "--threads", "1"]) == 0
    results = spavae.read_h5ad(out / "results.h5ad")
    assert results.n_obs == 100 and results.obsm["X_spavae"].shape[0] == 100
    assert results.obs["spavae_domain"].nunique() <= 3
    assert results.uns["spatial"]["lib-A"]["scalefactors"]["spot_diameter_fullres"] == 89.4
    assert results.uns["spatial"]["lib-A"]["images"]["hires"].shape[:2] == (12, 10)


# --- SpatialData (needs the spatialdata extra) --------------------------------------------------------------


def make_spatialdata(n_spots: int = 30, *, with_obsm: bool = False, seed: int = 0):
    """Circles 'spots' and 'cells' annotated by one table (region_key 'region', instance_key 'spot_id')."""
    spatialdata = pytest.importorskip("spatialdata")
    from spatialdata.models import ShapesModel, TableModel

    rng = np.random.default_rng(seed)
    shapes, tables = {}, []
    for region, n, offset in (("spots", n_spots, 0.0), ("cells", 7, 1000.0)):
        xy = rng.uniform(0, 100, size=(n, 2)) + offset
        ids = np.arange(n) * 3 + 5  # instance ids that are not row numbers
        shapes[region] = ShapesModel.parse(xy, geometry=0, radius=np.full(n, 2.0), index=ids)
        counts = rng.poisson(2.0, size=(n, 8)).astype(np.float32)
        table = ad.AnnData(X=sp.csr_matrix(counts),
                           obs=pd.DataFrame({"region": region, "spot_id": ids},
                                            index=[f"{region}{i}" for i in range(n)]))
        table.obsm["xy"] = xy
        tables.append(table)
    order = rng.permutation(n_spots + 7)  # table rows not in shape order
    table = ad.concat(tables)[order].copy()
    table.obs["region"] = pd.Categorical(table.obs["region"])
    xy = table.obsm.pop("xy")
    if with_obsm:
        table.obsm["spatial"] = xy
    table = TableModel.parse(table, region=["spots", "cells"], region_key="region", instance_key="spot_id")
    return spatialdata.SpatialData(shapes=shapes, tables={"table": table}), xy


@pytest.mark.parametrize("with_obsm", [False, True])
def test_spatialdata_table_counts_and_region_coordinates(with_obsm):
    sdata, xy = make_spatialdata(with_obsm=with_obsm)
    table = sdata.tables["table"]
    adata = read_spatialdata(sdata, region="spots")
    spots = (table.obs["region"] == "spots").to_numpy()
    assert list(adata.obs_names) == list(table.obs_names[spots])
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), table.X[spots].toarray())
    np.testing.assert_allclose(adata.obsm["spatial"], xy[spots])  # shape centroids == the circles' centres
    assert adata.uns["spavae_source"] == {"format": "spatialdata", "table_key": "table", "region": "spots",
                                          "path": ""}


def test_spatialdata_errors_name_the_choice():
    sdata, _ = make_spatialdata()
    with pytest.raises(ValueError, match=r"annotates several regions \['spots', 'cells'\]; choose one with region="):
        read_spatialdata(sdata)
    with pytest.raises(KeyError, match="no table 'counts'; tables: \\['table'\\]"):
        read_spatialdata(sdata, table_key="counts", region="spots")
    with pytest.raises(KeyError, match="does not annotate region 'nuclei'"):
        read_spatialdata(sdata, region="nuclei")
    del sdata.shapes["spots"]
    with pytest.raises(KeyError, match="region 'spots' is not an element"):
        read_spatialdata(sdata, region="spots")


def test_spatialdata_zarr_store_read_and_results_written_back(tmp_path):
    sdata, _ = make_spatialdata()
    store = tmp_path / "section.zarr"
    sdata.write(store)
    adata = spavae.read(store, region="spots")
    assert adata.uns["spavae_source"]["path"] == str(store)
    kept = adata[adata.obs_names[2:]].copy()  # as after filter_empty dropped two spots
    latent = np.arange(kept.n_obs * 3, dtype=np.float64).reshape(-1, 3)
    kept.obsm["X_spavae"] = latent
    kept.obs["spavae_domain"] = pd.Categorical((np.arange(kept.n_obs) % 2).astype(str))
    kept.obs["spavae_domain_refined"] = (np.arange(kept.n_obs) % 3).astype(str)  # plain strings
    write_spatialdata(kept, store)
    import spatialdata

    table = spatialdata.read_zarr(store).tables["table"]
    rows = table.obs_names.get_indexer(kept.obs_names)
    np.testing.assert_array_equal(table.obsm["X_spavae"][rows], latent)
    others = np.setdiff1d(np.arange(table.n_obs), rows)
    assert len(others) == 2 + 7 and np.isnan(table.obsm["X_spavae"][others]).all()
    for key in ("spavae_domain", "spavae_domain_refined"):
        assert list(table.obs[key].iloc[rows]) == list(kept.obs[key])
        assert table.obs[key].iloc[others].isna().all()
    assert set(spatialdata.read_zarr(store).tables) == {"table"}  # the backup copy is gone
    with pytest.raises(ValueError, match="holds no spavae results"):
        write_spatialdata(adata, store)


def test_spatialdata_without_the_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "spatialdata", None)
    (tmp_path / "s.zarr").mkdir()
    with pytest.raises(ImportError, match=r"pip install spavae\[spatialdata\]"):
        spavae.read(tmp_path / "s.zarr")


def test_spatialdata_model_results_go_back_into_the_table():
    sdata, _ = make_spatialdata(n_spots=40, with_obsm=True)
    adata = spavae.data.filter_empty(read_spatialdata(sdata, region="spots"))
    model = spavae.SpaVAE(adata, inducing_steps=2, seed=0)
    model.train(max_epochs=2, progress=False)
    model.write_results(adata, denoise=False)
    adata.obs["spavae_domain"] = pd.Categorical(spavae.analysis.cluster_kmeans(adata.obsm["X_spavae"], 2, seed=0)
                                                .astype(str))
    table = write_spatialdata(adata, sdata).tables["table"]
    rows = table.obs_names.get_indexer(adata.obs_names)
    np.testing.assert_array_equal(table.obsm["X_spavae"][rows], adata.obsm["X_spavae"])
    assert list(table.obs["spavae_domain"].iloc[rows]) == list(adata.obs["spavae_domain"])
    assert table.obs.loc[table.obs["region"] == "cells", "spavae_domain"].isna().all()
