"""Shared test fixtures: the real data directory of ../shared/data, quiet TensorFlow logs, and (the T5
SentencePiece model being on GCS) the small SentencePiece model seqio ships, for the real-data tasks."""
import importlib.util
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("PHATGOOSE_SPM_PATH", str(pathlib.Path(importlib.util.find_spec("seqio").origin).parent
                                                / "test_data" / "sentencepiece" / "sentencepiece.model"))

import pytest

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  assert SHARED_DATA.is_dir(), f"expected the real test data at {SHARED_DATA}"
  return SHARED_DATA
