"""Shared test fixtures: the real data directory of ../shared/data, quiet TensorFlow logs, no persistent JAX
compilation cache, and (the T5 SentencePiece model being on GCS) the small SentencePiece model seqio ships, for
the real-data tasks."""
import importlib.util
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (the AOT tests compile for TPU topologies) refuses a second loading process unless allowed to share.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# No persistent compilation cache: deserializing cached XLA:CPU executables aborts the process now and then
# (jax/_src/compilation_cache.py get_executable_and_time; seen in CI and here on entries each of which loads
# alone), which would take a test worker down with it. This also keeps the demo's own cache off in the tests.
os.environ.setdefault("JAX_ENABLE_COMPILATION_CACHE", "false")
os.environ.setdefault("PHATGOOSE_SPM_PATH", str(pathlib.Path(importlib.util.find_spec("seqio").origin).parent
                                                / "test_data" / "sentencepiece" / "sentencepiece.model"))

import pytest

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  assert SHARED_DATA.is_dir(), f"expected the real test data at {SHARED_DATA}"
  return SHARED_DATA
