"""Arrow (training-free): router vector = the input-space direction that each expert's update amplifies most.

The paper's update is `Delta u = B A u` with `Delta = B A` <[d_out, d_in]>; its top RIGHT singular vector
lives in input space (algorithm.md §5). Our factors are `lora_a = A^T` <[d_in, r]> and `lora_b = B^T` <[r, d_out]>,
so `M = lora_a @ lora_b = Delta^T` and that vector is the top LEFT singular vector of M.
"""
import numpy as np

from phatgoose_jax.routers import Routing, load_all, modules_of, routed, weight_derived
from phatgoose_jax.routers.spectr import spectral_basis

KIND = "arrow"


def arrow_vector(lora_a: np.ndarray, lora_b: np.ndarray) -> np.ndarray:
  """Top left singular vector of M = lora_a @ lora_b (unit norm, sign arbitrary), without forming M: the
  first column of SpectR's spectral basis (`spectr.spectral_basis`)."""
  return spectral_basis(lora_a, lora_b)[:, 0]


def arrow_vectors(lora: dict) -> dict:
  """`{module: arrow_vector}` for every module of a flat lora dict."""
  return {m: arrow_vector(lora[f"{m}/lora_a"], lora[f"{m}/lora_b"]) for m in modules_of(lora)}


def build(library, names, *, top_k: int = 2, impl: str = "auto") -> Routing:
  """Arrow routing: scores |u . e| / (10 sqrt(d_in)); vectors cached in the library, keyed by the weights."""
  experts = load_all(library, names)
  vectors = weight_derived(library, experts, KIND, arrow_vectors)
  return routed(experts, vectors, top_k=top_k, impl=impl, score="arrow")
