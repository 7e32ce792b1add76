r"""The coordinate frame of the GP: how spot locations become GP inputs (see ``docs/model.md``, "Location frame").

A frame is an affine map :math:`z = (x - c)\,A - o` fitted on a section's spots and kept with the model, so
that new locations (prediction, enhancement, another AnnData of the same section) land in the same frame.
Two rules fit it:

``'aligned'`` (default)
    1. Visium array indices (integers, ``row + col`` even, within a 78 x 128 capture area) are first put on their
       hexagonal lattice: a column step is half a spot pitch, a row step :math:`\sqrt3/2` of it
       (:func:`visium_lattice_matrix`). Any other coordinates (microns, pixels, bins) are taken as isotropic.
    2. The spots are centred. Where the variances along their principal axes differ by a factor
       :data:`ISOTROPY_RATIO` (2) or more, the frame turns onto those axes, longest first, each signed so that the
       spots' skewness along it is positive: rotating, mirroring or translating the input then gives the same frame
       coordinates, and so the same inducing points, the same loss and the same latent. An axis whose skewness is
       under :data:`MIN_SKEWNESS` (the section is nearly its own mirror image across it) is signed so that the
       frame does not mirror the input instead, and a longest axis with no sign of its own points along the input
       axis nearest to it: a few spots (or rounding) cannot flip the frame. Below the ratio (a square, a disk, the
       DLPFC sections at 1.08 to 1.26) the principal axes are too loosely defined to use and the frame keeps the
       input axes: there rotation is not removed.
    3. One isotropic scale (the aspect ratio is kept) from the spots' covariance :math:`\Sigma`: the frame gives
       area ``size**2`` to a uniformly covered rectangle with the same second moments, of area
       :math:`12\sqrt{\det\Sigma}`. A square section gets the original's ``[0, 20]^2`` (counting each spot's own
       cell: 40 x 40 spots span ``[0, 19.5]^2``), so the kernel scale (20) and the 7 x 7 inducing grid calibrated on
       Visium keep their meaning; a 3:1 rectangle gets about ``[0, 34.6] x [0, 11.5]``, the same area per inducing
       point and per kernel length; a round or ragged section, which fills less of its box, gets a somewhat larger
       frame (the DLPFC sections' boxes: sides 4 to 10 % over 20 in geometric mean). The scale depends neither on the
       orientation (it does not jump where the frame starts turning) nor on any single spot, and being tied to the
       tissue, not to units or spot pitch, it is the same for microns or pixels, and for the same tissue sampled at
       Visium pitch or at Visium HD's 8 um bins. The spots' bounding box in the frame starts at 0 and is the
       frame's ``extent``.

``'minmax'`` (the original spaVAE)
    Each axis min-max scaled to ``[0, size]`` independently: reproduces published numbers, but squeezes a 3:1
    rectangle into a square and depends on the section's orientation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FRAMES = ("aligned", "minmax")
#: A Visium capture area has array rows 0..77 and columns 0..127.
VISIUM_ROWS, VISIUM_COLS = 78, 128
#: Ratio of the principal variances from which the aligned frame turns onto the principal axes. At a ratio
#: :math:`\rho` a relative change :math:`\epsilon` of the covariance (``k`` boundary spots of ``n``:
#: :math:`\epsilon \approx 3k/n`) turns the axes by up to :math:`\epsilon\sqrt\rho/(\rho - 1)` radians: 1.4
#: :math:`\epsilon` at 2, 5.5 :math:`\epsilon` at 1.2 (DLPFC), without bound towards 1. Below 2 the turn also buys
#: little: an oval or a rectangle of that anisotropy left at the worst angle (45 degrees) has a bounding box, hence
#: an inducing grid, at most :math:`(\sqrt\rho - 1)^2/(2\sqrt\rho)` = 6 % larger than its shape alone costs.
ISOTROPY_RATIO = 2.0
#: Skewness (third moment over the cubed standard deviation) from which an aligned axis takes its sign from the
#: spots. Dropping 1 % of the spots at one end of a uniform spread moves its skewness by about 0.05
#: (:math:`0.01 \cdot 3\sqrt3`); a skewness smaller than that is a few spots' (or rounding's) doing.
MIN_SKEWNESS = 0.05


def visium_lattice_matrix() -> np.ndarray:
    """Linear map from Visium ``(array_row, array_col)`` to lattice ``(x, y)`` with equidistant hexagonal
    neighbours (the same map as :func:`spavae.analysis.visium_array_to_xy`): ``x = col``, ``y = sqrt(3) row``."""
    return np.array([[0.0, np.sqrt(3.0)], [1.0, 0.0]])


def looks_like_visium_array(locations: np.ndarray) -> bool:
    """Whether ``locations`` are Visium ``(array_row, array_col)`` indices: non-negative integers inside a capture
    area with ``row + col`` even for every spot (the hexagonal lattice's signature)."""
    locations = np.asarray(locations, dtype=np.float64)
    if len(locations) < 2 or not np.array_equal(locations, np.round(locations)) or (locations < 0).any():
        return False
    rows, cols = locations[:, 0], locations[:, 1]
    return bool(rows.max() < VISIUM_ROWS and cols.max() < VISIUM_COLS and not ((rows + cols) % 2).any())


def aligned_axes(centred: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """Sign the principal axes of centred spots (rule 2 of the module doc).

    Parameters
    ----------
    centred
        ``n x 2`` centred, isotropic spot locations.
    axes
        Their covariance's unit eigenvectors as columns, longest axis first.

    Returns
    -------
    The axes, each signed so that the spots' skewness along it is positive, or, where that skewness is under
    :data:`MIN_SKEWNESS`, so that the frame does not mirror the input; a longest axis without a sign of its own
    points along the input axis nearest to it.
    """
    projected = centred @ axes
    skewness = (projected ** 3).mean(0) / (projected ** 2).mean(0) ** 1.5
    signed = np.abs(skewness) >= MIN_SKEWNESS
    signs = np.where(skewness < 0, -1.0, 1.0)
    if not signed[0] and not signed[1]:
        nearest = np.argmax(np.abs(axes[:, 0]))
        signs[0] = 1.0 if axes[nearest, 0] > 0 else -1.0
    if not signed.all():
        unsigned = 1 if not signed[1] else 0
        signs[unsigned] *= np.sign(np.linalg.det(axes * signs))
    return axes * signs


@dataclass
class LocationFrame:
    """An affine frame ``z = (x - center) @ matrix - offset`` (see the module doc for the rules).

    Attributes
    ----------
    rule
        ``'aligned'`` or ``'minmax'``.
    size
        ``loc_range``: the side of the frame of a square section (20, as in the original).
    center, matrix, offset
        The fitted map (``2``, ``2 x 2``, ``2``).
    extent
        Width and height of the spots' bounding box in the frame (where the inducing grid goes).
    visium_array
        Whether the input was recognised as Visium array indices and put on its lattice first.
    """

    rule: str = "aligned"
    size: float = 20.0
    center: np.ndarray | None = None
    matrix: np.ndarray | None = None
    offset: np.ndarray | None = None
    extent: np.ndarray | None = None
    visium_array: bool = False

    def fit(self, locations: np.ndarray) -> LocationFrame:
        """Fit the frame on the spots of one section (``n x 2``)."""
        if self.rule not in FRAMES:
            raise ValueError(f"location_frame must be one of {list(FRAMES)}, got {self.rule!r}")
        if not self.size > 0:
            raise ValueError(f"loc_range must be positive, got {self.size}")
        locations = np.asarray(locations, dtype=np.float64)
        span = np.ptp(locations, axis=0)
        if (span <= 0).any():
            raise ValueError(f"all spots share the same coordinate on axis {int(np.argmin(span))}; spavae needs 2-D "
                             "spot locations that vary along both axes")
        if self.rule == "minmax":
            self.center, self.matrix = locations.min(axis=0), np.diag(self.size / span)
        else:
            self.visium_array = looks_like_visium_array(locations)
            lattice = visium_lattice_matrix() if self.visium_array else np.eye(2)
            self.center = locations.mean(axis=0)
            centred = (locations - self.center) @ lattice
            variances, axes = np.linalg.eigh(centred.T @ centred / len(centred))
            if variances[0] <= 1e-12 * variances[1]:  # spreads 1e-6 apart: rounding of a line's zero
                raise ValueError("the spots lie on a line; spavae needs 2-D spot locations")
            axes = aligned_axes(centred, axes[:, ::-1]) if variances[1] >= ISOTROPY_RATIO * variances[0] \
                else np.eye(2)
            self.matrix = lattice @ axes * (self.size / np.sqrt(12.0 * np.sqrt(variances.prod())))
        frame = (locations - self.center) @ self.matrix
        self.offset = frame.min(axis=0)
        self.extent = frame.max(axis=0) - self.offset
        return self

    def _check_fitted(self) -> None:
        if self.matrix is None:
            raise RuntimeError("LocationFrame.fit must be called first")

    def transform(self, locations: np.ndarray) -> np.ndarray:
        """Locations (``n x 2``, the units the frame was fitted in) to frame coordinates."""
        self._check_fitted()
        return (np.asarray(locations, dtype=np.float64) - self.center) @ self.matrix - self.offset

    def inverse_transform(self, frame: np.ndarray) -> np.ndarray:
        """Frame coordinates back to input locations."""
        self._check_fitted()
        return (np.asarray(frame, dtype=np.float64) + self.offset) @ np.linalg.inv(self.matrix) + self.center

    def fit_transform(self, locations: np.ndarray) -> np.ndarray:
        """Fit then transform."""
        return self.fit(locations).transform(locations)

    def to_dict(self) -> dict:
        """Plain values for the model file."""
        return {"rule": self.rule, "size": self.size, "center": self.center, "matrix": self.matrix,
                "offset": self.offset, "extent": self.extent, "visium_array": self.visium_array}

    @classmethod
    def from_dict(cls, values: dict) -> LocationFrame:
        """Inverse of :meth:`to_dict`; also reads the per-axis frames of model files written by spavae 0.2."""
        if "minimum" in values:  # 0.2: {"loc_range", "minimum", "span"}
            size, minimum, span = values["loc_range"], np.asarray(values["minimum"]), np.asarray(values["span"])
            return cls("minmax", size, minimum, np.diag(size / span), np.zeros(2), np.full(2, float(size)))
        return cls(**values)
