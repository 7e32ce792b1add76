"""The tissue image as a second view: per-spot image features from Space Ranger thumbnails, whole-slide
(OME-)TIFFs, SpatialData images or features computed elsewhere.

:func:`extract_image_features` gives an :class:`ImageFeatures` (standardised values, a mask of usable
spots, and the settings and statistics to compute them again for new spots with :meth:`ImageFeatures.apply`).
"""

from spavae.image.extractor import EXTRACTOR, EXTRACTOR_VERSION, FEATURE_NAMES
from spavae.image.features import ImageFeatures, extract_image_features
from spavae.image.patches import SpotPatch, spot_patches
from spavae.image.simulate import simulate_image_domain_section
from spavae.image.sources import ImageSource, array_image, spatialdata_image, tiff_image, uns_image
from spavae.image.spaceranger import add_spaceranger_image

__all__ = ["EXTRACTOR", "EXTRACTOR_VERSION", "FEATURE_NAMES", "ImageFeatures", "ImageSource", "SpotPatch",
           "add_spaceranger_image", "array_image", "extract_image_features", "simulate_image_domain_section",
           "spatialdata_image", "spot_patches", "tiff_image", "uns_image"]
