"""Average activation: router vector = the mean input activation of each module over the expert's data,
computed with that expert installed (algorithm.md §5); then routed exactly like PHATGOOSE.

  v_{e,l} = sum_{x, t} m_{x,t} u_{l}(x)_t / sum_{x, t} m_{x,t}

over examples x of expert e's data and their token positions t, with `u_l` the input of module l (sown
in the `activations` collection) in the 'lora' model carrying expert e. The mask m drops padding: the
encoder's for encoder modules and for cross-attention key / value (whose inputs are encoder states), the
decoder targets' for every other decoder module.
"""
import functools
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from phatgoose_jax import library as lib
from phatgoose_jax.checkpoints import names as ckpt_names
from phatgoose_jax.routers import Routing, load_all, routed
from phatgoose_jax.models import network
from phatgoose_jax.t5.network import Transformer

KIND = "average_activation"


def uses_encoder_mask(module_path: str) -> bool:
  """Whether a module's inputs are encoder positions: encoder modules and cross-attention key / value."""
  stack, *_, block, kind = module_path.split("/")
  return stack == "encoder" or (block == "encoder_decoder_attention" and kind in ("key", "value"))


def token_mask(module_path: str, batch: Mapping) -> jax.Array:
  """<bool>[b, L] non-pad positions of the tokens module `module_path` sees."""
  tokens = batch["encoder_input_tokens"] if uses_encoder_mask(module_path) else batch["decoder_target_tokens"]
  return jnp.asarray(tokens) > 0


@functools.partial(jax.jit, static_argnums=0)
def masked_sums(module: Transformer, variables: Mapping, batch: Mapping) -> dict:
  """`{module: (sum_t m_t u_t <float32>[d_in], sum_t m_t)}` over one batch, from the sown inputs."""
  _, state = module.apply(variables, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                          batch["decoder_target_tokens"], mutable=["activations"])
  sums = {}
  for key, (u,) in ckpt_names.flatten(state["activations"]).items():
    path = key.rsplit("/", 1)[0]
    mask = token_mask(path, batch).astype(jnp.float32)
    sums[path] = (jnp.einsum("bld,bl->d", u.astype(jnp.float32), mask), jnp.sum(mask))
  return sums


def activation_means(module: Transformer, variables: Mapping, batches: Sequence[Mapping]) -> dict:
  """`{module: v <float32>[d_in]}`: the masked mean of each module's input over all `batches`."""
  totals, counts = {}, {}
  for batch in batches:
    batch = {k: batch[k] for k in ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")}
    for path, (total, count) in masked_sums(module, variables, batch).items():
      totals[path] = totals.get(path, 0.0) + np.asarray(total, np.float64)
      counts[path] = counts.get(path, 0.0) + float(count)
  return {p: (totals[p] / max(counts[p], 1.0)).astype(np.float32) for p in totals}


def expert_vectors(library, expert, params: Optional[Mapping], batches: Optional[Sequence[Mapping]]) -> dict:
  """The expert's average activations: from the library cache when computed from these `batches` (or,
  without batches, from whatever data they were computed from), else computed and cached."""
  name = expert.manifest["name"]
  key = None if batches is None else lib.data_key(batches)
  cached = library.load_derived(name, KIND, key)
  if cached is not None:
    return cached
  if batches is None or params is None:
    raise ValueError(f"no cached average activations for expert {name!r}: pass params= and data={{{name!r}: "
                     f"[batches of its training data]}}")
  module = network(library.t5_config(), lib.expert_config(expert.manifest))
  variables = {"params": params, "lora": ckpt_names.unflatten(expert.lora)}
  vectors = activation_means(module, variables, batches)
  library.save_derived(name, KIND, vectors, key)
  return vectors


def build(library, names, *, params: Optional[Mapping] = None, data: Optional[Mapping[str, Sequence]] = None,
          top_k: int = 2, impl: str = "dense") -> Routing:
  """Routes by average activations; `data` maps expert names to lists of batches of their training data
  (t5x features), `params` are the base model's. Cached vectors are reused when `data` is left out."""
  experts = load_all(library, names)
  data = data or {}
  vectors = [expert_vectors(library, e, params, data.get(e.manifest["name"])) for e in experts]
  return routed(experts, vectors, top_k=top_k, impl=impl)
