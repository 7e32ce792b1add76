"""Shared fixtures: Pyro validation, the shared DLPFC files and small simulated data.

Pyro's global parameter store is deliberately not cleared between tests: every module registers its parameters
under its own name, and the training loop does not use the store (tests/test_reliability_model.py).
"""

from __future__ import annotations

from pathlib import Path

import pyro
import pytest
import torch

import spavae

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dlpfc"
DLPFC_FILES = {name: SHARED / f"sample_{name}.h5" for name in ("151507", "151510")}


@pytest.fixture(autouse=True)
def _pyro_validation():
    pyro.enable_validation(True)
    torch.set_num_threads(2)
    yield
    pyro.enable_validation(False)


def dlpfc_path(name: str) -> Path:
    """Path of a shared DLPFC section, or skip the test with the reason."""
    path = DLPFC_FILES[name]
    if not path.exists():
        pytest.skip(f"shared DLPFC data not found at {path} (it lives in ../shared beside the checkout)")
    return path


@pytest.fixture(scope="session")
def small_adata():
    """A 16 x 16 simulated section with 4 domains and 60 genes."""
    return spavae.simulate_spatial_counts(n_rows=16, n_cols=16, n_genes=60, n_domains=4, seed=1)
