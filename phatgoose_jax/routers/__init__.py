"""Routers: each turns E library experts into what the model needs to combine them (algorithm.md §4, §5).

A router is chosen by name (`ROUTERS`); its builder `build(library, names, **kwargs) -> Routing` returns
  expert_config   the model's ExpertConfig: 'routed' (per-token top-k over router vectors) or 'lora'
                  (one merged expert);
  collection      the matching variable collection: `experts` (per module `lora_a` [E, d_in, r],
                  `lora_b` [E, r, d_out], `router` [E, d_in], or [E, d_in, r] for spectr) or `lora`;
  expert_weights  None for per-token routers, else `fn(batch) -> <float32>[b, E]`, the fixed per-example
                  mixture to pass as `expert_weights` (uniform, oracle, retrieval).
Builders import lazily, so optional dependencies (sentence-transformers) load only when asked for.
"""
import importlib
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from phatgoose_jax.checkpoints import names as ckpt_names
from phatgoose_jax.experts.config import ExpertConfig

# Router name -> "module:function" under phatgoose_jax.routers.
ROUTERS = {
    "phatgoose": "phatgoose:build",
    "average_activation": "average_activation:build",
    "arrow": "arrow:build",
    "spectr": "spectr:build",
    "merged": "merging:build_average",
    "merged_products": "merging:build_products",
    "uniform": "fixed:build_uniform",
    "oracle": "fixed:build_oracle",
    "retrieval": "retrieval:build",
}
# The routers that route per token and so take `top_k` and `impl`; the others fix one mixture per example.
PER_TOKEN = ("phatgoose", "average_activation", "arrow", "spectr")


class Routing(NamedTuple):
  """What a router builds; see the module docstring."""
  expert_config: ExpertConfig
  collection: dict
  expert_weights: Optional[Callable[[Mapping], np.ndarray]] = None

  @property
  def collection_name(self) -> str:
    return "experts" if self.expert_config.mode == "routed" else "lora"

  def variables(self, params: Mapping) -> dict:
    """The model's variables: the base `params` plus this routing's collection."""
    return {"params": params, self.collection_name: self.collection}


def build(name: str, library, names: List[str], **kwargs) -> Routing:
  """Run the router `name` on the library experts `names`."""
  if name not in ROUTERS:
    raise ValueError(f"unknown router {name!r}; choose one of {sorted(ROUTERS)}")
  module, function = ROUTERS[name].split(":")
  builder = getattr(importlib.import_module(f"{__name__}.{module}"), function)
  return builder(library, names, **kwargs)


def stack(loras: Sequence[Mapping[str, np.ndarray]], vectors: Sequence[Mapping[str, np.ndarray]],
          modules: Sequence[str]) -> dict:
  """The nested `experts` collection: per module, experts stacked along a leading axis of size E.

  `loras[e]` is expert e's flat lora (`<module>/lora_a`, `<module>/lora_b`), `vectors[e]` its router
  vector per module (`<module>`: [d_in]).
  """
  flat = {}
  for m in modules:
    flat[f"{m}/lora_a"] = np.stack([np.asarray(l[f"{m}/lora_a"], np.float32) for l in loras])
    flat[f"{m}/lora_b"] = np.stack([np.asarray(l[f"{m}/lora_b"], np.float32) for l in loras])
    flat[f"{m}/router"] = np.stack([np.asarray(v[m], np.float32) for v in vectors])
  return ckpt_names.unflatten(flat)


def modules_of(lora: Mapping[str, np.ndarray]) -> List[str]:
  """The module paths of a flat lora dict, sorted."""
  return sorted({k.rsplit("/", 1)[0] for k in lora})


def routed(experts: Sequence, vectors: Sequence[Mapping[str, np.ndarray]], *, top_k: int = 2,
           impl: str = "dense", score: str = "standardized",
           expert_weights: Optional[Callable] = None) -> Routing:
  """A 'routed' Routing over library `Expert`s with the given per-module router vectors."""
  manifest = experts[0].manifest
  config = ExpertConfig(mode="routed", rank=manifest["rank"], targets=tuple(manifest["targets"]),
                        num_experts=len(experts), top_k=top_k, score=score, impl=impl)
  collection = stack([e.lora for e in experts], vectors, modules_of(experts[0].lora))
  return Routing(config, collection, expert_weights)


def zero_vectors(expert) -> Dict[str, np.ndarray]:
  """Zero router vectors for every module of an expert (routers that mix by fixed per-example weights)."""
  return {m: np.zeros(expert.lora[f"{m}/lora_a"].shape[0], np.float32) for m in modules_of(expert.lora)}


def load_all(library, names: Sequence[str]) -> list:
  return [library.load(n) for n in names]
