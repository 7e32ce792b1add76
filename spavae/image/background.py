"""The colour of the slide outside the tissue, and how much of a spot shows it.

Visium thumbnails are not always white off the tissue (the DLPFC thumbnails are a flat grey near
(0.67, 0.69, 0.68)), so the background colour is by default estimated from the image itself: the per-channel
median of a thin frame along its four edges, which on a Space Ranger image lies outside the capture area. A
pixel is background when its RGB distance to that colour is below a tolerance; a spot is background when most
of its pixels are.
"""

from __future__ import annotations

import numpy as np

from spavae.image.sources import ImageSource

FRAME_FRACTION = 0.01
MAX_FRAME = 32
MAX_SAMPLES = 2048


def border_colour(source: ImageSource) -> np.ndarray:
    """Per-channel median RGB of a frame along the image edges (1% of the shorter side, 1 to 32 pixels wide).

    Reads four thin strips, each sampled at most every ``length / 2048`` pixels along its length, so it is
    cheap on whole-slide images.
    """
    height, width = source.height, source.width
    frame = int(np.clip(round(FRAME_FRACTION * min(height, width)), 1, MAX_FRAME))
    rows, cols = slice(0, height, max(1, height // MAX_SAMPLES)), slice(0, width, max(1, width // MAX_SAMPLES))
    strips = [source.read(slice(0, frame), cols), source.read(slice(height - frame, height), cols),
              source.read(rows, slice(0, frame)), source.read(rows, slice(width - frame, width))]
    return np.median(np.concatenate([s.reshape(-1, 3) for s in strips]), axis=0)


def resolve_background(background: str | tuple | None, source: ImageSource) -> np.ndarray | None:
    """The background RGB (3,) in [0, 1]: ``'auto'`` estimates it, ``None`` turns background masking off."""
    if background is None:
        return None
    if isinstance(background, str):
        if background != "auto":
            raise ValueError(f"background must be 'auto', an RGB triple in [0, 1] or None, got '{background}'")
        return border_colour(source)
    colour = np.asarray(background, dtype=np.float64)
    if colour.shape != (3,) or not np.all((colour >= 0) & (colour <= 1)):
        raise ValueError(f"background must be 'auto', an RGB triple in [0, 1] or None, got {background!r}")
    return colour


def background_fraction(pixels: np.ndarray, colour: np.ndarray, tolerance: float) -> float:
    """Fraction of ``pixels`` (n x 3) within ``tolerance`` (Euclidean RGB distance) of ``colour``."""
    return float(np.mean(np.sum((pixels - colour) ** 2, axis=1) < tolerance ** 2))
