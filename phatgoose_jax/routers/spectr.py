"""SpectR (training-free): route each token by its projection onto every expert's full input-space spectrum.

Fleshman & Van Durme, "SpectR: Dynamically Composing LM Experts with Spectral Routing" (COLM 2025,
arXiv:2504.03454); official code `wfleshman/spectr`, `llm_merging/merging/SpectR.py`. Each expert's update
`Delta_e = B_e A_e = U_e S_e V_e^T` is re-factored as `B'_e = U_e S_e`, `A'_e = V_e^T` (its rows are the
r right singular vectors: an orthonormal basis of the input directions the update acts on), and token `u`
scores every expert by the length of its projection on that basis (`RouteWrap.forward`):

  s_e(u) = || A'_e u ||_2 = || V_e^T u ||_2

the top-k experts by s_e are mixed (algorithm.md §5). Arrow keeps only `V_e[:, 0]` and scores `|v_e . u|`; SpectR
uses all r singular directions (the "full spectrum"), without their singular values. The score is computed
by `experts.routing.spectr_scores`; here each module's router variable holds `V_e` <[d_in, r]>.

Our factors are `lora_a = A^T` <[d_in, r]> and `lora_b = B^T` <[r, d_out]>, so `M = lora_a @ lora_b =
Delta^T` and `V_e` is the matrix of M's r LEFT singular vectors.
"""
import numpy as np

from phatgoose_jax.routers import Routing, load_all, modules_of, routed, weight_derived

KIND = "spectr"


def spectral_basis(lora_a: np.ndarray, lora_b: np.ndarray) -> np.ndarray:
  """V <float32>[d_in, r]: the r left singular vectors of M = lora_a @ lora_b, by descending singular value,
  without forming M.

  With lora_a = Q_a R_a and lora_b^T = Q_b R_b (thin QR), M = Q_a (R_a R_b^T) Q_b^T; if R_a R_b^T = U S W^T
  then M = (Q_a U) S (Q_b W)^T, so V = Q_a U (orthonormal columns; signs arbitrary, which the norm ignores).
  """
  q_a, r_a = np.linalg.qr(np.asarray(lora_a, np.float64))
  _, r_b = np.linalg.qr(np.asarray(lora_b, np.float64).T)
  u, _, _ = np.linalg.svd(r_a @ r_b.T)
  return (q_a @ u).astype(np.float32)


def spectral_bases(lora: dict) -> dict:
  """`{module: spectral_basis}` for every module of a flat lora dict."""
  return {m: spectral_basis(lora[f"{m}/lora_a"], lora[f"{m}/lora_b"]) for m in modules_of(lora)}


def build(library, names, *, top_k: int = 2, impl: str = "auto") -> Routing:
  """SpectR routing: s_e = ||V_e^T u||; bases cached in the library, keyed by the expert's weights."""
  experts = load_all(library, names)
  bases = weight_derived(library, experts, KIND, spectral_bases)
  return routed(experts, bases, top_k=top_k, impl=impl, score="spectr")
