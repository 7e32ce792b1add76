"""The tissue image as a second view (spavae.image): patch geometry, sources, masking, standardisation,
Space Ranger alignment and a simulated domain visible only in the image. Synthetic images, a few seconds."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

import spavae
from spavae.image import (FEATURE_NAMES, ImageFeatures, add_spaceranger_image, array_image, extract_image_features,
                          simulate_image_domain_section, spot_patches, tiff_image)
from spavae.image.extractor import RGB_FROM_HED

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dlpfc"
COLUMN = {name: j for j, name in enumerate(FEATURE_NAMES)}


def spots(coordinates, **uns) -> ad.AnnData:
    """An AnnData of ``len(coordinates)`` spots with ``obsm['spatial']`` and no counts worth the name."""
    coordinates = np.asarray(coordinates, dtype=np.float64)
    adata = ad.AnnData(np.zeros((len(coordinates), 1), np.float32),
                       obs=pd.DataFrame(index=[f"s{i}" for i in range(len(coordinates))]))
    adata.obsm["spatial"] = coordinates
    adata.uns.update(uns)
    return adata


def raw(features: ImageFeatures) -> np.ndarray:
    """The unstandardised features."""
    return features.values * features.scale + features.mean


@pytest.fixture(scope="module")
def section() -> ad.AnnData:
    return simulate_image_domain_section(n_rows=16, n_cols=16, n_genes=40, n_domains=4, seed=3)


# ---------------------------------------------------------------------------------------------- patch geometry
def test_patch_means_equal_hand_computed_disc_means():
    rng = np.random.default_rng(0)
    image = rng.random((90, 110, 3)).astype(np.float32)
    centres_full = np.array([[40.0, 30.0], [101.3, 77.9], [150.2, 20.6], [66.6, 140.1], [200.0, 150.0]])
    diameter_full = 13.0  # coordinates are at twice the image's resolution: 6.5 image pixels across
    adata = spots(centres_full)
    features = extract_image_features(adata, array_image(image, 0.5), spot_diameter=diameter_full,
                                      background=None, block_size=16)
    rows, cols = np.mgrid[0:90, 0:110]
    for i, (x, y) in enumerate(centres_full * 0.5):
        inside = (cols - x) ** 2 + (rows - y) ** 2 <= 3.25 ** 2
        pixels = image[inside].astype(np.float64)
        np.testing.assert_allclose(raw(features)[i, :3], pixels.mean(0), atol=1e-5)
        np.testing.assert_allclose(raw(features)[i, 3:6], pixels.std(0), atol=1e-5)
    assert features.settings["diameter_px"] == 6.5 and features.mask.all()


def test_uniform_discs_give_their_colour_and_pure_stains_deconvolve():
    hematoxylin = 10.0 ** -(RGB_FROM_HED[0] / np.linalg.norm(RGB_FROM_HED[0]))  # one unit of H
    eosin = 10.0 ** -(RGB_FROM_HED[1] / np.linalg.norm(RGB_FROM_HED[1]))
    image = np.ones((60, 60, 3), np.float32)
    rows, cols = np.mgrid[0:60, 0:60]
    for colour, (x, y) in ((hematoxylin, (15, 15)), (eosin, (44, 40))):
        image[(cols - x) ** 2 + (rows - y) ** 2 <= 8 ** 2] = colour
    features = extract_image_features(spots([[15, 15], [44, 40]]), array_image(image), spot_diameter=10,
                                      background=None)
    values = raw(features)
    np.testing.assert_allclose(values[0, :3], hematoxylin, atol=1e-6)
    np.testing.assert_allclose(values[:, 3:6], 0, atol=1e-6)
    np.testing.assert_allclose(values[0, [COLUMN["hematoxylin_mean"], COLUMN["eosin_mean"]]], [1, 0], atol=1e-5)
    np.testing.assert_allclose(values[1, [COLUMN["hematoxylin_mean"], COLUMN["eosin_mean"]]], [0, 1], atol=1e-5)
    np.testing.assert_allclose(values[:, COLUMN["gradient_mean"]], 0, atol=1e-6)


@pytest.mark.parametrize("diameter, n_pixels", [(4.0, 13), (2.0, 5), (0.5, 1), (0.01, 1)])
def test_small_spots_keep_the_pixels_whose_centres_they_cover(diameter, n_pixels):
    source = array_image(np.random.default_rng(1).random((20, 20, 3)))
    (patch,) = spot_patches(source, np.array([[10.0, 10.0]]), diameter)
    assert patch.mask.sum() == n_pixels and patch.coverage == 1.0


# ---------------------------------------------------------------------------------------------- masking
def test_off_image_and_background_spots_are_masked_and_reported():
    image = np.full((100, 100, 3), 0.95, np.float32)
    image[20:80, 20:80] = (0.8, 0.5, 0.7)
    image[20:80, 20:80] += np.random.default_rng(2).normal(0, 0.02, (60, 60, 3)).astype(np.float32)
    coordinates = [[50, 50], [30, 60], [-40, 50], [101, 50], [97, 50], [8, 8], [60, 30]]
    with pytest.warns(UserWarning, match=r"4 of 7 spots .*2 off image, 2 background"):
        features = extract_image_features(spots(coordinates), array_image(image), spot_diameter=8)
    assert features.reasons.tolist() == ["", "", "off_image", "off_image", "background", "background", ""]
    assert features.mask.tolist() == [True, True, False, False, False, False, True]
    assert np.all(features.values[~features.mask] == 0) and np.isfinite(features.values).all()
    np.testing.assert_allclose(features.settings["background_colour"], 0.95, atol=1e-6)
    with pytest.warns(UserWarning, match="2 of 7 spots"):
        features = extract_image_features(spots(coordinates), array_image(image), spot_diameter=8, background=None)
    assert features.reasons.tolist() == ["", "", "off_image", "off_image", "", "", ""]


# ---------------------------------------------------------------------------------------------- standardisation
def test_standardisation_is_fitted_once_and_reapplied_unchanged(section):
    features = extract_image_features(section, "hires")
    assert features.names == list(FEATURE_NAMES) and features.values.dtype == np.float32
    np.testing.assert_allclose(features.values.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(features.values.std(0), 1, atol=1e-4)
    subset = section[::7].copy()
    again = features.apply(subset)
    np.testing.assert_allclose(again.values, features.values[::7], atol=1e-6)
    assert again.obs_names.tolist() == subset.obs_names.tolist()
    restored = ImageFeatures.from_dict(json.loads(json.dumps(features.to_dict(), default=np.ndarray.tolist)))
    np.testing.assert_array_equal(restored.apply(subset).values, again.values)
    np.testing.assert_array_equal(features.select(subset.obs_names[::-1]).values, features.values[::7][::-1])

    other = simulate_image_domain_section(n_rows=10, n_cols=10, n_genes=20, n_domains=3, seed=9)
    own = extract_image_features(other, "hires")  # fitted on the new section: other statistics
    reused = features.apply(other)
    np.testing.assert_array_equal(reused.mean, features.mean)
    np.testing.assert_allclose(reused.values, (raw(own) - features.mean) / features.scale, atol=1e-4)
    assert not np.allclose(own.mean, features.mean)


def test_user_features_in_obsm(section):
    adata = section.copy()
    embedding = np.random.default_rng(4).normal(3.0, 2.0, (adata.n_obs, 6))
    embedding[5] = np.nan
    adata.obsm["X_uni"] = embedding
    with pytest.warns(UserWarning, match="1 missing"):
        features = extract_image_features(adata, "X_uni")
    usable = np.arange(adata.n_obs) != 5
    assert features.mask.tolist() == usable.tolist() and features.names[0] == "X_uni_0"
    np.testing.assert_allclose(features.mean, embedding[usable].mean(0))
    np.testing.assert_allclose(features.values[usable], (embedding[usable] - embedding[usable].mean(0))
                               / embedding[usable].std(0), atol=1e-5)
    new = adata[:10].copy()
    new.obsm["X_uni"] = embedding[:10] + 1.0
    with pytest.warns(UserWarning, match="1 missing"):
        shifted = features.apply(new)
    np.testing.assert_allclose(shifted.values[:5], features.values[:5] + 1.0 / features.scale, atol=1e-5)
    del new.obsm["X_uni"]
    with pytest.raises(ValueError, match="obsm has no 'X_uni'"):
        features.apply(new)
    adata.obsm["uni"] = pd.DataFrame(embedding[:, :2], index=adata.obs_names, columns=["uni_a", "uni_b"])
    with pytest.warns(UserWarning, match="1 missing"):
        assert extract_image_features(adata, "uni").names == ["uni_a", "uni_b"]


# ---------------------------------------------------------------------------------------------- TIFF
class ReadLog:
    """An array proxy that records the shape of every slice read through it."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.reads = array, array.shape, array.dtype, []

    def __getitem__(self, key):
        out = np.asarray(self.array[key])
        self.reads.append(out.shape)
        return out


def test_tiled_tiff_reads_equal_in_memory_reads_and_stay_local(tmp_path):
    tifffile = pytest.importorskip("tifffile", reason="TIFF images need tifffile (pip install tifffile)")
    rng = np.random.default_rng(5)
    image = (rng.random((300, 260, 3)) * 255).astype(np.uint8)
    path = tmp_path / "slide.tif"
    with tifffile.TiffWriter(path) as tiff:
        tiff.write(image, tile=(64, 64), photometric="rgb", subifds=1)
        tiff.write(image[::2, ::2], tile=(64, 64), photometric="rgb", subfiletype=1)
    centres = np.column_stack([rng.uniform(-5, 265, 60), rng.uniform(-5, 305, 60)])
    adata = spots(centres)
    options = {"spot_diameter": 20.0, "background": None, "block_size": 64}
    with pytest.warns(UserWarning, match="off image"):
        in_memory = extract_image_features(adata, array_image(image), **options)
    with pytest.warns(UserWarning, match="off image"):
        from_file = extract_image_features(adata, str(path), **options)
    np.testing.assert_allclose(from_file.values, in_memory.values, atol=1e-5)
    assert from_file.settings["source"] == {"kind": "tiff", "image": str(path), "level": 0, "series": 0}

    with tiff_image(path, level=1) as level1:
        assert level1.scale == 0.5
        with pytest.warns(UserWarning, match="off image"):
            pyramid = extract_image_features(adata, level1, **options)
    with pytest.warns(UserWarning, match="off image"):
        halved = extract_image_features(adata, array_image(image[::2, ::2], 0.5), **options)
    np.testing.assert_allclose(pyramid.values, halved.values, atol=1e-5)
    with pytest.warns(UserWarning, match="off image"):  # reopens the file at the stored level
        np.testing.assert_array_equal(pyramid.apply(adata).values, pyramid.values)

    striped = tmp_path / "striped.tif"  # uncompressed strips: read through a memory map
    tifffile.imwrite(striped, image, photometric="rgb", rowsperstrip=300)
    with tiff_image(striped) as source:
        assert isinstance(source.array, np.memmap)
        with pytest.warns(UserWarning, match="off image"):
            mapped = extract_image_features(adata, source, **options)
    np.testing.assert_allclose(mapped.values, in_memory.values, atol=1e-5)

    with tiff_image(path) as source:
        source.array = ReadLog(source.array)
        with pytest.warns(UserWarning, match="off image"):
            extract_image_features(adata, source, **options)
        areas = [rows * cols for rows, cols, _ in source.array.reads]
    assert len(areas) > 4 and max(areas) <= (64 + 22) ** 2 + 2 * 32 * 260  # blocks and the thin border strips


# ---------------------------------------------------------------------------------------------- SpatialData
def test_spatialdata_image_matches_the_array():
    pytest.importorskip("spatialdata", reason="the spatialdata extra is not installed: pip install spavae[spatialdata]")
    from spatialdata import SpatialData, get_pyramid_levels
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale, Sequence, Translation

    from spavae.image import spatialdata_image

    image = (np.random.default_rng(6).random((80, 90, 3)) * 255).astype(np.uint8)
    to_global = Sequence([Scale([2.0, 2.0], axes=("x", "y")), Translation([10.0, 20.0], axes=("x", "y"))])
    single = Image2DModel.parse(np.moveaxis(image, -1, 0), dims=("c", "y", "x"), transformations={"global": to_global})
    pyramid = Image2DModel.parse(np.moveaxis(image, -1, 0), dims=("c", "y", "x"), scale_factors=[2],
                                 transformations={"global": to_global})
    sdata = SpatialData(images={"he": single, "he_pyramid": pyramid})
    coordinates = np.array([[30, 40], [100, 90], [170, 150]])
    options = {"spot_diameter": 12, "background": None}
    expected = extract_image_features(spots(coordinates - [10, 20]), array_image(image, 0.5), **options)
    found = extract_image_features(spots(coordinates), spatialdata_image(sdata, "he"), **options)
    np.testing.assert_allclose(found.values, expected.values, atol=1e-5)
    level1 = np.moveaxis(np.asarray(get_pyramid_levels(sdata.images["he_pyramid"], n=1).data), 0, -1)
    expected = extract_image_features(spots(coordinates - [10, 20]), array_image(level1, 0.25), **options)
    found = extract_image_features(spots(coordinates), spatialdata_image(sdata, "he_pyramid", level=1), **options)
    np.testing.assert_allclose(found.values, expected.values, atol=1e-5)
    with pytest.raises(ValueError, match="no transformation to coordinate system 'aligned'"):
        spatialdata_image(sdata, "he", coordinate_system="aligned")
    with pytest.raises(ValueError, match="no image 'dapi'"):
        spatialdata_image(sdata, "dapi")


# ---------------------------------------------------------------------------------------------- Space Ranger
def dlpfc_spatial(name: str) -> Path:
    folder = SHARED / "spatial" / name
    if not (folder.is_dir() and (SHARED / f"sample_{name}.h5").is_file()):
        pytest.skip(f"shared DLPFC data not found at {folder} (it lives in ../shared beside the checkout)")
    return folder


def test_spaceranger_folder_is_aligned_by_barcode():
    folder = dlpfc_spatial("151507")
    adata = spavae.read_spavae_h5(SHARED / "sample_151507.h5")
    adata = adata[np.random.default_rng(7).permutation(adata.n_obs)].copy()
    array_coordinates = adata.obsm["spatial"].copy()
    add_spaceranger_image(adata, folder)
    with open(folder / "tissue_positions_list.csv") as handle:
        table = {row[0]: row for row in csv.reader(handle)}
    for barcode, (x, y) in zip(adata.obs_names[:50], adata.obsm["spatial_fullres"][:50]):
        assert (x, y) == (float(table[barcode][5]), float(table[barcode][4]))
    np.testing.assert_array_equal(adata.obsm["spatial"], array_coordinates)
    library = adata.uns["spatial"]["151507"]
    assert library["images"]["lowres"].shape == (600, 600, 3) and "tissue_lowres_scalef" in library["scalefactors"]

    with pytest.warns(UserWarning, match="background"):
        features = extract_image_features(adata, "auto", spatial_key="spatial_fullres")
    assert features.settings["source"]["image"] == "lowres"
    assert 4.0 < features.settings["diameter_px"] < 4.7
    assert (~features.mask).mean() < 0.03  # every spot of the file is in the tissue


def test_bad_inputs_give_one_line_errors(tmp_path, section):
    folder = dlpfc_spatial("151507")
    adata = spavae.read_spavae_h5(SHARED / "sample_151507.h5")[:20].copy()
    incomplete = tmp_path / "spatial"
    incomplete.mkdir()
    shutil.copy(folder / "tissue_positions_list.csv", incomplete)
    with pytest.raises(ValueError, match="no scalefactors_json.json"):
        add_spaceranger_image(adata, incomplete)
    other = adata.copy()
    other.obs_names = [f"X{name}" for name in other.obs_names]
    with pytest.raises(ValueError, match="20 of 20 spots of adata are not in the positions file"):
        add_spaceranger_image(other, folder)
    with pytest.raises(ValueError, match="not a folder"):
        add_spaceranger_image(adata, tmp_path / "absent")

    with pytest.raises(ValueError, match=r"image='fullres' is neither an image of uns\['spatial'\]"):
        extract_image_features(section, "fullres")
    no_scale = section.copy()
    del no_scale.uns["spatial"]["simulated"]["scalefactors"]["tissue_hires_scalef"]
    with pytest.raises(ValueError, match="lacks 'tissue_hires_scalef'"):
        extract_image_features(no_scale, "hires")
    del no_scale.uns["spatial"]["simulated"]["scalefactors"]["spot_diameter_fullres"]
    with pytest.raises(ValueError, match="pass spot_diameter="):
        extract_image_features(no_scale, "lowres")
    with pytest.raises(ValueError, match="obsm has no 'xy'"):
        extract_image_features(section, "lowres", spatial_key="xy")
    with pytest.raises(ValueError, match="none of the 3 spots"):
        extract_image_features(spots([[-50, -50]] * 3), array_image(np.ones((10, 10, 3))), spot_diameter=4)
    with pytest.raises(ValueError, match="RGB"):
        array_image(np.ones((10, 10)))
    with pytest.raises(ValueError, match="divide an 8-bit image by 255"):
        array_image(np.full((10, 10, 3), 200.0))
    not_tiff = tmp_path / "slide.tif"
    not_tiff.write_text("not an image")
    pytest.importorskip("tifffile", reason="TIFF images need tifffile")
    with pytest.raises(ValueError, match="not a readable TIFF"):
        extract_image_features(section, str(not_tiff))


# ---------------------------------------------------------------------------------------------- simulation
def test_the_hidden_domain_is_in_the_image_and_not_in_the_counts(section):
    hidden, partner = section.uns["simulation"]["hidden_domain"], section.uns["simulation"]["partner_domain"]
    effect = section.varm["domain_effect"]
    np.testing.assert_array_equal(effect[:, hidden], effect[:, partner])
    truth = section.obs["ground_truth"].astype(str).to_numpy()
    assert len(set(truth)) == 4 and len(set(section.obs["expression_domain"])) == 3
    is_hidden = truth == f"domain{hidden}"
    assert np.all(section.obs["expression_domain"].astype(str).to_numpy()[is_hidden] == f"domain{partner}")
    for resolution in ("lowres", "hires"):  # about 4 and 12 pixels per spot
        features = extract_image_features(section, resolution)
        clusters = KMeans(2, n_init=10, random_state=0).fit_predict(features.values)
        assert adjusted_rand_score(is_hidden, clusters) > 0.9
