"""PHATGOOSE: each module's router is the E experts' trained gate vectors (algorithm.md §3, §4)."""
from phatgoose_jax.routers import Routing, load_all, routed


def build(library, names, *, top_k: int = 2, impl: str = "auto") -> Routing:
  """Router vector of expert e at module l = its gate v_{e,l}; scores LN(u) . LN(v_e) / sqrt(d_in)."""
  experts = load_all(library, names)
  ungated = [e.manifest["name"] for e in experts if not e.gates]
  if ungated:
    raise ValueError(f"experts {ungated} have no gate vectors: train their gates, or route them with "
                     f"router='average_activation' or 'arrow'")
  vectors = [{k.rsplit("/", 1)[0]: v for k, v in e.gates.items()} for e in experts]
  return routed(experts, vectors, top_k=top_k, impl=impl)
