"""The routed layer on a device mesh: every device routes its own share of the tokens (algorithm.md §4).

Inside the routed layer the tokens are split over every mesh axis that divides them: the activations' batch
axes ('data', 'expert'), and 'model' too, which the plain matmul splits by weight columns instead. Each device
scores its tokens against all E router vectors, keeps their top-k and mixes their chosen experts with the
ordinary functions (`routing.choose`, `routing.mixer`, inside a `shard_map`: the megablox kernel cannot be
partitioned automatically), so every (token, choice) pair is routed and computed once, on one device, with
the arithmetic of the unsharded layer. The layer's experts and router vectors, stored split over 'expert'
(each device holds E/n experts) and their wide dimension over 'model', are gathered whole for the layer, in
the compute dtype: E r (d_in + d_out) values move instead of the tokens' rows. The layer takes this path
whenever the context mesh (`jax.set_mesh`) has more than one device; the model's programs are compiled with
`mesh_jit`, which traces them under the mesh their arguments are laid out on.
"""
import contextlib
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from phatgoose_jax.experts import cost, routing

EXPERT_AXIS = "expert"
DATA_AXIS = "data"
MODEL_AXIS = "model"


def context_mesh() -> Optional[jax.sharding.AbstractMesh]:
  """The context mesh when it has more than one device, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None
  return mesh


def on_mesh(tree) -> contextlib.AbstractContextManager:
  """`jax.set_mesh` of the mesh `tree`'s first array (or shape struct) is laid out on, when that mesh has more
  than one device and `tree` is not being traced; else no context."""
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.core.Tracer):
      break
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh.size > 1:
      return jax.set_mesh(sharding.mesh)
    if sharding is not None:
      break
  return contextlib.nullcontext()


class _MeshJit:
  """A `jax.jit` function called and lowered under its arguments' mesh (`on_mesh`)."""

  def __init__(self, jitted):
    self.jitted = jitted

  def __call__(self, *args, **kwargs):
    with on_mesh((args, kwargs)):
      return self.jitted(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with on_mesh((args, kwargs)):
      return self.jitted.lower(*args, **kwargs)

  def __getattr__(self, name):  # the jitted function's own attributes (`_cache_size`, `eval_shape`, ...)
    return getattr(self.jitted, name)


def mesh_jit(fn=None, **jit_kwargs):
  """`jax.jit(fn, **jit_kwargs)` traced under the mesh its arguments are on, so the routed layer sees that mesh
  as its context; usable as a decorator with keyword arguments."""
  if fn is None:
    return lambda f: mesh_jit(f, **jit_kwargs)
  return _MeshJit(jax.jit(fn, **jit_kwargs))


def token_axes(mesh, tokens: int) -> Optional[tuple]:
  """The mesh axes the routed layer splits `tokens` over: the activations' batch axes (the rules' 'batch',
  default ('data', 'expert')) and 'model', else fewer of them (the batch axes, then 'data' alone) where their
  product does not divide `tokens`; None (every device routes every token) when none divides."""
  rules = nn.get_logical_axis_rules()
  batch = nn.logical_to_mesh_axes(("batch",), rules)[0] if rules else (DATA_AXIS, EXPERT_AXIS)
  batch = tuple(a for a in ((batch,) if isinstance(batch, str) else batch or ()) if a in mesh.shape)
  for axes in (batch + (MODEL_AXIS,) * (MODEL_AXIS in mesh.shape and MODEL_AXIS not in batch), batch,
               (DATA_AXIS,) * (DATA_AXIS in mesh.shape)):
    if axes and tokens % math.prod(mesh.shape[a] for a in axes) == 0:
      return axes
  return None


def route(u, router, lora_a, lora_b, *, top_k, scale, score="standardized", impl="auto", rows=None):
  """`routing.route` on the context mesh (see the module docstring): the same arguments and results, equal to
  the unsharded layer's up to the mixer `auto` takes for one device's share of the tokens.

  Returns (update <u.dtype>[..., d_out], weights [..., k], index [..., k]).
  """
  mesh = context_mesh()
  lead, d_in = u.shape[:-1], u.shape[-1]
  tokens = math.prod(lead)
  tok = token_axes(mesh, tokens)
  share = tokens // (math.prod(mesh.shape[a] for a in tok) if tok else 1)
  num_experts, rank, d_out = lora_b.shape
  layer = cost.LayerShape(share, d_in, d_out, num_experts, rank, top_k, jnp.dtype(u.dtype).name)
  mixer = routing.mixer(routing.resolve_impl(impl, layer=layer))
  if rows is not None:  # each token carries its row's routing (a row's tokens are contiguous)
    rows = routing.RowRouting(*(jnp.repeat(x, tokens // x.shape[0], axis=0) for x in rows))

  def local(u, router, lora_a, lora_b, rows):
    weights, index = routing.choose(u[:, None], router, top_k=top_k, score=score, rows=rows)
    weights, index = weights[:, 0], index[:, 0]
    return mixer(u, lora_a, lora_b, weights, index, scale), weights, index

  split, whole = PartitionSpec(tok), PartitionSpec()
  update, weights, index = jax.shard_map(
      local, mesh=mesh, check_vma=False, out_specs=(split, split, split),
      in_specs=(split, jax.tree.map(lambda _: whole, router), whole, whole,
                None if rows is None else routing.RowRouting(split, split, split)),
  )(u.reshape(tokens, d_in), router, lora_a.astype(u.dtype), lora_b.astype(u.dtype), rows)
  return update.reshape(*lead, -1), weights.reshape(*lead, top_k), index.reshape(*lead, top_k)
