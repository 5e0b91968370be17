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

from phatgoose_jax import library as lib
from phatgoose_jax.checkpoints import names as ckpt_names
from phatgoose_jax.experts.config import ExpertConfig

class RouterSpec(NamedTuple):
  """A router of the registry: where its builder is and what it declares it needs.

  per_token: routes every token at every module (takes `top_k`); otherwise one mixture per example or
    one merged expert.
  needs: inputs its builder takes beyond the library: 'params' (the base model's weights), 'data'
    (batches of each expert's training data as t5x features), 'sample' (batches of each expert's official
    average-activation sample: `encoder_input_tokens` and their texts), 'examples' (retrieval's store: the
    same).
    Routers that need data reuse what an earlier run cached in the library when no data is given.
  """
  builder: str
  per_token: bool
  needs: tuple = ()

  @property
  def reads_texts(self) -> bool:
    """Whether the builder reads its experts' datasets (their vocabulary must fit the model)."""
    return bool({"data", "sample", "examples"} & set(self.needs))


ROUTERS = {
    "phatgoose": RouterSpec("phatgoose:build", per_token=True),
    "average_activation": RouterSpec("average_activation:build", per_token=True, needs=("params", "sample")),
    "average_activation_pooled": RouterSpec("average_activation:build_pooled", per_token=True,
                                            needs=("params", "data")),
    "arrow": RouterSpec("arrow:build", per_token=True),
    "spectr": RouterSpec("spectr:build", per_token=True),
    "merged": RouterSpec("merging:build_average", per_token=False),
    "merged_products": RouterSpec("merging:build_products", per_token=False),
    "uniform": RouterSpec("fixed:build_uniform", per_token=False),
    "oracle": RouterSpec("fixed:build_oracle", per_token=False, needs=("labels",)),
    "retrieval": RouterSpec("retrieval:build", per_token=False, needs=("examples",)),
    "retrieval_t5": RouterSpec("retrieval:build_t5", per_token=False, needs=("params", "examples")),
}
PER_TOKEN = tuple(name for name, spec in ROUTERS.items() if spec.per_token)
# Routers whose builders produce a routed `experts` collection and so take the routing `impl`.
ROUTED = PER_TOKEN + ("uniform", "oracle", "retrieval", "retrieval_t5")


def spec(name: str) -> RouterSpec:
  if name not in ROUTERS:
    raise ValueError(f"unknown router {name!r}; choose one of {sorted(ROUTERS)}")
  return ROUTERS[name]


def options(name: str, *, top_k: int = 2, impl: str = "auto", params: Optional[Mapping] = None) -> dict:
  """The keyword arguments router `name` takes from a model's settings: `top_k` for per-token routers,
  `impl` for routed ones, the base `params` for those that declare they need them."""
  router = spec(name)
  kwargs = {"top_k": top_k} if router.per_token else {}
  kwargs.update({"impl": impl} if name in ROUTED else {})
  kwargs.update({"params": params} if "params" in router.needs and params is not None else {})
  return kwargs


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


def build(name: str, library, names: Sequence[str], **kwargs) -> Routing:
  """Run the router `name` on the library experts `names` (in this order); refuses experts the library does
  not hold, or that do not share its base model, rank and targets (`ExpertLibrary.check_consistent`)."""
  missing = [n for n in names if n not in library.names()]
  if missing or not names:
    raise lib.LibraryError(f"library {library.path} has no experts {missing or '(none asked)'}; it has "
                        f"{library.names()}")
  library.check_consistent(list(names))
  module, function = spec(name).builder.split(":")
  builder = getattr(importlib.import_module(f"{__name__}.{module}"), function)
  return builder(library, list(names), **kwargs)


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
           impl: str = "auto", score: str = "standardized",
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


def weight_derived(library, experts: Sequence, kind: str, compute: Callable[[Mapping], dict]) -> List[dict]:
  """Per expert, `compute(expert.lora)` (a function of its weights alone), cached in the library under
  `kind` and keyed by the sha256 of those weights."""
  out = []
  for expert in experts:
    name, key = expert.manifest["name"], expert.manifest["weights"]["sha256"]
    cached = library.load_derived(name, kind, key)
    if cached is None:
      cached = compute(expert.lora)
      library.save_derived(name, kind, cached, key)
    out.append(cached)
  return out


def load_all(library, names: Sequence[str]) -> list:
  return [library.load(n) for n in names]
