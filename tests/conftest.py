"""Shared fixtures: isolated Pyro state, fixed seeds and the real-data directory."""

import os
from pathlib import Path

import pyro
import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """The tests' networks are tiny: intra-op threads only oversubscribe the CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def isolated_pyro_state():
    """Clear Pyro's global parameter store and fix every RNG before each test."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Directory holding the real data files (``PYROVAE_DATA_DIR`` or ``../shared/data``)."""
    configured = os.environ.get("PYROVAE_DATA_DIR")
    candidate = Path(configured) if configured else PROJECT_ROOT.parent / "shared" / "data"
    candidate = candidate.resolve()  # CI passes a relative path; tests symlink into tmp dirs
    if not (candidate / "binarized_mnist.npz").exists():
        message = f"real data not found in {candidate}"
        if configured:  # CI sets the variable: a missing file there is a failure, not a skip
            pytest.fail(message)
        pytest.skip(message + "; set PYROVAE_DATA_DIR")
    return candidate


@pytest.fixture
def float64():
    """Run a test in float64 (restores the default dtype afterwards)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
