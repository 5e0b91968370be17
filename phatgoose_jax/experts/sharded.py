"""The routed layer on a device mesh (algorithm.md §4): the tokens' rows or the experts move, whichever is less.

Two layouts, chosen per layer from what would move (`moves_experts`):

* Tokens stay (a long sequence: E r < the tokens of one data shard). Inside the routed layer the tokens are
  split over every mesh axis that divides them: the activations' batch axes ('data', 'expert'), and 'model'
  too, which the plain matmul splits by weight columns instead. Each device scores its tokens against all E
  router vectors, keeps their top-k and mixes their chosen experts with the ordinary functions
  (`routing.route`, inside a `shard_map`: the Pallas kernels cannot be partitioned
  automatically), so every (token, choice) pair is routed and computed once, with the arithmetic of the
  unsharded layer. The layer's experts and router vectors, stored split over 'expert' (E/n per device) and
  their wide dimension over 'model', are gathered whole for the layer: E r (d_in + d_out) values move.
* Experts stay (a decoding step's few tokens). The routing choice is made outside on the whole router, as the
  unsharded layer makes it; each device mixes every token of its data shard (gathered over 'expert') with
  only the E/n experts it holds, the pairs routed to other shards carrying weight 0, and one psum over
  'expert' adds the shards up:
    y = sum_j w_j (B_{i_j} A_{i_j} u) scale = psum_s sum_{j : i_j in shard s} w_j (B_{i_j} A_{i_j} u) scale.
  With the flax logical-axis rules in context (`nn.logical_axis_rules`), an output split over 'model' stays
  split, and an input split over 'model' gives partial sums (`u A` is linear in `u`) that the same psum
  completes.

The layer takes this path whenever the context mesh (`jax.set_mesh`, or t5x's `with Mesh(...)`) has more than
one device; the model's programs are compiled with `mesh_jit`, which traces them under the mesh their arguments
are laid out on.
"""
import contextlib
import dataclasses
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax._src import mesh as mesh_lib
from jax.sharding import PartitionSpec

from phatgoose_jax.experts import cost, routing

EXPERT_AXIS = "expert"
DATA_AXIS = "data"
MODEL_AXIS = "model"


def context_mesh() -> Optional[jax.sharding.AbstractMesh]:
  """The context mesh when it has more than one device, else None: `jax.set_mesh`'s, or the `with Mesh(...)`
  resource environment t5x's partitioner calls and lowers its programs under (`PjittedFnWithContext`)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    mesh = mesh_lib.thread_resources.env.physical_mesh
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
    if axes and tokens % _axes_size(mesh, axes) == 0:
      return axes
  return None


def _axes_size(mesh, axes) -> int:
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))


def _split_if_divides(mesh, axes, size: int):
  """`axes` when they are mesh axes whose size divides `size`, else None (replicated)."""
  if axes is None or any(a not in mesh.shape for a in ((axes,) if isinstance(axes, str) else axes)):
    return None
  return axes if size % _axes_size(mesh, axes) == 0 else None


def _model_axes(mesh, kernel_axes, d_in: int, d_out: int) -> tuple:
  """(mesh axes of d_in, of d_out) inside the experts-stay mix: from the context rules, at most one split."""
  rules = nn.get_logical_axis_rules()
  if not rules or kernel_axes is None:
    return None, None
  in_axes, out_axes = nn.logical_to_mesh_axes(kernel_axes, rules)
  in_axes, out_axes = _split_if_divides(mesh, in_axes, d_in), _split_if_divides(mesh, out_axes, d_out)
  if EXPERT_AXIS in (in_axes, out_axes) or DATA_AXIS in (in_axes, out_axes):
    return None, None
  return (None, out_axes) if out_axes is not None else (in_axes, None)


def moves_experts(mesh, tokens: int, num_experts: int, rank: int) -> bool:
  """Whether the layer gathers its experts (tokens stay): when E r values per width are fewer than the token
  rows one data shard would gather over 'expert' (tokens / data), and the experts are split at all."""
  if mesh.shape.get(EXPERT_AXIS, 1) == 1:
    return True
  return num_experts * rank < tokens // mesh.shape.get(DATA_AXIS, 1)


def route(u, router, lora_a, lora_b, *, top_k, scale, score="standardized", impl="auto", rows=None, kernel=None,
          kernel_axes=None):
  """`routing.route` on the context mesh (see the module docstring): the same arguments and results, equal to
  the unsharded layer's up to float summation order and the mixer `auto` takes for one device's share.
  `kernel_axes` are the layer kernel's logical (input, output) names. The plain layer's `kernel` goes into each
  device's route (for a path that forms u W in its own kernel) where the tokens are split over every device, so
  each holds the whole kernel; else u W is XLA's partitioned matmul beside the update.

  Returns (update <u.dtype>[..., d_out] (or u W + update), weights [..., k], index [..., k]).
  """
  mesh = context_mesh()
  num_experts, rank = lora_b.shape[:2]
  if num_experts % mesh.shape.get(EXPERT_AXIS, 1):
    raise ValueError(f"{num_experts} experts cannot be split over an 'expert' mesh axis of size "
                     f"{mesh.shape[EXPERT_AXIS]}; choose an expert axis size that divides the expert count")
  tokens = math.prod(u.shape[:-1])
  stay = moves_experts(mesh, tokens, num_experts, rank)
  if stay and kernel is not None and _axes_size(mesh, token_axes(mesh, tokens)) == mesh.size:
    return _route_tokens_stay(mesh, u, router, lora_a, lora_b, top_k, scale, score, impl, rows, kernel)
  if stay:
    update, weights, index = _route_tokens_stay(mesh, u, router, lora_a, lora_b, top_k, scale, score, impl, rows)
  else:
    weights, index, _ = routing.choose(u, router, top_k=top_k, score=score, rows=rows)
    update = _mix_experts_stay(mesh, u, lora_a, lora_b, weights, index, scale, impl, kernel_axes)
  if kernel is not None:
    update = routing.plus_plain(u, kernel, update)
  return update, weights, index


def _layer(tokens, u, lora_b, top_k, **shares) -> cost.LayerShape:
  num_experts, rank, d_out = lora_b.shape
  layer = cost.LayerShape(tokens, u.shape[-1], d_out, num_experts, rank, top_k, jnp.dtype(u.dtype).name)
  return dataclasses.replace(layer, **shares)


def _route_tokens_stay(mesh, u, router, lora_a, lora_b, top_k, scale, score, impl, rows, kernel=None):
  lead, d_in = u.shape[:-1], u.shape[-1]
  tokens = math.prod(lead)
  tok = token_axes(mesh, tokens)
  name = routing.resolve_impl(impl, layer=_layer(tokens // _axes_size(mesh, tok), u, lora_b, top_k,
                                                 plain=kernel is not None))
  if rows is not None:  # each token carries its row's routing (a row's tokens are contiguous)
    rows = routing.RowRouting(*(jnp.repeat(x, tokens // x.shape[0], axis=0) for x in rows))

  def local(u, router, lora_a, lora_b, rows, kernel):
    update, weights, index = routing.route(u[:, None], router, lora_a, lora_b, top_k=top_k, scale=scale, score=score,
                                           impl=name, rows=rows, kernel=kernel)
    return update[:, 0], weights[:, 0], index[:, 0]

  split, whole = PartitionSpec(tok), PartitionSpec()
  update, weights, index = jax.shard_map(
      local, mesh=mesh, check_vma=False, out_specs=(split, split, split),
      in_specs=(split, jax.tree.map(lambda _: whole, router), whole, whole,
                None if rows is None else routing.RowRouting(split, split, split), None if kernel is None else whole),
  )(u.reshape(tokens, d_in), router, lora_a.astype(u.dtype), lora_b.astype(u.dtype), rows,
    None if kernel is None else kernel.astype(u.dtype))
  return update.reshape(*lead, -1), weights.reshape(*lead, top_k), index.reshape(*lead, top_k)


def _mix_experts_stay(mesh, u, lora_a, lora_b, weights, index, scale, impl, kernel_axes):
  lead, d_in, d_out = u.shape[:-1], u.shape[-1], lora_b.shape[-1]
  tokens, k = math.prod(lead), index.shape[-1]
  tok = _split_if_divides(mesh, DATA_AXIS, tokens)
  in_axes, out_axes = _model_axes(mesh, kernel_axes, d_in, d_out)
  layer = _layer(tokens // _axes_size(mesh, tok), u, lora_b, k,
                 experts=lora_b.shape[0] // mesh.shape[EXPERT_AXIS])  # one device's share
  mixer = routing.mixer(routing.resolve_impl(impl, layer=layer))
  reduce_axes = (EXPERT_AXIS,) + ((in_axes,) if isinstance(in_axes, str) else tuple(in_axes or ()))

  def local(u, lora_a, lora_b, weights, index):
    num_local = lora_a.shape[0]
    offset = index - jax.lax.axis_index(EXPERT_AXIS) * num_local
    mine = (offset >= 0) & (offset < num_local)
    y = mixer(u, lora_a, lora_b, jnp.where(mine, weights, 0), jnp.where(mine, offset, 0), scale)
    return jax.lax.psum(y, reduce_axes)

  out = jax.shard_map(
      local, mesh=mesh, out_specs=PartitionSpec(tok, out_axes), check_vma=False,
      in_specs=(PartitionSpec(tok, in_axes), PartitionSpec(EXPERT_AXIS, in_axes, None),
                PartitionSpec(EXPERT_AXIS, None, out_axes), PartitionSpec(tok, None), PartitionSpec(tok, None)),
  )(u.reshape(tokens, d_in), lora_a, lora_b, weights.reshape(tokens, k), index.reshape(tokens, k))
  return out.reshape(*lead, d_out)
