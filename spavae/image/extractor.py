"""The built-in per-spot image features: colour, stain and simple texture statistics of a spot's pixels.

Eleven numbers per spot, computed with NumPy only (a Visium section takes seconds on a laptop CPU):

* ``red_mean``, ``green_mean``, ``blue_mean`` and ``red_sd``, ``green_sd``, ``blue_sd``: mean and standard
  deviation of each RGB channel (values in [0, 1]) over the spot's pixels;
* ``hematoxylin_mean``, ``eosin_mean``: mean stain amounts from colour deconvolution (Ruifrok & Johnston,
  Anal. Quant. Cytol. Histol. 2001) with the fixed H&E-DAB matrix of scikit-image's ``rgb2hed``: optical
  densities ``-log10(max(rgb, 1/255))`` times the inverse of the row-normalised stain matrix;
* ``intensity_mean``, ``intensity_sd``: mean and SD of the luminance ``0.299 R + 0.587 G + 0.114 B``;
* ``gradient_mean``: mean luminance gradient magnitude (central differences, per pixel).

On a Space Ranger thumbnail a spot spans about 4 pixels, so colour carries most of the signal and the SDs and
gradient mostly measure pixel-scale noise; on a hires image or a full-resolution slide they describe texture.
A spot of one pixel has SDs and gradient 0.
"""

from __future__ import annotations

import numpy as np

EXTRACTOR = "colour_texture"
EXTRACTOR_VERSION = 1
FEATURE_NAMES = ("red_mean", "green_mean", "blue_mean", "red_sd", "green_sd", "blue_sd", "hematoxylin_mean",
                 "eosin_mean", "intensity_mean", "intensity_sd", "gradient_mean")
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)).astype(np.float32)
LUMINANCE = np.array([0.299, 0.587, 0.114], dtype=np.float32)
MIN_INTENSITY = 1.0 / 255.0


def patch_features(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The :data:`FEATURE_NAMES` statistics of the masked pixels of one patch.

    Parameters
    ----------
    pixels
        RGB values in [0, 1], ``(rows, cols, 3)``.
    mask
        ``(rows, cols)`` booleans selecting the spot's pixels (at least one).

    Returns
    -------
    float64 array of length ``len(FEATURE_NAMES)`` (per-pixel values in float32, sums in float64).
    """
    pixels = pixels.astype(np.float32, copy=False)
    grey = pixels @ LUMINANCE
    rgb = pixels[mask]
    stains = -np.log10(np.minimum(np.maximum(rgb, MIN_INTENSITY), 1.0)) @ HED_FROM_RGB[:, :2]
    values = np.concatenate([rgb, grey[mask][:, None], stains, _gradient_magnitude(grey)[mask][:, None]], axis=1)
    mean = values.sum(0, dtype=np.float64) / len(values)
    centred = values[:, :4] - mean[:4].astype(np.float32)
    spread = np.sqrt((centred * centred).sum(0, dtype=np.float64) / len(values))
    return np.concatenate([mean[:3], spread[:3], mean[4:6], [mean[3], spread[3], mean[6]]])


def _gradient_magnitude(grey: np.ndarray) -> np.ndarray:
    """Per-pixel gradient magnitude: central differences inside, one-sided at the edges, 0 along an axis of
    length 1 (the slopes of :func:`numpy.gradient`)."""
    squared = np.zeros_like(grey)
    if grey.shape[0] > 1:
        slope = np.empty_like(grey)
        slope[1:-1] = (grey[2:] - grey[:-2]) * 0.5
        slope[0], slope[-1] = grey[1] - grey[0], grey[-1] - grey[-2]
        squared += slope * slope
    if grey.shape[1] > 1:
        slope = np.empty_like(grey)
        slope[:, 1:-1] = (grey[:, 2:] - grey[:, :-2]) * 0.5
        slope[:, 0], slope[:, -1] = grey[:, 1] - grey[:, 0], grey[:, -1] - grey[:, -2]
        squared += slope * slope
    return np.sqrt(squared)
