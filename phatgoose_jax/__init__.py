"""phatgoose-jax: PHATGOOSE (arXiv 2402.05859) in JAX/Flax.

The pipeline, in the order the package's folders show it: a T5 v1.1 model (`t5/`), LoRA experts, gates
and the routed layer (`experts/`), router builders and baselines (`routers/`), the expert library
(`library.py`), training (`training/`), evaluation (`evaluation/`) and the synthetic demo (`demo/`).
"""
from pathlib import Path

__version__ = "0.1.0"

_PACKAGE = Path(__file__).resolve().parent
# The package's gin files: installed beside the code (`pip install .`), or the repository's gin/ in a source
# checkout (`pip install -e .`). They are always found by this absolute path, never through the working directory.
GIN_DIR = next((d for d in (_PACKAGE / "gin", _PACKAGE.parent / "gin") if d.is_dir()), _PACKAGE / "gin")
