"""The linear layer that carries experts: a frozen kernel plus LoRA, gated LoRA, or routed LoRAs.

Every linear layer of the T5 (attention q, k, v, o and FFN wi_0, wi_1, wo) is an `ExpertDense`. Its
base kernel lives in the `params` collection at t5x's path (`.../query/kernel`), so a stock checkpoint
loads unchanged. Expert state lives in collections of its own beside it:

  lora     `lora_a` <f32>[d_in, r], `lora_b` <f32>[r, d_out]                   one expert (algorithm.md §2)
  gates    `gate` <f32>[d_in]                                                  its gate (algorithm.md §3)
  experts  `lora_a` [E, d_in, r], `lora_b` [E, r, d_out], `router` [E, d_in]   routed experts (algorithm.md §4)
           (`router` [E, d_in, r] for the SpectR score: each expert's spectral basis, algorithm.md §5;
           for per-row routing `router`, `arrow` [E, d_in] and `spectr` [E, d_in, r] side by side)

so "train only LoRA" / "train only gates" is a choice of collection. Two sown collections report what
happened: `activations` (each target layer's input `u`, for average-activation routers) and
`intermediates` (`route_index`, `route_weights`: the chosen experts, for routing statistics). Our `lora_a` is the paper's A
transposed and `lora_b` its B transposed: `B A u` is `(u @ lora_a) @ lora_b`.
"""
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from phatgoose_jax.experts import routing, sharded
from phatgoose_jax.experts.config import ExpertConfig

LORA_A_STDDEV = 0.01  # A ~ Normal(0, 0.01^2), B = 0 (algorithm.md §2)


def lora_a_init(key, shape, dtype=jnp.float32) -> jax.Array:
  """A = 0.01 z, z ~ Normal(0, 1): the same values drawn eagerly or inside a jitted initialisation (the barrier
  keeps XLA from folding 0.01 into the normal's own sqrt(2) factor, which moves values by an ulp)."""
  return jax.lax.optimization_barrier(jax.random.normal(key, shape, dtype)) * jnp.asarray(LORA_A_STDDEV, dtype)


def lora_update(u: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scale: float) -> jax.Array:
  """(B A u) * scale for one expert; `u` <float>[..., d_in]."""
  return (u @ lora_a.astype(u.dtype)) @ lora_b.astype(u.dtype) * scale


def autocast_merged_kernel(kernel, lora_a, lora_b, scale, dtype) -> jax.Array:
  """W + (B A) / r with each step rounded to `dtype`, as `LoRALinear` computes its kernel under torch.autocast
  (src/models/custom_modules/lora/lora_linear.py:23-29): B A a `dtype` matmul (float32 accumulation), the
  division by r = 1 / scale and the sum with the `dtype` W each rounded to `dtype`. Returns
  <dtype>[d_in, d_out] (our layout: (B A)^T = lora_a @ lora_b)."""
  update = (lora_a.astype(dtype) @ lora_b.astype(dtype)) / jnp.asarray(1 / scale, dtype)
  return kernel.astype(dtype) + update


def gate_value(u: jax.Array, gate: jax.Array) -> jax.Array:
  """sigmoid(v . u), the post-hoc gate of algorithm.md §3, in float32. Returns [..., 1]."""
  return jax.nn.sigmoid(jnp.einsum("...i,i->...", u.astype(jnp.float32), gate.astype(jnp.float32)))[..., None]


class ExpertDense(nn.Module):
  """y = u @ W plus the expert update selected by `experts.mode` (see ExpertConfig).

  Attributes:
    features: output width d_out.
    kernel_axes: logical names of W's (input, output) axes, e.g. ('embed', 'joined_kv').
    experts: where and how experts apply; this layer is a target when its name is in `experts.targets`.
    dtype: compute dtype; all variables are stored in float32.
    autocast: round as the official code does under bf16 torch.autocast over bf16 frozen parameters
      (`T5Config.autocast`, algorithm.md §2). 'lora' merges W + (B A) / r in the compute dtype and applies the
      merged kernel, as `LoRALinear` (src/models/custom_modules/lora/lora_linear.py:23-29); 'gated' multiplies
      the bf16 input by the float32 gate in float32 and rounds that product for the expert's first matmul
      (src/models/addons/moe.py:796-799, 842, 686-689); 'routed' mixes on the ragged path, whose bf16 steps are
      the official dispatch's (moe.py:686-711, `routing.mix_ragged`).
  """
  features: int
  kernel_axes: tuple[str, str]
  experts: ExpertConfig
  kernel_init: Any = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32
  autocast: bool = False

  def _expert_var(self, collection, name, init, shape, axes):
    boxed = nn.with_logical_partitioning(init, axes)
    return self.variable(collection, name, lambda: boxed(self.make_rng("params"), shape, jnp.float32)).value

  def _lora(self, collection, d_in, lead=(), lead_axes=()):
    r = self.experts.rank
    in_axis, out_axis = self.kernel_axes
    lora_a = self._expert_var(collection, "lora_a", lora_a_init,
                              (*lead, d_in, r), (*lead_axes, in_axis, "rank"))
    lora_b = self._expert_var(collection, "lora_b", nn.initializers.zeros, (*lead, r, self.features),
                              (*lead_axes, "rank", out_axis))
    return lora_a, lora_b

  @nn.compact
  def __call__(self, u: jax.Array, expert_weights: Optional[jax.Array] = None) -> jax.Array:
    """u: <float>[batch, length, d_in]; expert_weights: optional <float>[batch, E] fixed per-example mix, or
    for score 'per_row' the batch's `routing.RowRouting`."""
    d_in = u.shape[-1]
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                        (d_in, self.features), jnp.float32)
    u = u.astype(self.dtype)
    if not self.experts.applies_to(self.name):
      return u @ kernel.astype(self.dtype)
    self.sow("activations", "inputs", u)
    scale = self.experts.lora_scale
    mode = self.experts.mode
    if mode == "lora" and self.autocast:
      return u @ autocast_merged_kernel(kernel, *self._lora("lora", d_in), scale, self.dtype)
    if mode == "routed":
      return self._routed(u, kernel.astype(self.dtype), expert_weights, scale)
    y = u @ kernel.astype(self.dtype)
    lora = self._lora("lora", d_in)
    if mode == "lora":
      return y + lora_update(u, *lora, scale)
    gate = gate_value(u, self._expert_var("gates", "gate", nn.initializers.zeros, (d_in,), (self.kernel_axes[0],)))
    if self.autocast:
      return y + lora_update((u.astype(jnp.float32) * gate).astype(self.dtype), *lora, scale)
    return y + lora_update(u, *lora, scale) * gate.astype(self.dtype)

  def _router(self, d_in):
    """The `router` variable(s): [E, d_in], [E, d_in, r] for SpectR, all three for 'per_row' (by score)."""
    num, score, in_axis = self.experts.num_experts, self.experts.score, self.kernel_axes[0]

    def vector(name, spectral):
      basis = ((self.experts.rank,), ("rank",)) if spectral else ((), ())  # SpectR's V_e [d_in, r]
      return self._expert_var("experts", name, nn.initializers.zeros, (num, d_in, *basis[0]),
                              ("expert", in_axis, *basis[1]))
    if score == "per_row":
      return {s: vector(routing.ROW_VECTORS[s], s == "spectr") for s in routing.ROW_SCORES}
    return vector("router", score == "spectr")

  def _routed(self, u, kernel, expert_weights, scale):
    """The layer's output u W + its routed update (`routing.route`, which may form both in one kernel)."""
    num = self.experts.num_experts
    lora_a, lora_b = self._lora("experts", u.shape[-1], (num,), ("expert",))
    router = self._router(u.shape[-1])
    per_row = self.experts.score == "per_row"
    if expert_weights is not None and not per_row:
      weights = jnp.broadcast_to(expert_weights[:, None, :], (*u.shape[:-1], num))
      index = jnp.broadcast_to(jnp.arange(num), weights.shape)
      return routing.plus_plain(u, kernel, routing.mix_dense(u, lora_a, lora_b, weights, index, scale))
    if per_row and expert_weights is None:  # initialisation: every row the standardized score over every slot
      b = u.shape[0]
      expert_weights = routing.RowRouting(jnp.zeros(b, jnp.int32), jnp.ones((b, num), bool),
                                          jnp.full(b, self.experts.top_k, jnp.int32))
    route = routing.route
    if sharded.context_mesh() is not None:  # on a mesh: each device mixes its own tokens
      route = functools.partial(sharded.route, kernel_axes=self.kernel_axes)
    y, weights, index = route(u, router, lora_a, lora_b, top_k=self.experts.top_k, scale=scale,
                              score=self.experts.score, impl="ragged" if self.autocast else self.experts.impl,
                              rows=expert_weights if per_row else None, kernel=kernel)
    self.sow("intermediates", "route_index", index)
    self.sow("intermediates", "route_weights", weights)
    return y
