"""Reading HDF5 files: opening with one-line errors, and byte strings as text (shared by the .h5 readers)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np


def decode_strings(values: np.ndarray) -> np.ndarray:
    """An array of HDF5 strings (bytes or text) as an object array of ``str``."""
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)


def open_hdf5(path: Path) -> h5py.File:
    """Open an HDF5 file for reading, with one-line errors for a missing or unreadable file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path} is not a readable HDF5 file ({err})") from err
