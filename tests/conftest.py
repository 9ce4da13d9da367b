"""Shared fixtures: a clean Pyro state per test and the location of the real data."""

import os
from pathlib import Path

import pyro
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_pyro_state():
    pyro.clear_param_store()
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


def shared_data_root() -> Path:
    """Return the real-data folder: ``$DINODPMM_DATA`` or ``../shared/data`` beside the repository."""
    return Path(os.environ.get("DINODPMM_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture
def lgg_root() -> Path:
    root = shared_data_root() / "lgg_flair"
    if not root.is_dir():
        pytest.skip(f"real brain MRI data not found at {root}; set DINODPMM_DATA to the folder holding lgg_flair")
    return root


@pytest.fixture
def magnetic_tile_root() -> Path:
    root = shared_data_root() / "magnetic_tile"
    if not root.is_dir():
        pytest.skip(f"magnetic tile data not found at {root}; set DINODPMM_DATA to the folder holding magnetic_tile")
    return root
