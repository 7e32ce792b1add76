"""How the aligned location frame sits on each section we have, and how far a few dropped spots move it.

Usage: python benchmarks/frame_stability.py [--draws 20] [--dropped 3] [--panel DIR] [--dlpfc DIR]

Sections: a 40 x 40 square lattice and a 3:1 rectangle of 50 um bins turned by 30 degrees (synthetic), the DLPFC
sections of ``../shared/data/dlpfc/`` and the sections of ``../shared/data/panel/``, each read with
:func:`spavae.read` and its locations taken as the data setup takes them
(:func:`spavae.data.setup.spot_locations`; no :func:`~spavae.data.filter_empty`). One JSON line per section:

* ``variance_ratio``: larger over smaller variance along the principal axes (after the Visium lattice map), and
  ``skewness`` along them, longest first: what :class:`~spavae.data.frame.LocationFrame` decides on;
* ``rotated``: whether the frame turned onto the principal axes (ratio at least
  :data:`~spavae.data.frame.ISOTROPY_RATIO`); ``angle``: direction of the frame's first axis in the (lattice)
  input, degrees; ``mirrored``: whether the frame mirrors the input; ``scale``: frame units per input unit;
  ``extent``: the frame's bounding box;
* ``max_turn`` (degrees; a mirror image counts as 180) and ``max_scale_change`` (relative): the largest change of
  the frame over ``--draws`` seeded draws of ``--dropped`` random spots removed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import spavae
from spavae.data import LocationFrame
from spavae.data.frame import ISOTROPY_RATIO, looks_like_visium_array, visium_lattice_matrix
from spavae.data.setup import spot_locations

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def synthetic_sections() -> dict[str, np.ndarray]:
    """The review's 40 x 40 square lattice and a turned 3:1 rectangle of bins (its own mirror image)."""
    square = np.stack(np.meshgrid(np.arange(40.0), np.arange(40.0), indexing="ij"), axis=-1).reshape(-1, 2)
    xs, ys = np.meshgrid(np.arange(0.0, 3001.0, 50.0), np.arange(0.0, 1001.0, 50.0), indexing="ij")
    angle = np.deg2rad(30.0)
    turn = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
    return {"square_40x40": square, "rectangle_3to1_turned_30": np.column_stack([xs.ravel(), ys.ravel()]) @ turn}


def shared_sections(dlpfc: Path, panel: Path) -> dict[str, np.ndarray]:
    """Spot locations of the shared sections, as the data setup reads them."""
    paths = sorted(dlpfc.glob("*.h5")) + sorted(panel.glob("*.h5ad"))
    return {path.stem: spot_locations(spavae.read(path), "spatial") for path in paths}


def principal_statistics(locations: np.ndarray) -> tuple[float, list[float]]:
    """Variance ratio and skewness along the principal axes (longest first) of the lattice-mapped spots."""
    lattice = visium_lattice_matrix() if looks_like_visium_array(locations) else np.eye(2)
    centred = (locations - locations.mean(0)) @ lattice
    variances, axes = np.linalg.eigh(centred.T @ centred / len(centred))
    projected = centred @ axes[:, ::-1]
    skewness = (projected ** 3).mean(0) / (projected ** 2).mean(0) ** 1.5
    return float(variances[1] / variances[0]), [round(float(value), 4) for value in skewness]


def orientation(frame: LocationFrame) -> tuple[float, bool, float]:
    """Direction of the frame's first axis in the (lattice) input (degrees), whether it mirrors, and its scale."""
    lattice = visium_lattice_matrix() if frame.visium_array else np.eye(2)
    axes = np.linalg.solve(lattice, frame.matrix)
    scale = float(np.sqrt(abs(np.linalg.det(axes))))
    return float(np.degrees(np.arctan2(axes[1, 0], axes[0, 0]))), bool(np.linalg.det(axes) < 0), scale


def change(reference: LocationFrame, other: LocationFrame) -> tuple[float, float]:
    """Turn (degrees; a mirror image counts as 180) and relative scale change of ``other`` against ``reference``."""
    relative = np.linalg.solve(reference.matrix, other.matrix)
    scale = float(np.sqrt(abs(np.linalg.det(relative))))
    turn = 180.0 if np.linalg.det(relative) < 0 else abs(float(np.degrees(np.arctan2(relative[0, 1],
                                                                                       relative[0, 0]))))
    return turn, abs(scale - 1.0)


def measure(name: str, locations: np.ndarray, draws: int, dropped: int) -> dict:
    """One section's line."""
    ratio, skewness = principal_statistics(locations)
    frame = LocationFrame().fit(locations)
    angle, mirrored, scale = orientation(frame)
    turns, scales = [], []
    for seed in range(draws):
        keep = np.ones(len(locations), dtype=bool)
        keep[np.random.default_rng(seed).choice(len(locations), dropped, replace=False)] = False
        turn, scale_change = change(frame, LocationFrame().fit(locations[keep]))
        turns.append(turn)
        scales.append(scale_change)
    return {"section": name, "n_spots": len(locations), "visium_array": frame.visium_array,
            "variance_ratio": round(ratio, 4), "skewness": skewness, "rotated": ratio >= ISOTROPY_RATIO,
            "angle": round(angle, 2), "mirrored": mirrored, "scale": float(f"{scale:.5g}"),
            "extent": [round(float(side), 3) for side in frame.extent], "draws": draws, "dropped": dropped,
            "max_turn": round(max(turns), 3), "max_scale_change": round(max(scales), 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=20, help="seeded draws of dropped spots per section")
    parser.add_argument("--dropped", type=int, default=3, help="spots dropped per draw")
    parser.add_argument("--panel", type=Path, default=SHARED / "panel", help="folder of panel .h5ad sections")
    parser.add_argument("--dlpfc", type=Path, default=SHARED / "dlpfc", help="folder of the DLPFC .h5 sections")
    args = parser.parse_args()
    sections = synthetic_sections() | shared_sections(args.dlpfc, args.panel)
    for name, locations in sections.items():
        print(json.dumps(measure(name, locations, args.draws, args.dropped)), flush=True)


if __name__ == "__main__":
    main()
