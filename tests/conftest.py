"""Shared test fixtures: the real data directory of ../shared/data and quiet TensorFlow logs."""
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  assert SHARED_DATA.is_dir(), f"expected the real test data at {SHARED_DATA}"
  return SHARED_DATA
