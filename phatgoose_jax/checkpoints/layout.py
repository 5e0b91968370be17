"""Per-layer (t5x, on disk) <-> stacked (`nn.scan`, in the model) layout of a variable tree.

On disk every stack keeps t5x's names, `encoder/layers_0/...`, `encoder/layers_1/...`. A stack run under
`nn.scan` holds one tree `encoder/layers/...` whose leaves carry a leading axis of size `num_layers`:

  stacked[stack]["layers"][path] = stack_along_0(per_layer[stack][f"layers_{i}"][path] for i < num_layers)

The conversion applies to every collection (`params`, `lora`, `gates`, `experts`, `cache`, ...) of a
`{collection: tree}` dict; a collection without a stack passes through unchanged.
"""
from typing import Mapping

import jax
import jax.numpy as jnp

from phatgoose_jax.t5.config import T5Config

STACKED_NAME = "layers"


def _num_layers(config: T5Config) -> dict:
  return {"encoder": config.num_encoder_layers, "decoder": config.num_decoder_layers}


def _stack_one(tree: Mapping, config: T5Config) -> dict:
  out = dict(tree)
  for stack, n in _num_layers(config).items():
    if stack not in tree:
      continue
    sub = dict(tree[stack])
    names = [f"layers_{i}" for i in range(n)]
    missing = [name for name in names if name not in sub]
    if missing:
      raise ValueError(f"{stack} lacks {missing} for {n} layers; pass the T5Config the tree was built with")
    sub[STACKED_NAME] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[sub.pop(name) for name in names])
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


def stack_layers(variables: Mapping, config: T5Config) -> dict:
  """{collection: per-layer tree} -> {collection: stacked tree} (leaves [num_layers, ...])."""
  return {col: _stack_one(tree, config) for col, tree in variables.items()}


def unstack_layers(variables: Mapping, config: T5Config) -> dict:
  """{collection: stacked tree} -> {collection: per-layer tree}; the inverse of `stack_layers`."""
  return {col: _unstack_one(tree, config) for col, tree in variables.items()}
