"""Expert parallelism for the routed layer: each device mixes only the experts it holds (algorithm.md §4).

With the stacked experts split over the 'expert' mesh axis into n shards of E/n experts, the routed update
of `routing.route` is a sum over shards of the same mix restricted to each shard's experts:

  y = sum_j w_j (B_{i_j} A_{i_j} u) scale = psum_s sum_{j : i_j in shard s} w_j (B_{i_j} A_{i_j} u) scale

so inside a `shard_map` each device runs the ordinary mixer (`routing.mixer`) on its E/n experts, the
(token, choice) pairs routed to other shards carrying weight 0, and one psum over 'expert' adds the shards
up. The routing choice (scores against all E router vectors, top-k) is made outside, on the whole router,
exactly as the unsharded layer makes it; tokens are replicated across the 'expert' axis inside the mix
(gathered when the batch is split over it) and split over 'data' when it divides them.

When the flax logical-axis rules are in context (`nn.logical_axis_rules`), the LoRA dimensions keep their
'model' split inside the mix: an output split over 'model' stays split, and an input split over 'model'
gives partial sums (`u A` is linear in `u`) that the same psum completes. Without rules they are gathered.
The layer takes this path when the context mesh (`jax.set_mesh`) has an 'expert' axis of size > 1.
"""
import dataclasses
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from phatgoose_jax.experts import routing

EXPERT_AXIS = "expert"
DATA_AXIS = "data"


def expert_mesh() -> Optional[jax.sharding.AbstractMesh]:
  """The context mesh when it splits experts (an 'expert' axis of size > 1), else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.shape.get(EXPERT_AXIS, 1) == 1:
    return None
  return mesh


def _axes_size(mesh, axes) -> int:
  if axes is None:
    return 1
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def _split_if_divides(mesh, axes, size: int):
  """`axes` when they are mesh axes whose size divides `size`, else None (replicated)."""
  if axes is None or any(a not in mesh.shape for a in ((axes,) if isinstance(axes, str) else axes)):
    return None
  return axes if size % _axes_size(mesh, axes) == 0 else None


def _model_axes(mesh, kernel_axes, d_in: int, d_out: int) -> tuple:
  """(mesh axes of d_in, of d_out) inside the mix: from the context rules, at most one of them split."""
  rules = nn.get_logical_axis_rules()
  if not rules or kernel_axes is None:
    return None, None
  in_axes, out_axes = nn.logical_to_mesh_axes(kernel_axes, rules)
  in_axes, out_axes = _split_if_divides(mesh, in_axes, d_in), _split_if_divides(mesh, out_axes, d_out)
  if EXPERT_AXIS in (in_axes, out_axes) or DATA_AXIS in (in_axes, out_axes):
    return None, None
  return (None, out_axes) if out_axes is not None else (in_axes, None)


def mix(u, lora_a, lora_b, weights, index, scale, *, impl="auto", kernel_axes=None):
  """The routed mix of `routing.mixer(impl)` with the experts split over the context mesh's 'expert' axis.

  Same arguments and result as the mixers; `kernel_axes` are the layer kernel's logical (input, output)
  names. Equal to the unsharded mix up to float summation order.
  """
  mesh = expert_mesh()
  if lora_a.shape[0] % mesh.shape[EXPERT_AXIS]:
    raise ValueError(f"{lora_a.shape[0]} experts cannot be split over an 'expert' mesh axis of size "
                     f"{mesh.shape[EXPERT_AXIS]}; choose an expert axis size that divides the expert count")
  lead, d_in, d_out = u.shape[:-1], u.shape[-1], lora_b.shape[-1]
  tokens = math.prod(lead)
  tok = _split_if_divides(mesh, DATA_AXIS, tokens)
  layer = dataclasses.replace(routing.layer_shape(u, lora_b, index), tokens=tokens // _axes_size(mesh, tok),
                              experts=lora_a.shape[0] // mesh.shape[EXPERT_AXIS])  # one device's share
  mixer = routing.mixer(routing.resolve_impl(impl, layer=layer))
  in_axes, out_axes = _model_axes(mesh, kernel_axes, d_in, d_out)
  reduce_axes = (EXPERT_AXIS,) + ((in_axes,) if isinstance(in_axes, str) else tuple(in_axes or ()))

  def local(u, lora_a, lora_b, weights, index):
    num_local = lora_a.shape[0]
    offset = index - jax.lax.axis_index(EXPERT_AXIS) * num_local
    mine = (offset >= 0) & (offset < num_local)
    y = mixer(u, lora_a, lora_b, jnp.where(mine, weights, 0), jnp.where(mine, offset, 0), scale)
    return jax.lax.psum(y, reduce_axes)

  k = index.shape[-1]
  out = jax.shard_map(
      local, mesh=mesh, out_specs=PartitionSpec(tok, out_axes), check_vma=False,
      in_specs=(PartitionSpec(tok, in_axes), PartitionSpec(EXPERT_AXIS, in_axes, None),
                PartitionSpec(EXPERT_AXIS, None, out_axes), PartitionSpec(tok, None), PartitionSpec(tok, None)),
  )(u.reshape(tokens, d_in), lora_a, lora_b, weights.reshape(tokens, k), index.reshape(tokens, k))
  return out.reshape(*lead, d_out)


def route(u, router, lora_a, lora_b, *, top_k, scale, score="standardized", impl="auto", kernel_axes=None):
  """`routing.route` with the experts split over the context mesh's 'expert' axis (see the module docstring).

  Returns (update <u.dtype>[..., d_out], weights [..., k], index [..., k]).
  """
  weights, index = routing.top_k_weights(routing.SCORES[score](u, router), top_k)
  return mix(u, lora_a, lora_b, weights, index, scale, impl=impl, kernel_axes=kernel_axes), weights, index
