"""The pixels under each spot: a disc of the spot's physical diameter, read block by block.

A pixel belongs to a spot when its centre lies within the spot's radius of the spot centre (pixel
``(row, col)`` is centred at ``(x, y) = (col, row)``). A spot smaller than a pixel keeps the pixel nearest to its
centre, so a 4-pixel spot on a Space Ranger thumbnail has about 13 pixels and a sub-pixel spot has one. Spots
are grouped by the square block of ``block_size`` pixels holding their centre and each block's rectangle is read
once, so memory stays bounded by a block (plus one spot diameter) whatever the image size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from spavae.image.sources import ImageSource


@dataclass
class SpotPatch:
    """The pixels of one spot that fall on the image.

    Attributes
    ----------
    index
        Row of the spot in the centres passed to :func:`spot_patches`.
    pixels
        RGB float32 pixels of the spot's bounding box clipped to the image, ``(rows, cols, 3)``.
    mask
        ``(rows, cols)`` booleans: the pixels of ``pixels`` inside the spot's disc.
    coverage
        Fraction of the disc's pixels that lie on the image (0 for a spot entirely off it).
    """

    index: int
    pixels: np.ndarray
    mask: np.ndarray
    coverage: float


def disc(x: float, y: float, radius: float) -> tuple[int, int, np.ndarray]:
    """``(first row, first column, mask)`` of the pixels whose centres lie within ``radius`` of ``(x, y)``.

    The mask covers the disc's bounding box and is not clipped to any image; a disc holding no pixel centre
    gives the pixel nearest to ``(x, y)``.
    """
    col0, row0 = int(np.ceil(x - radius)), int(np.ceil(y - radius))
    cols = np.arange(col0, int(np.floor(x + radius)) + 1)
    rows = np.arange(row0, int(np.floor(y + radius)) + 1)
    mask = (cols[None, :] - x) ** 2 + (rows[:, None] - y) ** 2 <= radius ** 2
    if not mask.any():
        return int(np.floor(y + 0.5)), int(np.floor(x + 0.5)), np.ones((1, 1), dtype=bool)
    return row0, col0, mask


def spot_patches(
    source: ImageSource, centres: np.ndarray, diameter: float, *, block_size: int = 1024
) -> Iterator[SpotPatch]:
    """The :class:`SpotPatch` of every spot, in block order (each spot once).

    Parameters
    ----------
    source
        The image.
    centres
        Spot centres in image pixels, ``(n, 2)``, x then y.
    diameter
        Spot diameter in image pixels.
    block_size
        Side in pixels of the blocks read at once (memory: about ``(block_size + diameter)^2 * 12`` bytes).
    """
    radius = diameter / 2.0
    reach = max(radius, 0.5)
    keys = np.floor(centres / block_size).astype(np.int64)
    order = np.lexsort((keys[:, 0], keys[:, 1]))
    starts = np.flatnonzero(np.r_[True, np.any(np.diff(keys[order], axis=0) != 0, axis=1)])
    for group in np.split(order, starts[1:]):
        x, y = centres[group, 0], centres[group, 1]
        row_lo, row_hi = max(0, int(np.floor(y.min() - reach))), min(source.height, int(np.ceil(y.max() + reach)) + 1)
        col_lo, col_hi = max(0, int(np.floor(x.min() - reach))), min(source.width, int(np.ceil(x.max() + reach)) + 1)
        region = (source.read(slice(row_lo, row_hi), slice(col_lo, col_hi))
                  if row_hi > row_lo and col_hi > col_lo else None)
        for index in group:
            yield _clip(int(index), *disc(centres[index, 0], centres[index, 1], radius), region, row_lo, col_lo,
                        source.height, source.width)


def _clip(index: int, row0: int, col0: int, mask: np.ndarray, region: np.ndarray | None, row_lo: int, col_lo: int,
          height: int, width: int) -> SpotPatch:
    """The part of a disc on the image, cut from the block ``region`` that starts at ``(row_lo, col_lo)``."""
    top, bottom = max(row0, 0), min(row0 + mask.shape[0], height)
    left, right = max(col0, 0), min(col0 + mask.shape[1], width)
    if region is None or bottom <= top or right <= left:
        return SpotPatch(index, np.zeros((0, 0, 3), np.float32), np.zeros((0, 0), bool), 0.0)
    visible = mask[top - row0:bottom - row0, left - col0:right - col0]
    pixels = region[top - row_lo:bottom - row_lo, left - col_lo:right - col_lo]
    return SpotPatch(index, pixels, visible, float(visible.sum() / mask.sum()))
