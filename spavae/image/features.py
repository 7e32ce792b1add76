"""Per-spot image features: computed from an image (or taken from ``obsm``), standardised, with the settings
and statistics needed to compute them the same way for new spots and after a model is loaded.

:func:`extract_image_features` returns an :class:`ImageFeatures`; :meth:`ImageFeatures.apply` recomputes the
features of other spots with the stored settings and standardises them with the stored mean and SD;
:meth:`ImageFeatures.to_dict`/:meth:`ImageFeatures.from_dict` turn it into plain Python/NumPy values for a
model file. Spots whose patch lies mostly off the image, mostly on background, or (``obsm`` features) holds
non-finite values are flagged: ``mask`` is False, ``reasons`` says why and their standardised values are 0.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np

from spavae.image.background import background_fraction, resolve_background
from spavae.image.extractor import EXTRACTOR, EXTRACTOR_VERSION, FEATURE_NAMES, patch_features
from spavae.image.patches import spot_patches
from spavae.image.sources import ImageSource, spatial_library, tiff_image, uns_image

OBSM_EXTRACTOR = "obsm"
REASONS = ("off_image", "background", "missing")
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".svs")
#: A spot must span this many pixels for the model to use the texture features (SDs, gradient): 11 px across a
#: 55 um Visium spot is 5 um per pixel, the size of a nucleus.
TEXTURE_MIN_PIXELS = 11.0
#: The built-in features that describe colour and stain, not texture.
COLOUR_FEATURES = ("red_mean", "green_mean", "blue_mean", "hematoxylin_mean", "eosin_mean", "intensity_mean")
#: ``obsm`` key of full-resolution pixel positions that a model's image view prefers (written by
#: :func:`~spavae.image.add_spaceranger_image` beside the model's own coordinates).
IMAGE_SPATIAL_KEY = "spatial_fullres"


@dataclass(eq=False)
class ImageFeatures:
    """Standardised per-spot image features and how they were made.

    Attributes
    ----------
    values
        ``(n_spots, n_features)`` float32, ``(raw - mean) / scale``; 0 for spots whose ``mask`` is False.
    names
        Feature names (the columns of ``values``).
    mask
        ``(n_spots,)`` booleans: True for spots with usable features. A model should leave the others out of
        the image likelihood.
    reasons
        ``(n_spots,)`` strings: ``''`` for usable spots, else ``'off_image'`` (less than ``min_coverage`` of the
        spot on the image), ``'background'`` (mostly background colour) or ``'missing'`` (non-finite
        ``obsm`` values).
    obs_names
        ``(n_spots,)`` spot names, in the order of ``values``.
    mean, scale
        ``(n_features,)`` float64 raw-feature means and SDs over the usable spots of the data they were
        fitted on (constant features have scale 1); reused unchanged by :meth:`apply`.
    settings
        How the features were computed: ``extractor``, ``extractor_version``, ``source`` (kind, image key or
        path, level, library), ``spatial_key``, ``scale`` (image pixels per coordinate unit),
        ``spot_diameter`` (coordinate units), ``diameter_px``, ``background``, ``background_colour``,
        ``background_tolerance``, ``max_background_fraction`` and ``min_coverage``.
    """

    values: np.ndarray
    names: list[str]
    mask: np.ndarray
    reasons: np.ndarray
    obs_names: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    settings: dict

    @property
    def n_spots(self) -> int:
        """Number of spots."""
        return int(self.values.shape[0])

    @property
    def n_features(self) -> int:
        """Number of features."""
        return int(self.values.shape[1])

    def select(self, obs_names) -> ImageFeatures:
        """The features of ``obs_names`` (e.g. ``adata.obs_names`` after filtering), in that order."""
        index = {name: i for i, name in enumerate(self.obs_names)}
        missing = [name for name in obs_names if name not in index]
        if missing:
            raise ValueError(f"{len(missing)} spot(s) have no image features (e.g. {missing[:3]}); compute them with "
                             "ImageFeatures.apply")
        rows = np.array([index[name] for name in obs_names], dtype=np.int64)
        return ImageFeatures(self.values[rows], list(self.names), self.mask[rows], self.reasons[rows],
                             self.obs_names[rows], self.mean, self.scale, dict(self.settings))

    def subset(self, names) -> ImageFeatures:
        """These features restricted to the columns ``names`` (in that order), e.g. the colour features only."""
        names = list(names)
        missing = [name for name in names if name not in self.names]
        if missing or not names:
            raise ValueError(f"unknown image feature(s) {missing} (the features are {self.names}); choose among those")
        columns = [self.names.index(name) for name in names]
        return ImageFeatures(self.values[:, columns], names, self.mask, self.reasons, self.obs_names,
                             self.mean[columns], self.scale[columns], dict(self.settings))

    def apply(
        self,
        adata: ad.AnnData,
        image: str | os.PathLike | ImageSource | None = None,
        *,
        library_id: str | None = None,
        spot_diameter: float | None = None,
        block_size: int = 1024,
    ) -> ImageFeatures:
        """The features of the spots of ``adata``, computed with these settings and standardised with ``mean``
        and ``scale`` (not refitted).

        Parameters
        ----------
        adata
            The new spots, with coordinates in ``obsm[settings['spatial_key']]``.
        image
            As in :func:`extract_image_features`; default: the stored image key, obsm key or file (at the
            stored pyramid level and series). Give it for in-memory or SpatialData images, or when the file
            moved.
        library_id, block_size
            As in :func:`extract_image_features`.
        spot_diameter
            Spot diameter in coordinate units; default: the new data's ``spot_diameter_fullres``, else the
            stored one (the same physical size, measured on the new slide).
        """
        settings = self.settings
        if image is None:
            source = settings["source"]
            if source["kind"] not in ("uns", "obsm", "tiff"):
                raise ValueError(f"the features came from an image of kind '{source['kind']}' that is not stored; "
                                 "pass the image with image=")
            if source["kind"] == "tiff":
                with tiff_image(source["image"], level=source["level"], series=source["series"]) as opened:
                    return self.apply(adata, opened, library_id=library_id, spot_diameter=spot_diameter,
                                      block_size=block_size)
            image = source["image"]
        if settings["extractor"] == OBSM_EXTRACTOR and not (isinstance(image, str) and image in adata.obsm):
            raise ValueError(f"these features came from obsm['{settings['source']['image']}'] but adata.obsm has no "
                             f"{image!r} (obsm keys: {list(adata.obsm.keys())}); add the new spots' features there")
        if spot_diameter is None and settings["extractor"] != OBSM_EXTRACTOR:
            spot_diameter = _library_diameter(adata, library_id)
            spot_diameter = settings["spot_diameter"] if spot_diameter is None else spot_diameter
        raw, reasons, names, new_settings = _raw_features(
            adata, image, library_id=library_id, spatial_key=settings["spatial_key"], spot_diameter=spot_diameter,
            background=settings["background"], background_tolerance=settings["background_tolerance"],
            max_background_fraction=settings["max_background_fraction"], min_coverage=settings["min_coverage"],
            block_size=block_size)
        if names != self.names and set(self.names) <= set(names):  # these features are a subset of the extractor's
            raw = raw[:, [names.index(name) for name in self.names]]
            names = list(self.names)
        if (new_settings["extractor"], new_settings["extractor_version"]) != \
                (settings["extractor"], settings["extractor_version"]) or names != self.names:
            raise ValueError(f"these features were made by extractor {settings['extractor']} (version "
                             f"{settings['extractor_version']}, {len(self.names)} features) but image={image!r} gives "
                             f"{new_settings['extractor']} (version {new_settings['extractor_version']}, "
                             f"{len(names)} features); pass the same kind of image or features as when they were "
                             "fitted")
        return _standardised(raw, reasons, self.mean, self.scale, list(self.names), adata.obs_names, new_settings)

    def to_dict(self) -> dict:
        """Plain Python/NumPy values (for a model file); :meth:`from_dict` inverts it."""
        return {"values": np.asarray(self.values, dtype=np.float32), "names": list(self.names),
                "mask": np.asarray(self.mask, dtype=bool), "reasons": [str(r) for r in self.reasons],
                "obs_names": [str(n) for n in self.obs_names], "mean": [float(v) for v in self.mean],
                "scale": [float(v) for v in self.scale], "settings": dict(self.settings)}

    def fitted_state(self) -> dict:
        """What computing these features for other spots needs, without any per-spot value: the feature names,
        ``mean``, ``scale`` and ``settings`` (what a model's data setup stores); :meth:`from_fitted_state` inverts
        it."""
        return {"names": list(self.names), "mean": [float(v) for v in self.mean],
                "scale": [float(v) for v in self.scale], "settings": dict(self.settings)}

    @classmethod
    def from_fitted_state(cls, state: dict) -> ImageFeatures:
        """Features of no spot with a stored :meth:`fitted_state`; :meth:`apply` then computes those of new spots."""
        names = list(state["names"])
        return cls.from_dict({"values": np.zeros((0, len(names)), dtype=np.float32), "names": names, "mask": [],
                              "reasons": [], "obs_names": [], "mean": state["mean"], "scale": state["scale"],
                              "settings": state["settings"]})

    @classmethod
    def from_dict(cls, values: dict) -> ImageFeatures:
        """Inverse of :meth:`to_dict`."""
        missing = [k for k in ("values", "names", "mask", "reasons", "obs_names", "mean", "scale", "settings")
                   if k not in values]
        if missing:
            raise ValueError(f"the stored image features lack {missing}; store ImageFeatures.to_dict() unchanged")
        out = cls(np.asarray(values["values"], dtype=np.float32), list(values["names"]),
                  np.asarray(values["mask"], dtype=bool), np.asarray(values["reasons"], dtype=object),
                  np.asarray(values["obs_names"], dtype=object), np.asarray(values["mean"], dtype=np.float64),
                  np.asarray(values["scale"], dtype=np.float64), dict(values["settings"]))
        n, f = out.values.shape
        if not (len(out.names) == len(out.mean) == len(out.scale) == f and len(out.mask) == len(out.reasons)
                == len(out.obs_names) == n):
            raise ValueError(f"the stored image features are inconsistent ({n} x {f} values, {len(out.names)} names, "
                             f"{len(out.mask)} mask entries, {len(out.obs_names)} spots); the record is damaged")
        return out


def extract_image_features(
    adata: ad.AnnData,
    image: str | os.PathLike | ImageSource = "auto",
    *,
    library_id: str | None = None,
    spatial_key: str = "spatial",
    spot_diameter: float | None = None,
    background: str | tuple[float, float, float] | None = "auto",
    background_tolerance: float = 0.05,
    max_background_fraction: float = 0.5,
    min_coverage: float = 0.5,
    block_size: int = 1024,
) -> ImageFeatures:
    """Per-spot image features of ``adata``'s spots, standardised over the usable spots.

    Each spot's patch is the disc of its physical diameter (``spot_diameter`` times the image scale) around
    its centre; the features are the colour, stain and texture statistics of
    :mod:`spavae.image.extractor` over the patch's pixels. Images are read block by block, so a
    whole-slide TIFF is never loaded whole.

    Parameters
    ----------
    adata
        The spots; their coordinates in ``obsm[spatial_key]`` (x, y) must be in the units of the image's
        scale factor: full-resolution pixels for Space Ranger images and TIFFs.
    image
        Where the features come from:

        * ``'auto'``: the highest-resolution image of ``uns['spatial'][library_id]['images']`` (``'hires'``,
          else ``'lowres'``);
        * a key of those images (``'lowres'``, ``'hires'``), scaled by ``tissue_<key>_scalef``;
        * a key of ``adata.obsm``: features computed elsewhere (e.g. a histology foundation model), one row
          per spot; rows with non-finite values are masked;
        * the path of a full-resolution (OME-)TIFF (level 0; for another level or series pass
          :func:`spavae.image.tiff_image`);
        * an :class:`~spavae.image.ImageSource` (:func:`~spavae.image.array_image`,
          :func:`~spavae.image.tiff_image`, :func:`~spavae.image.spatialdata_image`); it is not closed.
    library_id
        Key of ``uns['spatial']``; needed only when there are several.
    spatial_key
        Key of ``obsm`` with the spot coordinates.
    spot_diameter
        Spot diameter in coordinate units; default ``scalefactors['spot_diameter_fullres']``.
    background
        RGB colour of the slide off the tissue: ``'auto'`` estimates it from the image border (see
        :mod:`spavae.image.background`), a triple in [0, 1] sets it, None turns background masking off.
    background_tolerance
        RGB distance under which a pixel counts as background.
    max_background_fraction
        A spot with at least this fraction of background pixels is masked (``'background'``).
    min_coverage
        A spot with less than this fraction of its disc on the image is masked (``'off_image'``).
    block_size
        Side in pixels of the image blocks read at once (bounds the memory).

    Returns
    -------
    The :class:`ImageFeatures`, in the order of ``adata.obs_names``. A warning counts the masked spots.
    """
    raw, reasons, names, settings = _raw_features(
        adata, image, library_id=library_id, spatial_key=spatial_key, spot_diameter=spot_diameter,
        background=background, background_tolerance=background_tolerance,
        max_background_fraction=max_background_fraction, min_coverage=min_coverage, block_size=block_size)
    usable = reasons == ""
    if not usable.any():
        raise ValueError(f"none of the {adata.n_obs} spots has usable image features ({_counts(reasons)}); check that "
                         f"obsm['{spatial_key}'] holds coordinates in the image's units (full-resolution pixels for "
                         "Space Ranger images) and the background setting")
    mean = raw[usable].mean(0)
    scale = raw[usable].std(0)
    scale[~(scale > 1e-10 * np.maximum(1.0, np.abs(mean)))] = 1.0
    return _standardised(raw, reasons, mean, scale, names, adata.obs_names, settings)


def fit_image_features(adata: ad.AnnData, image, *, spatial_key: str = "spatial") -> ImageFeatures:
    """The image features a model's image view is fitted on (``SpaVAE(adata, image=...)``).

    ``image`` is an :class:`ImageFeatures` of ``adata``'s spots, used as given (taken in ``adata``'s spot order:
    choose any extractor option with :func:`extract_image_features` first, or columns with
    :meth:`ImageFeatures.subset`), or anything :func:`extract_image_features` takes, extracted with its defaults from
    the spots' image coordinates: ``obsm['spatial_fullres']`` when ``adata`` has it (as
    :func:`~spavae.image.add_spaceranger_image` writes it), else ``obsm[spatial_key]``.

    From an image where a spot spans fewer than :data:`TEXTURE_MIN_PIXELS` pixels (a Space Ranger thumbnail: about
    4), only the colour features (:data:`COLOUR_FEATURES`) are kept: a pixel there is wider than a nucleus, so the
    SDs and the gradient measure resampling noise, not texture, and would only add noise to the latent.
    """
    if isinstance(image, ImageFeatures):
        return image.select(adata.obs_names)
    key = IMAGE_SPATIAL_KEY if IMAGE_SPATIAL_KEY in adata.obsm else spatial_key
    features = extract_image_features(adata, image, spatial_key=key)
    if features.settings["extractor"] == EXTRACTOR and features.settings["diameter_px"] < TEXTURE_MIN_PIXELS:
        return features.subset(COLOUR_FEATURES)
    return features


def image_features_for(state: dict, adata: ad.AnnData, image=None) -> ImageFeatures:
    """The features of ``adata``'s spots under a model's fitted image state (:meth:`ImageFeatures.fitted_state`).

    ``image`` is ``None`` (the stored image key, ``obsm`` key or file), an image source as in
    :meth:`ImageFeatures.apply`, or an :class:`ImageFeatures` made with this same state (e.g. by
    :meth:`ImageFeatures.apply`), taken in ``adata``'s spot order.
    """
    fitted = ImageFeatures.from_fitted_state(state)
    if not isinstance(image, ImageFeatures):
        return fitted.apply(adata, image)
    same = image.names == fitted.names and np.allclose(image.mean, fitted.mean) and \
        np.allclose(image.scale, fitted.scale)
    if not same:
        raise ValueError("these image features were not standardised like the model's (other names, mean or SD); "
                         "compute them with the model's state, or pass the image itself as image=")
    return image.select(adata.obs_names)


def _standardised(raw: np.ndarray, reasons: np.ndarray, mean: np.ndarray, scale: np.ndarray, names: list[str],
                  obs_names, settings: dict) -> ImageFeatures:
    usable = reasons == ""
    if (~usable).any():
        warnings.warn(f"{int((~usable).sum())} of {len(usable)} spots have no usable image features "
                      f"({_counts(reasons)}): their mask is False and their values are 0", stacklevel=3)
    values = np.where(usable[:, None], (raw - mean) / scale, 0.0).astype(np.float32)
    return ImageFeatures(values, names, usable, reasons, np.asarray(obs_names, dtype=object),
                         np.asarray(mean, dtype=np.float64), np.asarray(scale, dtype=np.float64), settings)


def _counts(reasons: np.ndarray) -> str:
    return ", ".join(f"{int((reasons == r).sum())} {r.replace('_', ' ')}" for r in REASONS if (reasons == r).any()) \
        or "none masked"


def _raw_features(adata: ad.AnnData, image, *, library_id, spatial_key, spot_diameter, background,
                  background_tolerance, max_background_fraction, min_coverage, block_size):
    """``(raw features n x f, reasons, feature names, settings)``."""
    if isinstance(image, str) and image != "auto" and image in adata.obsm:
        return _obsm_features(adata, image)
    for name, value in (("background_tolerance", background_tolerance),
                        ("max_background_fraction", max_background_fraction), ("min_coverage", min_coverage)):
        if not 0 < value <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {value}")
    if int(block_size) < 1:
        raise ValueError(f"block_size must be a positive number of pixels, got {block_size}")
    coordinates = _coordinates(adata, spatial_key)
    source, owned = _open(adata, image, library_id)
    try:
        if spot_diameter is None:
            spot_diameter = _library_diameter(adata, library_id)
            if spot_diameter is None:
                raise ValueError("no spot diameter: uns['spatial'][library]['scalefactors'] has no "
                                 "'spot_diameter_fullres'; pass spot_diameter= in coordinate units (Visium spots are "
                                 "55 um across)")
        if not (np.isfinite(spot_diameter) and spot_diameter > 0):
            raise ValueError(f"spot_diameter must be a positive number of coordinate units, got {spot_diameter}")
        colour = resolve_background(background, source)
        diameter_px = float(spot_diameter) * source.scale
        raw = np.full((adata.n_obs, len(FEATURE_NAMES)), np.nan)
        reasons = np.full(adata.n_obs, "", dtype=object)
        for patch in spot_patches(source, source.to_pixels(coordinates), diameter_px, block_size=int(block_size)):
            if patch.coverage < min_coverage:
                reasons[patch.index] = "off_image"
                continue
            if colour is not None and background_fraction(patch.pixels[patch.mask], colour,
                                                          background_tolerance) >= max_background_fraction:
                reasons[patch.index] = "background"
            raw[patch.index] = patch_features(patch.pixels, patch.mask)
        settings = {"extractor": EXTRACTOR, "extractor_version": EXTRACTOR_VERSION, "source": dict(source.description),
                    "spatial_key": spatial_key, "scale": float(source.scale), "spot_diameter": float(spot_diameter),
                    "diameter_px": diameter_px, "background": background if background is None or
                    isinstance(background, str) else [float(c) for c in background],
                    "background_colour": None if colour is None else [float(c) for c in colour],
                    "background_tolerance": float(background_tolerance),
                    "max_background_fraction": float(max_background_fraction), "min_coverage": float(min_coverage)}
    finally:
        if owned:
            source.close()
    return raw, reasons, list(FEATURE_NAMES), settings


def _obsm_features(adata: ad.AnnData, key: str):
    table = adata.obsm[key]
    names = [str(c) for c in table.columns] if hasattr(table, "columns") else None
    try:
        values = np.asarray(table.to_numpy() if hasattr(table, "to_numpy") else table, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"obsm['{key}'] does not hold numbers; image features need one row of numbers per spot") \
            from None
    if values.ndim != 2 or values.shape[1] == 0:
        raise ValueError(f"obsm['{key}'] has shape {values.shape}; image features need one row of numbers per spot")
    reasons = np.where(np.isfinite(values).all(1), "", "missing").astype(object)
    settings = {"extractor": OBSM_EXTRACTOR, "extractor_version": None, "source": {"kind": "obsm", "image": key},
                "spatial_key": None, "background": None, "background_tolerance": 1.0, "max_background_fraction": 1.0,
                "min_coverage": 1.0}
    return values, reasons, names or [f"{key}_{j}" for j in range(values.shape[1])], settings


def _coordinates(adata: ad.AnnData, spatial_key: str) -> np.ndarray:
    if spatial_key not in adata.obsm:
        raise ValueError(f"adata.obsm has no '{spatial_key}' with the spot coordinates (obsm keys: "
                         f"{list(adata.obsm.keys())}); pass spatial_key=")
    coordinates = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
    if coordinates.ndim != 2 or coordinates.shape[1] < 2:
        raise ValueError(f"obsm['{spatial_key}'] has shape {coordinates.shape}; (x, y) coordinates per spot are needed")
    if not np.isfinite(coordinates[:, :2]).all():
        raise ValueError(f"obsm['{spatial_key}'] holds non-finite coordinates; drop or fix those spots first")
    return coordinates[:, :2]


def _library_diameter(adata: ad.AnnData, library_id: str | None) -> float | None:
    libraries = adata.uns.get("spatial")
    if not isinstance(libraries, dict) or not libraries:
        return None
    _, library = spatial_library(adata, library_id)
    value = (library.get("scalefactors") or {}).get("spot_diameter_fullres")
    return None if value is None else float(value)


def _open(adata: ad.AnnData, image, library_id: str | None) -> tuple[ImageSource, bool]:
    """``(source, whether this call opened it and must close it)``."""
    if isinstance(image, ImageSource):
        return image, False
    if isinstance(image, os.PathLike):
        return tiff_image(image), True
    if not isinstance(image, str):
        raise ValueError(f"image must be 'auto', an image key, an obsm key, a file path or an ImageSource, got "
                         f"{type(image).__name__}")
    libraries = adata.uns.get("spatial")
    images = {}
    if isinstance(libraries, dict) and libraries:
        library_id, library = spatial_library(adata, library_id)
        images = library.get("images") or {}
    if image == "auto":
        if not images:
            raise ValueError("image='auto' found no image in adata.uns['spatial'][...]['images']; give image= as an "
                             "image file, an obsm key or an ImageSource")
        image = "hires" if "hires" in images else "lowres" if "lowres" in images else next(iter(images))
    if image in images:
        return uns_image(adata, image, library_id=library_id), True
    if Path(image).is_file() or Path(image).suffix.lower() in TIFF_SUFFIXES:
        return tiff_image(image), True
    raise ValueError(f"image='{image}' is neither an image of uns['spatial'] ({sorted(images)}), a key of obsm "
                     f"({list(adata.obsm.keys())}) nor an image file; choose one of those")
