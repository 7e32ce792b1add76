"""Where the pixels come from: an RGB image read by rectangles, and the map from spot coordinates to its pixels.

An :class:`ImageSource` wraps anything that can be sliced like an array — a NumPy array held in memory
(the Space Ranger thumbnails in ``uns['spatial']``), the zarr view of a tiled or pyramidal (OME-)TIFF
(:func:`tiff_image`; only the tiles under a requested rectangle are read, never the whole slide) or the dask
array of a SpatialData image element (:func:`spatialdata_image`). Spot coordinates (``obsm['spatial']``, x then
y) map to image pixels by ``pixel = coordinate * scale + offset``; the centre of pixel ``(row, col)`` is at
``(x, y) = (col, row)``, as in :func:`matplotlib.pyplot.imshow` and scanpy.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import anndata as ad
import numpy as np

if TYPE_CHECKING:
    from spatialdata import SpatialData

TIFF_HINT = "pip install tifffile"
SPATIALDATA_HINT = "pip install spavae[spatialdata]"
CHANNELS_LAST = {"YXS", "YXC"}
CHANNELS_FIRST = {"SYX", "CYX"}
MAX_CHUNK_MB = 64


@dataclass
class ImageSource:
    """An RGB(A) image that is read one rectangle at a time.

    Parameters
    ----------
    array
        Anything sliced like an array whose slices convert with :func:`numpy.asarray` (NumPy, zarr, dask):
        ``(height, width, channels)``, or ``(channels, height, width)`` with ``channels_first``; 3 (RGB) or
        4 (RGBA, alpha ignored) channels; unsigned integers (full range = white) or floats in [0, 1].
    scale
        Image pixels per unit of the spot coordinates (e.g. ``tissue_lowres_scalef`` for the Space Ranger
        thumbnail and spots in full-resolution pixels).
    offset
        Image pixel (x, y) of spot coordinate (0, 0).
    channels_first
        The channel axis comes first (SpatialData images, planar TIFFs).
    description
        How the image was found (kind, key or path, level), recorded in the feature settings.
    closer
        Called by :meth:`close` (e.g. to close a TIFF file).
    """

    array: Any
    scale: float
    offset: tuple[float, float] = (0.0, 0.0)
    channels_first: bool = False
    description: dict = field(default_factory=dict)
    closer: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        shape = tuple(int(n) for n in self.array.shape)
        channels = shape[0] if self.channels_first else shape[-1]
        if len(shape) != 3 or channels not in (3, 4):
            layout = "(channels, height, width)" if self.channels_first else "(height, width, channels)"
            raise ValueError(f"the image has shape {shape} but an RGB(A) image {layout} with 3 or 4 channels is "
                             "needed; convert grey or multiplexed images to RGB first")
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"the image scale (pixels per spot-coordinate unit) must be positive, got {self.scale}")
        dtype = np.dtype(self.array.dtype)
        if dtype.kind == "u":
            self._white = float(np.iinfo(dtype).max)
        elif dtype.kind == "f":
            self._white = 1.0
        else:
            raise ValueError(f"image pixels of type {dtype} are not supported; use unsigned integers or floats in "
                             "[0, 1]")

    @property
    def height(self) -> int:
        """Number of pixel rows."""
        return int(self.array.shape[1] if self.channels_first else self.array.shape[0])

    @property
    def width(self) -> int:
        """Number of pixel columns."""
        return int(self.array.shape[2] if self.channels_first else self.array.shape[1])

    def to_pixels(self, coordinates: np.ndarray) -> np.ndarray:
        """Image pixel (x, y) of spot coordinates (n x 2, x then y)."""
        return np.asarray(coordinates, dtype=np.float64)[:, :2] * self.scale + np.asarray(self.offset)

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        """The RGB pixels of a rectangle inside the image (slices with positive steps), as float32 in [0, 1],
        shape ``(rows, cols, 3)``."""
        if self.channels_first:
            block = np.moveaxis(np.asarray(self.array[:3, rows, cols]), 0, -1)
        else:
            block = np.asarray(self.array[rows, cols, :3])
        if self._white == 1.0:
            return block.astype(np.float32, copy=False)
        block = block.astype(np.float32)  # integers: a new array, safe to scale in place
        block /= self._white
        return block

    def close(self) -> None:
        """Release the file behind the image, if any."""
        if self.closer is not None:
            self.closer()
            self.closer = None

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def array_image(array: np.ndarray, scale: float = 1.0, *, name: str = "array") -> ImageSource:
    """An in-memory RGB(A) image, channels last.

    Parameters
    ----------
    array
        ``(height, width, 3 or 4)``, unsigned integers or floats in [0, 1].
    scale
        Image pixels per unit of the spot coordinates.
    name
        Recorded in the feature settings.

    Returns
    -------
    The :class:`ImageSource`.
    """
    array = np.asarray(array)
    if array.dtype.kind == "f" and array.size and float(np.nanmax(array)) > 1.0 + 1e-6:
        raise ValueError(f"float image values must lie in [0, 1] but the maximum is {float(np.nanmax(array)):.4g}; "
                         "divide an 8-bit image by 255 (or pass it as uint8)")
    return ImageSource(array, float(scale), description={"kind": "array", "image": name})


def uns_image(adata: ad.AnnData, key: str, *, library_id: str | None = None) -> ImageSource:
    """An image of ``uns['spatial'][library_id]['images']`` (Space Ranger layout, as :func:`spavae.read` fills).

    Parameters
    ----------
    adata
        AnnData whose spot coordinates are in full-resolution pixels.
    key
        ``'lowres'``, ``'hires'`` or another key of ``images``; its scale factor is
        ``scalefactors['tissue_<key>_scalef']``.
    library_id
        Key of ``uns['spatial']``; needed only when there are several.

    Returns
    -------
    The :class:`ImageSource`.
    """
    library_id, library = spatial_library(adata, library_id)
    images = library.get("images") or {}
    if key not in images:
        raise ValueError(f"uns['spatial']['{library_id}']['images'] has no image '{key}' (images: "
                         f"{sorted(images)}); choose one of them or give an image file")
    scalefactors = library.get("scalefactors") or {}
    factor = f"tissue_{key}_scalef"
    if factor not in scalefactors:
        raise ValueError(f"uns['spatial']['{library_id}']['scalefactors'] lacks '{factor}' (it has "
                         f"{sorted(scalefactors)}); copy scalefactors_json.json of the Space Ranger spatial/ folder "
                         "there (spavae.image.add_spaceranger_image does it)")
    source = array_image(images[key], float(scalefactors[factor]), name=key)
    source.description = {"kind": "uns", "image": key, "library_id": library_id}
    return source


def spatial_library(adata: ad.AnnData, library_id: str | None) -> tuple[str, dict]:
    """``(library_id, uns['spatial'][library_id])``; the only library when ``library_id`` is None."""
    libraries = adata.uns.get("spatial")
    if not isinstance(libraries, dict) or not libraries:
        raise ValueError("adata.uns['spatial'] holds no image library; read a Space Ranger folder with spavae.read, "
                         "attach one with spavae.image.add_spaceranger_image, or give an image file")
    if library_id is None:
        if len(libraries) > 1:
            raise ValueError(f"adata.uns['spatial'] holds {len(libraries)} libraries {sorted(libraries)}; choose "
                             "one with library_id=")
        library_id = next(iter(libraries))
    if library_id not in libraries:
        raise ValueError(f"adata.uns['spatial'] has no library '{library_id}'; libraries: {sorted(libraries)}")
    return library_id, libraries[library_id]


def tiff_image(path: str | os.PathLike, *, level: int = 0, series: int = 0) -> ImageSource:
    """A full-resolution (OME-)TIFF, read by tiles through tifffile's zarr store: never loaded whole.

    Spot coordinates must be in pixels of the full-resolution image (level 0), as Space Ranger's
    ``pxl_col_in_fullres``/``pxl_row_in_fullres``. Close the returned source (or use it in a ``with`` block)
    to close the file.

    Parameters
    ----------
    path
        The TIFF file; tiled TIFFs are read tile by tile, compressed striped ones strip by strip (a warning
        when a strip exceeds 64 MB) and uncompressed striped ones through a memory map.
    level
        Pyramid level (0 = full resolution); the scale is that level's width over level 0's.
    series
        Image series of the file (OME-TIFFs may hold several images).

    Returns
    -------
    The :class:`ImageSource`.
    """
    try:
        import tifffile
        import zarr
    except ImportError as err:
        raise ImportError(f"reading TIFF images needs tifffile and zarr; install them with: {TIFF_HINT} zarr") from err
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        tif = tifffile.TiffFile(path)
    except Exception as err:  # tifffile raises several types for files that are not TIFF
        raise ValueError(f"{path} is not a readable TIFF file ({type(err).__name__}: {err})") from None
    try:
        if not 0 <= series < len(tif.series):
            raise ValueError(f"{path} has {len(tif.series)} image series; series must be in 0..{len(tif.series) - 1}")
        levels = tif.series[series].levels
        if not 0 <= level < len(levels):
            raise ValueError(f"{path} has {len(levels)} pyramid level(s); level must be in 0..{len(levels) - 1}")
        axes = levels[level].axes
        if axes not in CHANNELS_LAST | CHANNELS_FIRST:
            raise ValueError(f"{path} holds an image with axes '{axes}'; an RGB image (axes YXS, SYX or CYX) is "
                             "needed")
        page = levels[level].keyframe
        if not page.is_tiled and page.is_memmappable:  # uncompressed strips: map the file, read only what is sliced
            array = levels[level].asarray(out="memmap")
        else:  # tiles or compressed strips: tifffile's zarr store decodes only the chunks under a slice
            array = zarr.open(tif.series[series].aszarr(level=level), mode="r")
            chunk_mb = np.prod(array.chunks) * array.dtype.itemsize / 2 ** 20
            if chunk_mb > MAX_CHUNK_MB:
                warnings.warn(f"{path} stores its pixels in chunks of {chunk_mb:.0f} MB ({array.chunks}), each decoded "
                              "whole on every read; write it as a tiled pyramidal TIFF (e.g. tifffile's "
                              "tile=(512, 512)) to bound the memory", stacklevel=2)
        x_axis = axes.index("X")
        scale = levels[level].shape[x_axis] / levels[0].shape[levels[0].axes.index("X")]
        return ImageSource(array, scale, channels_first=axes in CHANNELS_FIRST, closer=tif.close,
                           description={"kind": "tiff", "image": str(path), "level": level, "series": series})
    except BaseException:
        tif.close()
        raise


def spatialdata_image(
    sdata: SpatialData, image_key: str, *, coordinate_system: str = "global", level: int = 0
) -> ImageSource:
    """An image element of a SpatialData object, read lazily through its dask array.

    Parameters
    ----------
    sdata
        The :class:`spatialdata.SpatialData`.
    image_key
        Name of the element in ``sdata.images``.
    coordinate_system
        Coordinate system of the spot coordinates (``obsm['spatial']`` of
        :func:`spavae.data.read_spatialdata`); the element's transformation to it must be a scale and
        translation.
    level
        Pyramid level of a multiscale image (0 = full resolution).

    Returns
    -------
    The :class:`ImageSource`.
    """
    try:
        import spatialdata
        from spatialdata.transformations import get_transformation
        from xarray import DataArray
    except ImportError as err:
        raise ImportError(f"SpatialData images need the spatialdata package; install it with: {SPATIALDATA_HINT}") \
            from err
    if image_key not in sdata.images:
        raise ValueError(f"the SpatialData object has no image '{image_key}'; images: {list(sdata.images.keys())}")
    element = sdata.images[image_key]
    transformations = get_transformation(element, get_all=True)
    if coordinate_system not in transformations:
        raise ValueError(f"image '{image_key}' has no transformation to coordinate system '{coordinate_system}' "
                         f"(it has {sorted(transformations)}); pass coordinate_system=")
    matrix = np.asarray(transformations[coordinate_system].to_affine_matrix(input_axes=("x", "y"),
                                                                           output_axes=("x", "y")), dtype=float)
    if abs(matrix[0, 1]) > 1e-9 or abs(matrix[1, 0]) > 1e-9 or not np.isclose(matrix[0, 0], matrix[1, 1]):
        raise ValueError(f"image '{image_key}' maps to '{coordinate_system}' with a rotation, shear or unequal "
                         f"axis scales ({matrix[:2, :2].tolist()}); only an isotropic scale and translation are "
                         "supported")
    if isinstance(element, DataArray):  # a single-scale image; a multiscale one is a DataTree of levels
        if level != 0:
            raise ValueError(f"image '{image_key}' has a single scale; level must be 0, got {level}")
        full = array = element
    else:
        n_levels = len(spatialdata.get_pyramid_levels(element))
        if not 0 <= level < n_levels:
            raise ValueError(f"image '{image_key}' has {n_levels} pyramid level(s); level must be in 0..{n_levels - 1}")
        full, array = spatialdata.get_pyramid_levels(element, n=0), spatialdata.get_pyramid_levels(element, n=level)
    if tuple(array.dims) != ("c", "y", "x"):
        raise ValueError(f"image '{image_key}' has dims {tuple(array.dims)}; a 2-D image ('c', 'y', 'x') is needed")
    ratio = array.sizes["x"] / full.sizes["x"]
    # coordinate = matrix @ pixel0 + t, so pixel0 = (coordinate - t) / s and pixel = pixel0 * ratio.
    scale = ratio / matrix[0, 0]
    offset = (-matrix[0, 2] * scale, -matrix[1, 2] * scale)
    return ImageSource(array.data, scale, offset, channels_first=True,
                       description={"kind": "spatialdata", "image": image_key, "level": level,
                                    "coordinate_system": coordinate_system})
