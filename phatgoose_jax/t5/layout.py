"""Per-layer (t5x, on disk) <-> stacked (`nn.scan`, in the model) layout of a variable tree.

On disk every stack keeps t5x's names, `encoder/layers_0/...`, `encoder/layers_1/...`. A stack run under
`nn.scan` holds one tree `encoder/layers/...` whose leaves carry a leading axis of size `num_layers`:

  stacked[stack]["layers"][path] = stack_along_0(per_layer[stack][f"layers_{i}"][path] for i < num_layers)

The conversion applies to every collection (`params`, `lora`, `gates`, `experts`, `intermediates`, ...) of
a `{collection: tree}` dict; a collection without a stack, or already in the target layout, passes through
unchanged. Every stage converts at its boundary: what it reads from disk or a library goes through
`for_model`, what it writes through `unstack_layers`.
"""
import functools
import operator
from typing import Callable, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import traverse_util

from phatgoose_jax.t5.config import T5Config

STACKED_NAME = "layers"


def _num_layers(config: T5Config) -> dict:
  return {"encoder": config.num_encoder_layers, "decoder": config.num_decoder_layers}


def _stacked(shardings, per_layer: list):
  """jnp.stack of each leaf across layers, placed in `shardings` (one leaf at a time, so the unstacked copy of
  only one parameter is alive beside the stacked model) or left where jnp.stack puts it."""
  if shardings is None:
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_layer)
  stack = lambda s, *xs: jax.jit(lambda *ys: jnp.stack(ys), out_shardings=s)(*xs)  # noqa: E731
  return jax.tree_util.tree_map(stack, shardings, *per_layer)


def _stack_one(tree: Mapping, config: T5Config, shardings: Optional[Mapping] = None) -> dict:
  out = dict(tree)
  for stack, n in _num_layers(config).items():
    if stack not in tree or STACKED_NAME in tree[stack]:
      continue
    sub = dict(tree[stack])
    names = [f"layers_{i}" for i in range(n)]
    missing = [name for name in names if name not in sub]
    if missing:
      raise ValueError(f"{stack} lacks {missing} for {n} layers; pass the T5Config the tree was built with")
    placed = None if shardings is None else shardings[stack][STACKED_NAME]
    sub[STACKED_NAME] = _stacked(placed, [sub.pop(name) for name in names])
    out[stack] = sub
  return out


def _unstack_one(tree: Mapping, config: T5Config) -> dict:
  out = dict(tree)
  for stack, n in _num_layers(config).items():
    if stack not in tree or STACKED_NAME not in tree[stack]:
      continue
    sub = dict(tree[stack])
    stacked = sub.pop(STACKED_NAME)
    sizes = {x.shape[0] for x in jax.tree_util.tree_leaves(stacked)}
    if sizes - {n}:
      raise ValueError(f"{stack}/{STACKED_NAME} has leading axes {sorted(sizes)}, the config says {n} layers")
    for i in range(n):
      sub[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
    out[stack] = sub
  return out


def stack_layers(variables: Mapping, config: T5Config, shardings: Optional[Mapping] = None) -> dict:
  """{collection: per-layer tree} -> {collection: stacked tree} (leaves [num_layers, ...]), each stacked leaf
  placed in its sharding where `shardings` ({collection: tree of the stacked model's shardings}) gives one."""
  return {col: _stack_one(tree, config, (shardings or {}).get(col))
          for col, tree in variables.items()}


def for_model(variables: Mapping, config: T5Config, shardings: Optional[Mapping] = None) -> dict:
  """The per-layer `variables` in the layout of a model of `config`: stacked when `config.scan_layers`."""
  return stack_layers(variables, config, shardings) if config.scan_layers else dict(variables)


def unstack_layers(variables: Mapping, config: T5Config) -> dict:
  """{collection: stacked tree} -> {collection: per-layer tree}; the inverse of `stack_layers`."""
  return {col: _unstack_one(tree, config) for col, tree in variables.items()}


def per_layer_flat(tree: Mapping, config: T5Config) -> Dict[str, Callable[[], object]]:
  """{per-layer path: a function returning its leaf} of one collection in either layout: the keys of
  the unstacked tree flattened with '/' , without the unstacked copy (a stacked leaf's layer i is sliced when asked for)."""
  flat = {}
  for key, value in traverse_util.flatten_dict(tree, sep="/").items():
    stack, _, rest = key.partition(f"/{STACKED_NAME}/")
    if rest and stack in _num_layers(config):
      for i in range(_num_layers(config)[stack]):
        flat[f"{stack}/layers_{i}/{rest}"] = functools.partial(operator.getitem, value, i)
    else:
      flat[key] = functools.partial(lambda x: x, value)
  return flat
