"""Small shared helpers: seeding, device and dtype resolution, atomic file writes."""

from __future__ import annotations

import math
import os
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run the block with the global generators of Python, NumPy and torch (those Pyro draws from) seeded with
    ``seed``, then hand the caller back the states they had.

    What the block draws depends on ``seed`` alone, and the caller's random streams go on afterwards as if the block
    had not run. torch's generator of ``device`` is seeded and restored too when it is a CUDA device; the CUDA
    generators are left alone otherwise.
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    cuda = [] if device is None or device.type != "cuda" else \
        [device.index if device.index is not None else torch.cuda.current_device()]
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=cuda):
        random.seed(seed)
        np.random.seed(seed)
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def check_number(name: str, value, *, integer: bool = False, low: float | None = None,
                 inclusive: bool = True) -> None:
    """Raise a one-line ValueError unless ``value`` is a finite real number (an integer with ``integer``, never a
    bool) that is at least (``inclusive``) or above ``low``."""
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    valid = isinstance(value, kinds) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)
    if valid and low is not None:
        valid = value >= low if inclusive else value > low
    if not valid:
        bound = "" if low is None else f" {'>=' if inclusive else '>'} {low}"
        raise ValueError(f"{name} must be {'an integer' if integer else 'a finite number'}{bound}, got {value!r}")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``'auto'`` picks CUDA when available, else the CPU; anything else is checked and returned."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:<index>'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available; use device='cpu' or 'auto'")
    return device


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``'float32'``/``'float64'`` (or the torch dtypes) to a torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")


def check_output_file(path: str | os.PathLike, *, overwrite: bool) -> Path:
    """``path`` as a Path, after checking that a file may be written there: it must not be a folder, nor an existing
    file unless ``overwrite`` (FileExistsError)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a file; give the path of the file to write (inside it or elsewhere)")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    return path


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path`` and move it into place only if the block succeeds.

    A crash or interrupt leaves any previous file at ``path`` untouched and no half-written file behind. The
    temporary file is flushed to the disk (``fsync``) before it is renamed, and the folder after, so that a power
    cut cannot leave an empty or partial file under the complete name. A missing folder is created; a ``path`` that
    is a folder, a folder that is a file and a folder without write permission are one-line errors (ValueError,
    PermissionError) raised before anything is written.
    """
    path = check_output_file(path, overwrite=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    except PermissionError:
        raise PermissionError(f"cannot write {path}: no permission to write in {path.parent}; choose a writable "
                              "output folder") from None
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"cannot write {path}: a part of {path.parent} is a file, not a folder; choose another "
                         "output path") from None
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        _sync(tmp)
        os.replace(tmp, path)
        _sync(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _sync(path: str | os.PathLike) -> None:
    """Flush a file's data (or a folder's entries) to the disk, so that a power cut cannot undo them.

    Folders are synced only where they can be opened (POSIX).
    """
    folder = os.path.isdir(path)
    if folder and os.name != "posix":
        return
    descriptor = os.open(path, os.O_RDONLY if folder else os.O_RDWR)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
