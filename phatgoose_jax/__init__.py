"""phatgoose-jax: PHATGOOSE (arXiv 2402.05859) in JAX/Flax.

The pipeline, in the order the package's folders show it: a T5 v1.1 model (`t5/`), LoRA experts, gates
and the routed layer (`experts/`), router builders and baselines (`routers/`), the expert library
(`library.py`), training (`training/`), evaluation (`evaluation/`) and the synthetic demo (`demo/`).
`phatgoose_jax.load(base, library=...)` gives the model as text in, scores and generations out
(`text_model.py`).
"""
from pathlib import Path

__version__ = "0.1.0"

_PACKAGE = Path(__file__).resolve().parent
# The package's gin files: installed beside the code (`pip install .`), or the repository's gin/ in a source
# checkout (`pip install -e .`). They are always found by this absolute path, never through the working directory.
GIN_DIR = next((d for d in (_PACKAGE / "gin", _PACKAGE.parent / "gin") if d.is_dir()), _PACKAGE / "gin")


def __getattr__(name: str):
  """`phatgoose_jax.load` (`text_model.load`), imported on first use so that importing the package stays free
  of jax and TensorFlow."""
  if name == "load":
    from phatgoose_jax import text_model  # pylint: disable=import-outside-toplevel
    return text_model.load
  raise AttributeError(f"module 'phatgoose_jax' has no attribute {name!r}")
