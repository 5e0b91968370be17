"""Shared test fixtures: the real data directory of ../shared/data, quiet TensorFlow logs, a persistent JAX
compilation cache, and (the T5 SentencePiece model being on GCS) the small SentencePiece model seqio ships, for
the real-data tasks."""
import importlib.util
import os
import pathlib
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (the AOT tests compile for TPU topologies) refuses a second loading process unless allowed to share.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Many tests compile the same tiny models: each program is compiled once per machine and shared by the test
# workers and the processes the tests start (as the demo shares its stages' programs).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "phatgoose_jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# With a size bound, JAX holds a file lock around each read and write of the cache (jax/_src/lru_cache.py):
# without it a process can read, and deserialize, an entry another one is still writing.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
os.environ.setdefault("PHATGOOSE_SPM_PATH", str(pathlib.Path(importlib.util.find_spec("seqio").origin).parent
                                                / "test_data" / "sentencepiece" / "sentencepiece.model"))

import pytest

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  assert SHARED_DATA.is_dir(), f"expected the real test data at {SHARED_DATA}"
  return SHARED_DATA
