"""Arrow (training-free): router vector = the input-space direction that each expert's update amplifies most.

The paper's update is `Delta u = B A u` with `Delta = B A` <[d_out, d_in]>; its top RIGHT singular vector
lives in input space (algorithm.md §5). Our factors are `lora_a = A^T` <[d_in, r]> and `lora_b = B^T` <[r, d_out]>,
so `M = lora_a @ lora_b = Delta^T` and that vector is the top LEFT singular vector of M.
"""
import numpy as np

from phatgoose_jax.routers import Routing, load_all, modules_of, routed

KIND = "arrow"


def arrow_vector(lora_a: np.ndarray, lora_b: np.ndarray) -> np.ndarray:
  """Top left singular vector of M = lora_a @ lora_b (unit norm, sign arbitrary), without forming M.

  With lora_a = Q_a R_a and lora_b^T = Q_b R_b (thin QR), M = Q_a (R_a R_b^T) Q_b^T; if R_a R_b^T = U S V^T
  then M = (Q_a U) S (Q_b V)^T, so the answer is Q_a U[:, 0].
  """
  q_a, r_a = np.linalg.qr(np.asarray(lora_a, np.float64))
  _, r_b = np.linalg.qr(np.asarray(lora_b, np.float64).T)
  u, _, _ = np.linalg.svd(r_a @ r_b.T)
  return (q_a @ u[:, 0]).astype(np.float32)


def arrow_vectors(lora: dict) -> dict:
  """`{module: arrow_vector}` for every module of a flat lora dict."""
  return {m: arrow_vector(lora[f"{m}/lora_a"], lora[f"{m}/lora_b"]) for m in modules_of(lora)}


def build(library, names, *, top_k: int = 2, impl: str = "dense") -> Routing:
  """Arrow routing: scores |u . e| / (10 sqrt(d_in)); vectors cached in the library, keyed by the weights."""
  experts = load_all(library, names)
  vectors = []
  for e in experts:
    name, key = e.manifest["name"], e.manifest["weights"]["sha256"]
    cached = library.load_derived(name, KIND, key)
    if cached is None:
      cached = arrow_vectors(e.lora)
      library.save_derived(name, KIND, cached, key)
    vectors.append(cached)
  return routed(experts, vectors, top_k=top_k, impl=impl, score="arrow")
