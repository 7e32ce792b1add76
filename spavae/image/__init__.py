"""The tissue image as a second view: per-spot image features from Space Ranger thumbnails, whole-slide
(OME-)TIFFs, SpatialData images or features computed elsewhere.

:func:`extract_image_features` gives an :class:`ImageFeatures` (standardised values, a mask of usable
spots, and the settings and statistics to compute them again for new spots with :meth:`ImageFeatures.apply`)::

    adata = spavae.read("outs/")                     # Space Ranger: images in uns['spatial'], pixels in obsm
    features = extract_image_features(adata)         # the hires image, else lowres
    features = extract_image_features(adata, "slide.ome.tif")      # full resolution, read by tiles
    features = extract_image_features(adata, "X_uni")              # features in obsm from another model

    adata = spavae.read_spavae_h5("sample_151507.h5")              # array coordinates only
    add_spaceranger_image(adata, "spatial/151507")                 # match the spatial/ folder by barcode
    features = extract_image_features(adata, "lowres", spatial_key="spatial_fullres")

    record = features.to_dict()                      # plain values, e.g. for a model file
    new = ImageFeatures.from_dict(record).apply(new_adata)         # same settings, same mean and SD
"""

from spavae.image.extractor import EXTRACTOR, EXTRACTOR_VERSION, FEATURE_NAMES
from spavae.image.features import (
    ImageFeatures, extract_image_features, fit_image_features, image_features_for,
)
from spavae.image.patches import SpotPatch, spot_patches
from spavae.image.simulate import simulate_image_domain_section
from spavae.image.sources import ImageSource, array_image, spatialdata_image, tiff_image, uns_image
from spavae.image.spaceranger import add_spaceranger_image

__all__ = ["EXTRACTOR", "EXTRACTOR_VERSION", "FEATURE_NAMES", "ImageFeatures", "ImageSource", "SpotPatch",
           "add_spaceranger_image", "array_image", "extract_image_features", "fit_image_features",
           "image_features_for", "simulate_image_domain_section",
           "spatialdata_image", "spot_patches", "tiff_image", "uns_image"]
