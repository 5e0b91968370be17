"""Per-token routing among E LoRA experts (algorithm.md §4, §5): scores, top-k weights, and output mixing.

Each formula is written once here. Shapes: `u` <float>[..., d_in] token activations; `router`
<float>[E, d_in] one vector per expert; `lora_a` <float>[E, d_in, r]; `lora_b` <float>[E, r, d_out].

Six mixing implementations share one contract, `mix(u, lora_a, lora_b, weights, index, scale)`:
  * `mix_dense`  computes every expert and masks: the numerical reference, memory O(tokens E d_out);
  * `mix_gather` gathers the chosen experts' weights per token, memory O(tokens k d_in r);
  * `mix_ragged` groups token-expert pairs by expert and runs `jax.lax.ragged_dot` (grouped matmul,
    the accelerator path; a slow masked loop on CPU);
  * `mix_blocks` groups the pairs by expert into fixed-size blocks and runs batched matmuls over chunks
    of blocks (the CPU path; exact, no capacity, no dropped tokens);
  * `mix_grouped` runs the grouped-matmul Pallas TPU kernel that ships with jax (megablox `gmm`, its
    custom VJP with `tgmm`) on the pairs sorted by expert (interpreted off TPU);
  * `mix_fused` runs the blocks layout in one Pallas TPU kernel that gathers each block's token rows from HBM
    itself and keeps the hidden values in VMEM (`kernels`; interpreted off TPU).
All return `sum_{j<k} weights[..., j] * (B_{index_j} A_{index_j} u) * scale`: expert OUTPUTS are mixed,
never their parameters.
"""
import dataclasses
import functools
import itertools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

from phatgoose_jax import aot
from phatgoose_jax.experts import cost, kernels

STANDARDIZE_EPS = 1e-5
RENORM_EPS = 1e-6
ARROW_TEMPERATURE = 10.0


def moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean(x), 1 / sqrt(var(x) + 1e-5)) over the last axis in float32, kept as [..., 1].

  One pass over x: var(x) = mean(x^2) - mean(x)^2 (flax's LayerNorm `use_fast_variance`), so both sums share
  one read of the activation (XLA:TPU's cost analysis counts the two-pass variance at ~6x u's bytes, this at
  ~1x; for a [16384, 2048] u, 403 MB against 70 MB)."""
  x = x.astype(jnp.float32)
  mean, mean_square = jnp.mean(x, axis=-1, keepdims=True), jnp.mean(jnp.square(x), axis=-1, keepdims=True)
  return mean, jax.lax.rsqrt(jnp.maximum(mean_square - jnp.square(mean), 0.0) + STANDARDIZE_EPS)


def standardize(x: jax.Array) -> jax.Array:
  """LN(x) = (x - mean(x)) / sqrt(var(x) + 1e-5) over the last axis, no scale or bias (algorithm.md §4)."""
  mean, inv_std = moments(x)
  return (x.astype(jnp.float32) - mean) * inv_std


def phatgoose_scores(u: jax.Array, router: jax.Array) -> jax.Array:
  """s_e = LN(u) . LN(v_e) / sqrt(d_in)  (algorithm.md §4). Returns <float32>[..., E] (<bfloat16> for a bf16 u):
  `standardized_scores` of the router standardized once (`phatgoose_router`)."""
  return standardized_scores(u, *phatgoose_router(router, u.dtype))


def phatgoose_router(router: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """The router side of `phatgoose_scores` for activations of `dtype`, the same for every token:
  (LN(v_e) <[E, d_in]>, sum_i LN(v_e)_i <float32>[1, E]). For bfloat16, LN of the bf16 router in float32 rounded
  to bf16, as the official bf16 evaluation (src/models/addons/moe.py:406-420)."""
  if dtype == jnp.bfloat16:
    v = standardize(router.astype(jnp.bfloat16)).astype(jnp.bfloat16)
  else:
    v = standardize(router)
  return v, jnp.sum(v.astype(jnp.float32), axis=-1)[None, :]


def standardized_scores(u: jax.Array, v: jax.Array, v_sum: jax.Array) -> jax.Array:
  """s_e = LN(u) . v_e / sqrt(d_in) for the standardized router v = LN(router) and its sums v_sum
  (`phatgoose_router`); row-wise in u.

  In float32 without materialising LN(u): since LN(u) = (u - mean(u)) rsqrt(var(u) + 1e-5),
    s_e = (u . v_e - mean(u) sum_i v_ei) rsqrt(var(u) + 1e-5) / sqrt(d_in),
  one [tokens, E] matmul on the raw activation plus per-token mean and variance (sum_i v_ei is 0 up to
  rounding; it is kept so the identity is exact).

  For bfloat16 `u`, the official bf16 evaluation (torch.autocast over bf16 parameters,
  src/models/addons/moe.py:406-420): LN in float32 of the bf16 activation, the dot product with the bf16 v
  (float32 accumulation) rounded to bf16, then scaled by sqrt(1/d_in) in bf16. Returns <bfloat16>[..., E] then.
  """
  d_in = u.shape[-1]
  if u.dtype != jnp.bfloat16:
    mean, inv_std = moments(u)
    dots = jnp.einsum("...i,ei->...e", u.astype(jnp.float32), v) - mean * v_sum
    return dots * inv_std / math.sqrt(d_in)
  bf16 = jnp.bfloat16
  dots = jnp.einsum("...i,ei->...e", standardize(u).astype(bf16), v, preferred_element_type=jnp.float32).astype(bf16)
  return (dots.astype(jnp.float32) * math.sqrt(1 / d_in)).astype(bf16)


def arrow_scores(u: jax.Array, router: jax.Array) -> jax.Array:
  """s_e = |u . e_e| / (10 sqrt(d_in)) on the raw activation (algorithm.md §5, Arrow). Returns <float32>[..., E]."""
  d_in = u.shape[-1]
  dots = jnp.einsum("...i,ei->...e", u.astype(jnp.float32), router.astype(jnp.float32))
  return jnp.abs(dots) / (ARROW_TEMPERATURE * math.sqrt(d_in))


def spectr_scores(u: jax.Array, bases: jax.Array) -> jax.Array:
  """s_e = ||V_e^T u||_2 / (10 sqrt(d_in)) on the raw activation (algorithm.md §5, SpectR; routers/spectr.py).

  `bases` <float>[E, d_in, r]: each expert's r right singular vectors of its update. The top-k choice is
  SpectR's (any positive scale keeps the order); Arrow's temperature makes the softmax over the kept scores
  near-uniform (s_e <= ||u|| / (10 sqrt(d_in))), as the reference code's 1/k average of the chosen experts.
  Returns <float32>[..., E].
  """
  d_in = u.shape[-1]
  projections = jnp.einsum("...i,eir->...er", u.astype(jnp.float32), bases.astype(jnp.float32))
  return jnp.linalg.norm(projections, axis=-1) / (ARROW_TEMPERATURE * math.sqrt(d_in))


SCORES = {"standardized": phatgoose_scores, "arrow": arrow_scores, "spectr": spectr_scores}
# The scores `router_scores` makes tile by tile in a TPU kernel: (the router side, made once per layer; the
# row-wise rest, applied to each tile). Reductions over the router inside the kernel do not compile for every TPU
# generation (v4: "sublane gather not supported"), and would be repeated per tile.
ROWWISE_SCORES = {"standardized": (phatgoose_router, standardized_scores),
                  "arrow": (lambda router, dtype: (router,), arrow_scores)}
# The scores a served library routes by, per row (`RowRouting.scorer` indexes this tuple), and the name of each
# one's router variable in the `experts` collection (ExpertConfig.score 'per_row').
ROW_SCORES = ("standardized", "arrow", "spectr")
ROW_VECTORS = {"standardized": "router", "arrow": "arrow", "spectr": "spectr"}
MASKED_SCORE = -1e9


class RowRouting(NamedTuple):
  """Per-row routing of a served library (ExpertConfig.score 'per_row'): row i of the batch scores the experts
  by ROW_SCORES[scorer[i]] among those of mask[i] and keeps its top_k[i] (<= the config's top_k) best.

  scorer <int32>[b]; mask <bool>[b, E] (False: the expert is not offered to the row; a free slot of the
  library is False for every row); top_k <int32>[b]."""
  scorer: jax.Array
  mask: jax.Array
  top_k: jax.Array


def row_scores(u: jax.Array, vectors: dict, rows: RowRouting) -> jax.Array:
  """s <float32>[b, L, E]: each row's own score (`SCORES[ROW_SCORES[scorer]]`) of `u` <float>[b, L, d_in] against
  its router `vectors[score]`, MASKED_SCORE outside its mask (a softmax weight of exactly 0). A score no row
  asks for is not computed (`lax.cond`)."""
  out = jnp.zeros((*u.shape[:-1], rows.mask.shape[-1]), jnp.float32)
  for i, name in enumerate(ROW_SCORES):
    chosen = rows.scorer == i
    scores = jax.lax.cond(jnp.any(chosen), lambda v=vectors[name], f=SCORES[name]: f(u, v).astype(jnp.float32),
                          lambda: out)
    out = jnp.where(chosen[:, None, None], scores, out)
  return jnp.where(rows.mask[:, None, :], out, MASKED_SCORE)


def top_k_weights(scores: jax.Array, k: int, row_k: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """p = softmax(s); keep the top k; w = p_topk / (sum p_topk + 1e-6)  (algorithm.md §4).

  Returns (weights <float32>[..., k], index <int32>[..., k]). With `row_k` (broadcasting against [..., 1]), each
  row keeps its first row_k <= k of the top k (the rest weigh 0): the same weights as its own top-row_k. For
  bfloat16 `scores`, the official bf16 evaluation: the softmax in float32 rounded to bf16 before the top-k
  (src/models/addons/moe.py:480, :487), the renormalisation in float32 rounded to bf16 (moe.py:670-677: CUDA
  autocast runs `torch.sum` of the bf16 top-k in float32, torch/testing/_internal/autocast_test_lists.py, so
  the sum is not rounded to bf16 before the division); weights <bfloat16> then.
  """
  probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(scores.dtype)
  top_p, index = jax.lax.top_k(probs, k)
  top_p32 = top_p.astype(jnp.float32)
  if row_k is not None:
    top_p32 = jnp.where(jnp.arange(k) < row_k, top_p32, 0.0)
  return (top_p32 / (jnp.sum(top_p32, axis=-1, keepdims=True) + RENORM_EPS)).astype(scores.dtype), index


def dense_expert_weights(weights: jax.Array, index: jax.Array, num_experts: int) -> jax.Array:
  """Scatter top-k weights into a dense <float32>[..., E] weight per expert (zero for unchosen ones)."""
  return jnp.sum(jax.nn.one_hot(index, num_experts, dtype=weights.dtype) * weights[..., None], axis=-2)


def mix_dense(u, lora_a, lora_b, weights, index, scale):
  """Reference: y = sum_e g_e (B_e A_e u) scale over ALL experts, g_e zero outside the top-k."""
  gates = dense_expert_weights(weights, index, lora_a.shape[0]).astype(u.dtype)
  hidden = jnp.einsum("...i,eir->...er", u, lora_a.astype(u.dtype))
  outputs = jnp.einsum("...er,ero->...eo", hidden, lora_b.astype(u.dtype))
  return jnp.einsum("...eo,...e->...o", outputs, gates) * scale


def mix_gather(u, lora_a, lora_b, weights, index, scale):
  """Only the chosen experts: gather A_{index}, B_{index} per token, y = sum_j w_j B_j A_j u scale."""
  a_sel = jnp.take(lora_a.astype(u.dtype), index, axis=0)  # [..., k, d_in, r]
  b_sel = jnp.take(lora_b.astype(u.dtype), index, axis=0)  # [..., k, r, d_out]
  hidden = jnp.einsum("...i,...kir->...kr", u, a_sel)
  return jnp.einsum("...kr,...kro,...k->...o", hidden, b_sel, weights.astype(u.dtype)) * scale


def sort_by_expert(flat: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
  """(order, expert): the stable argsort of expert ids <int32>[P] and the ids in that order, from one sort of the
  unique keys e P + p, whose order is the stable order: p = key mod P, e = key div P (XLA:CPU sorts one int32
  array ~4x faster than a stable argsort; reading e off the keys spares a gather of P ids, which XLA:TPU's cost
  analysis counts at a memory tile per id, 152 MB for 32,768 ids). Keys past int32 (E P >= 2^31) fall back to
  the stable argsort."""
  pairs = flat.shape[0]
  if num_experts * pairs >= 2 ** 31:
    order = jnp.argsort(flat, stable=True)
    return order, flat[order]
  keys = jnp.sort(flat.astype(jnp.int32) * pairs + jnp.arange(pairs, dtype=jnp.int32))
  return keys % pairs, keys // pairs


def inverse_permutation(order: jax.Array) -> jax.Array:
  """position[order[i]] = i, by a scatter (XLA:TPU's cost analysis counts a scatter of P ids at a fraction of
  the gather `x[order]` of the same ids, so the paths below move values into sorted order by scatters)."""
  return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def take_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
  """x[rows] for x <[n, d]>, gathered as [n, d / 128, 128] when 128 divides d: each row then spans whole
  (8, 128) TPU memory tiles, where a [n, d] row gather reads a tile of 8-16 rows per row (in XLA:TPU's cost
  analysis, 2048-wide bf16 rows: 537 MB in place of 1477 MB for 32768 rows). The same values on any platform."""
  d = x.shape[-1]
  if not kernels.supports(d):
    return x[rows]
  return kernels.lane_rows(x)[rows].reshape(*rows.shape, d)


def mix_ragged(u, lora_a, lora_b, weights, index, scale):
  """Grouped matmul: sort (token, choice) pairs by expert, two `ragged_dot`s, scatter back weighted."""
  lead, d_in = u.shape[:-1], u.shape[-1]
  num_experts, k = lora_a.shape[0], index.shape[-1]
  tokens = u.reshape(-1, d_in)
  flat_expert = index.reshape(-1)
  order, _ = sort_by_expert(flat_expert, num_experts)
  token_of_pair = order // k
  group_sizes = jnp.bincount(flat_expert, length=num_experts).astype(jnp.int32)
  hidden = jax.lax.ragged_dot(take_rows(tokens, token_of_pair), lora_a.astype(u.dtype), group_sizes)
  outputs = jax.lax.ragged_dot(hidden, lora_b.astype(u.dtype), group_sizes)
  sorted_weight = place(weights.reshape(-1), inverse_permutation(order), order.shape[0], 0)
  outputs = outputs * sorted_weight[:, None].astype(u.dtype)
  mixed = jnp.zeros((tokens.shape[0], outputs.shape[-1]), u.dtype).at[token_of_pair].add(outputs)
  return mixed.reshape(*lead, -1) * scale


BLOCK_MIN, BLOCK_MAX = 8, 128
CHUNK_ROWS = 512


def block_size(pairs: int, num_experts: int, rank: int) -> int:
  """Rows per block: the power of two nearest below sqrt(pairs r / E), in [8, 128].

  Per block the path gathers one expert's A (d_in r values) and bs token rows (bs d_in), and pads each
  expert's group by < bs rows; traffic ~ d_in (pairs r / bs + E bs) is least at bs = sqrt(pairs r / E).
  """
  best = math.sqrt(pairs * rank / num_experts)
  return int(min(BLOCK_MAX, max(BLOCK_MIN, 2 ** math.floor(math.log2(max(best, 1.0))))))


def expert_blocks(index: jax.Array, num_experts: int, block: int):
  """Lay the (token, choice) pairs out sorted by expert, each expert's group padded to a multiple of `block`.

  With P = index.size pairs, at most min(E, P) groups are non-empty, so sum_e ceil(n_e / block) <=
  (P + min(E, P) (block - 1)) / block = `num_blocks`, a static bound. Returns (slot <int32>[P]: the slot of each
  flat pair, in [0, num_blocks * block); block_expert <int32>[num_blocks]). Pairs reach their slots by scatters
  (`place`); a slot no pair fills is padding.
  """
  flat = index.reshape(-1)
  pairs = flat.shape[0]
  num_blocks = (pairs + min(num_experts, pairs) * (block - 1)) // block
  order, expert = sort_by_expert(flat, num_experts)
  sizes = jnp.bincount(flat, length=num_experts)
  padded = (sizes + block - 1) // block * block
  shift = (jnp.cumsum(padded) - padded) - (jnp.cumsum(sizes) - sizes)  # an expert's padded start minus its start
  slot = jnp.zeros_like(order).at[order].set(jnp.arange(pairs, dtype=order.dtype) + per_expert(shift, expert))
  block_end = jnp.cumsum(padded // block)
  block_expert = jnp.minimum(jnp.searchsorted(block_end, jnp.arange(num_blocks), side="right",
                                              method="compare_all"), num_experts - 1)
  return slot.astype(jnp.int32), block_expert.astype(jnp.int32)


def per_expert(table: jax.Array, expert: jax.Array) -> jax.Array:
  """table[expert] for a per-expert table <[E]>, as a compare-and-sum over the E entries (XLA:TPU's cost analysis
  counts a gather from a table of more than 128 entries at a memory tile per id: 135 MB for 32,768 ids of 166
  experts, against 0.3 MB for this)."""
  return jnp.sum(jnp.where(expert[:, None] == jnp.arange(table.shape[0]), table, 0), axis=1).astype(table.dtype)


def place(values: jax.Array, slot: jax.Array, num_slots: int, fill) -> jax.Array:
  """<values.dtype>[num_slots]: values[p] at slot[p], `fill` in the slots no pair takes."""
  return jnp.full(num_slots, fill, values.dtype).at[slot].set(values)


def lora_of_blocks(x, lora_a, lora_b, token, weight, expert):
  """y[b, t] = ((x[token[b, t]] A_{expert[b]}) weight[b, t]) B_{expert[b]}: the LoRA outputs <[blocks, block, d_out]>
  of expert-sorted blocks (token <int32>[blocks, block], every entry a row of x; weight [blocks, block])."""
  hidden = jnp.einsum("bti,bir->btr", take_rows(x, token), lora_a[expert]) * weight[..., None].astype(x.dtype)
  return jnp.einsum("btr,bro->bto", hidden, lora_b[expert])


def mix_blocks(u, lora_a, lora_b, weights, index, scale, *, block=None, chunk_rows=CHUNK_ROWS):
  """Grouped matmul in plain JAX: pairs sorted by expert into fixed-size blocks (`expert_blocks`); a scan
  over chunks of `chunk_rows` rows gathers each chunk's token rows and its blocks' A and B, computes
  y = (w scale) (x A) B per block with two batched matmuls, and scatter-adds y into the token outputs.

  `block` defaults to `block_size`; `chunk_rows=None` is one chunk of every block (no loop). Padding
  slots carry weight 0 and are dropped by the scatter. Extra memory: the layout, O(tokens k), and one
  chunk, O(chunk_rows (d_in + d_out) + chunk blocks (d_in + d_out) r), whatever the token count.
  """
  lead, d_in = u.shape[:-1], u.shape[-1]
  num_experts, rank, d_out = lora_b.shape
  x = jnp.asarray(u).reshape(-1, d_in)
  tokens, k = x.shape[0], index.shape[-1]
  block = block or block_size(tokens * k, num_experts, rank)
  slot, block_expert = expert_blocks(index, num_experts, block)
  per_chunk = block_expert.shape[0] if chunk_rows is None else max(1, chunk_rows // block)
  block_expert = jnp.pad(block_expert, (0, -block_expert.shape[0] % per_chunk)).reshape(-1, per_chunk)
  slots = block_expert.size * block
  slot_token = place(jnp.arange(tokens * k, dtype=jnp.int32) // k, slot, slots, tokens).reshape(-1, per_chunk * block)
  pair_weight = place(jnp.ravel(weights).astype(x.dtype) * scale, slot, slots, 0).reshape(slot_token.shape)
  lora_a, lora_b = jnp.asarray(lora_a, x.dtype), jnp.asarray(lora_b, x.dtype)

  def chunk(out, args):
    token, weight, expert = args
    token = token.reshape(per_chunk, block)  # == tokens for padding: clamped, then dropped by the scatter
    outputs = lora_of_blocks(x, lora_a, lora_b, jnp.minimum(token, tokens - 1), weight.reshape(per_chunk, block),
                             expert)
    return out.at[token].add(outputs, mode="drop"), None

  out, _ = jax.lax.scan(chunk, jnp.zeros((tokens, d_out), x.dtype), (slot_token, pair_weight, block_expert))
  return out.reshape(*lead, d_out)


def mix_grouped(u, lora_a, lora_b, weights, index, scale, *, tile=128):
  """Grouped matmul with the megablox Pallas TPU kernel: pairs sorted by expert, their token rows x
  (padded to a multiple of `tile` rows), then per expert group e

    h = (x A_e) (w scale)   (float32 accumulation),   y = h B_e   (u's dtype, float32 accumulation),

  and y scatter-added into its token's output (XLA:TPU's cost analysis counts that scatter-add erratically with
  d_out, below its updates' bytes at 2048 and far above at 5120: see `kernels.combine`). Differentiable (megablox's
  custom VJP: `gmm` for the inputs, `tgmm` for the experts). Off TPU the kernel runs interpreted (exact,
  slow: for tests).
  """
  lead, d_in = u.shape[:-1], u.shape[-1]
  num_experts, rank, d_out = lora_b.shape
  x = jnp.asarray(u).reshape(-1, d_in)
  k = index.shape[-1]
  flat = index.reshape(-1)
  pairs = flat.shape[0]
  order, _ = sort_by_expert(flat, num_experts)
  sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  rows = -pairs % tile
  gmm = lambda lhs, rhs, out_type, tiling: megablox.gmm(  # noqa: E731
      lhs, rhs, sizes, out_type, tiling, None, None, False, not cost.targets_tpu())
  xs = jnp.pad(take_rows(x, order // k), ((0, rows), (0, 0)))
  hidden = gmm(xs, jnp.asarray(lora_a, x.dtype), jnp.float32, (tile, min(d_in, 512), rank))
  sorted_weight = place(jnp.ravel(weights).astype(jnp.float32) * scale, inverse_permutation(order), pairs, 0)
  pair_weight = jnp.pad(sorted_weight, (0, rows))
  hidden = (hidden * pair_weight[:, None]).astype(x.dtype)
  outputs = gmm(hidden, jnp.asarray(lora_b, x.dtype), x.dtype, (tile, rank, min(d_out, 512)))
  token = jnp.pad(order // k, (0, rows), constant_values=x.shape[0])  # padding rows: dropped
  mixed = jnp.zeros((x.shape[0], d_out), x.dtype).at[token].add(outputs, mode="drop")
  return mixed.reshape(*lead, d_out)


def _lora_of_blocks_kernel(x_lanes, lora_a, lora_b, token, expert, weight, pairs):
  """`lora_of_blocks` of `x_lanes` (`kernels.lane_rows`) by the Pallas TPU kernel (`kernels.lora_blocks`), a token
  of x.shape[0] marking a padding slot (no row read, weight 0); its gradient is `lora_of_blocks`'."""
  tokens = x_lanes.shape[0]

  def reference(x_lanes, lora_a, lora_b, token, expert, weight):
    token = jnp.minimum(token, tokens - 1)  # padding: weight 0, no gradient
    outputs = lora_of_blocks(x_lanes.reshape(tokens, -1), lora_a, lora_b, token, weight, expert)
    return outputs.reshape(*token.shape, -1, kernels.LANES)

  kernel = functools.partial(kernels.lora_blocks, pairs=pairs, interpret=not cost.targets_tpu())
  return kernels.with_reference_grad(kernel, reference)(x_lanes, lora_a, lora_b, token, expert, weight)


def mix_fused(u, lora_a, lora_b, weights, index, scale, *, block=None, lanes=None, kernel=None):
  """The blocks layout (`expert_blocks`) computed by one Pallas TPU kernel (`kernels.lora_blocks`): each block's
  token rows are DMA'd from HBM inside the kernel and y = ((x A_e) (w scale)) B_e is formed there (float32
  accumulation), so neither the gathered rows nor the hidden values pass through HBM; each token's k outputs are
  then summed by a second kernel that DMAs them (`kernels.combine`). With the plain layer's `kernel` W, that
  kernel also forms u W and returns the routed layer's output u W + update (one rounding), so neither the update
  nor u W makes a round trip through HBM. `block` defaults to `block_size` (at least 16 rows, a bf16 sublane
  tile), so a few tokens over many experts are not padded to 128 rows an expert. The kernel reads rows from
  `lanes`, u laid out by `kernels.lane_rows` (`route` has the scores kernel write it beside the scores; else it is
  relaid out here). Needs d_in and d_out multiples of 128 (`kernels.supports`). Differentiable (the gradient of
  `lora_of_blocks`, and of the matmul). Off TPU the kernels run interpreted (exact, slow: for tests)."""
  lead, d_in = u.shape[:-1], u.shape[-1]
  num_experts, k = lora_a.shape[0], index.shape[-1]
  x = jnp.asarray(u).reshape(-1, d_in)
  tokens = x.shape[0]
  block = block or max(16, block_size(tokens * k, num_experts, lora_a.shape[-1]))
  slot, block_expert = expert_blocks(index, num_experts, block)
  slots = block_expert.shape[0] * block
  token = place(jnp.arange(tokens * k, dtype=jnp.int32) // k, slot, slots, tokens).reshape(-1, block)
  weight = place(jnp.ravel(weights).astype(jnp.float32) * scale, slot, slots, 0).reshape(-1, block)
  outputs = _lora_of_blocks_kernel(kernels.lane_rows(x) if lanes is None else lanes, jnp.asarray(lora_a, x.dtype),
                                   jnp.asarray(lora_b, x.dtype), token, block_expert, weight, tokens * k)
  padded = -tokens % kernels.ROW_TILE  # tokens the combine adds up for nothing: dropped
  slot = jnp.pad(slot.reshape(tokens, k), ((0, padded), (0, 0))).reshape(-1)
  vmem = kernels.vmem_bytes(cost.target_device().device_kind)
  fits = kernel is not None and kernels.column_tile(d_in, kernel.shape[1], k, x.dtype.itemsize, vmem) is not None
  plain = (jnp.pad(x, ((0, padded), (0, 0))), jnp.asarray(kernel, x.dtype)) if fits else ()
  mixed = _combine(outputs.reshape(slots, *outputs.shape[2:]), slot, k, *plain, vmem=vmem)[:tokens]
  if kernel is not None and not fits:  # no column of W fits the chip's VMEM: XLA's u W beside the update
    mixed = plus_plain(x, kernel, mixed)
  return mixed.reshape(*lead, -1)


def plus_plain(u, kernel, update):
  """u W + update in u's dtype: the routed layer's output where its plain matmul is XLA's (not in a mixer's kernel,
  FUSES_PLAIN)."""
  return u @ jnp.asarray(kernel, u.dtype) + update.astype(u.dtype)


def _combine(y_lanes, slot, k, u=None, kernel=None, *, vmem):
  """kernels.combine (each token's k slot rows summed, plus u W where given); its gradient is that of the same
  gather-and-sum (and matmul)."""
  def reference(y_lanes, slot, *plain):
    rows = y_lanes.reshape(y_lanes.shape[0], -1)[slot].reshape(-1, k, math.prod(y_lanes.shape[1:]))
    total = jnp.sum(rows.astype(jnp.float32), axis=1)
    if plain:
      total = total + jnp.dot(plain[0], plain[1], preferred_element_type=jnp.float32)
    return total.astype(y_lanes.dtype)

  call = functools.partial(kernels.combine, k=k, vmem_bytes=vmem, interpret=not cost.targets_tpu())
  kernel_fn = (lambda y_lanes, slot, u, w: call(y_lanes, slot, u=u, kernel=w)) if kernel is not None else call
  return kernels.with_reference_grad(kernel_fn, reference)(y_lanes, slot, *(() if kernel is None else (u, kernel)))


def tile_blocks(index, weights, scale, tile: int, block: int, num_experts: int):
  """`expert_blocks` within each tile of `tile` tokens: (token <int32>[tiles, slots] each slot's token within its
  tile (0 for a padding slot), block_expert <int32>[tiles, blocks], weight <float32>[tiles, blocks, block] each
  slot's routing weight times `scale` (0 for padding)) for index, weights <[tokens, k]>."""
  k = index.shape[-1]
  slot, block_expert = jax.vmap(lambda ix: expert_blocks(ix, num_experts, block))(index.reshape(-1, tile, k))
  slots = block_expert.shape[1] * block
  token = jax.vmap(lambda s: place(jnp.arange(tile * k, dtype=jnp.int32) // k, s, slots, 0))(slot)
  weight = jax.vmap(lambda w, s: place(w, s, slots, 0.0))(weights.reshape(slot.shape).astype(jnp.float32) * scale,
                                                          slot)
  return token, block_expert, weight.reshape(*block_expert.shape, block)


class Tiling(NamedTuple):
  """How `kernels.routed_tiles` runs a layer: token tiles of `tile` in expert-sorted blocks of `block` slots,
  `columns` column groups, the experts' A streamed per tile (`stream`) or held whole, and the plain layer's u W
  formed in the kernel (`plain`) or by XLA beside it."""
  tile: int
  block: int
  columns: int
  stream: bool
  plain: bool


def tiling(layer: cost.LayerShape, device_kind: str) -> Optional[Tiling]:
  """The `Tiling` of `mix_tiles` for `layer` on a chip of `device_kind`: of the token tiles of
  `kernels.TOKEN_TILES` that divide the tokens (padded to whole 128s), the column groups that divide d_out in
  whole 128s, the experts' A held whole or streamed and (for a layer with its plain matmul) u W in the kernel or
  XLA's beside it, whose token and expert tables fit half the chip's SMEM (1 MiB on v4 and v5e: 16,384 tokens of
  128-token tiles with 166 experts need 1.4 MB) and whose step fits 5/8 of its VMEM (`kernels.tiles_bytes`; the
  rest for Mosaic's own temporaries and what XLA holds in VMEM around the kernel: in the routed XXL program a step
  estimated at 94 of v5e's 128 MiB did not compile, CompileTimeScopedVmemOom, though it did alone), the least
  roofline time of the kernel's cost (`kernels.tiles_cost`: a smaller tile pads more blocks, more groups read W
  once per tile, streaming reads A once per tile; plus XLA's u W and its sum with the kernel's output where it is
  beside it), then the least sum of its FLOP and byte times, A whole, the fewest groups and the largest tile; its
  pairs in blocks of `block_size` rows (at least 16, a bf16 sublane tile). None if none fits. A chip without known
  figures is taken as a v4 (`kernels.VMEM_BYTES`, `kernels.SMEM_BYTES`)."""
  kind = device_kind if device_kind in aot.CHIPS else "TPU v4"
  chip, vmem, smem = aot.CHIPS[kind], kernels.vmem_bytes(kind), kernels.smem_bytes(kind)
  itemsize = jnp.dtype(layer.dtype).itemsize
  tokens, lanes = -(-layer.tokens // kernels.ROW_TILE) * kernels.ROW_TILE, layer.d_out // kernels.LANES
  sizes = (layer.d_in, layer.d_out, layer.experts, layer.rank)
  beside = (2 * tokens * layer.d_in * layer.d_out,  # XLA's u W + the kernel's output: u, W and the output read,
            itemsize * (tokens * layer.d_in + layer.d_in * layer.d_out + 2 * tokens * layer.d_out))  # the sum written
  fits = {}
  for plain, tile, stream in itertools.product(sorted({layer.plain, False}, reverse=True),
                                               (t for t in kernels.TOKEN_TILES if tokens % t == 0), (False, True)):
    block = max(16, block_size(tile * layer.k, layer.experts, layer.rank))
    slots = tokens // tile * kernels.tile_block_count(tile, layer.k, layer.experts, block) * block
    if 4 * (slots + slots // block) > smem // 2:  # the token and expert tables, scalar-prefetched into SMEM
      continue
    for columns in (c for c in range(1, lanes + 1) if lanes % c == 0):
      if kernels.tiles_bytes(tile, tokens, *sizes, layer.k, block, itemsize, plain, columns, stream) <= vmem * 5 // 8:
        flops, nbytes = kernels.tiles_cost(tokens, tile, *sizes, block, slots, itemsize, plain, columns, stream)
        if layer.plain and not plain:
          flops, nbytes = flops + beside[0], nbytes + beside[1]
        fits[Tiling(tile, block, columns, stream, plain)] = (
            cost.roofline_seconds(flops, nbytes, kind), flops / chip.peak_flops + nbytes / chip.bandwidth, stream,
            columns, -tile)
        break  # more groups of the same tile cost more
  return min(fits, key=fits.get, default=None)


def mix_tiles(u, lora_a, lora_b, weights, index, scale, *, lanes=None, kernel=None):
  """The routed layer one token tile at a time in one Pallas TPU kernel (`kernels.routed_tiles`): each tile's pairs
  sorted by expert into blocks (`tile_blocks`), each block's rows gathered from the tile in VMEM, its outputs
  y = ((x A_e) (w scale)) B_e added into their tokens' rows there; with the plain layer's `kernel` W the tile's
  u W too, so the kernel returns the layer's output u W + update (float32 accumulation, one rounding). Each token
  row is read from HBM once and each output row written once; the experts' A are held whole in VMEM or streamed
  per tile, their B and W a group of columns at a time (`tiling`, which also takes XLA's u W beside the kernel
  where that costs less or no columns of W fit; a ValueError where no step fits). Reads the rows from `lanes`
  (`kernels.lane_rows` of u, as the scores kernel writes it), else relays u. Needs d_in and d_out
  multiples of 128. Differentiable (the gradient of the same formula in plain JAX). Off TPU the kernel runs
  interpreted (exact, slow: for tests)."""
  lead, d_in = u.shape[:-1], u.shape[-1]
  num_experts, rank, d_out = lora_b.shape
  x = jnp.asarray(u).reshape(-1, d_in)
  tokens, k = x.shape[0], index.shape[-1]
  padded = -tokens % kernels.ROW_TILE  # rows routed with weight 0 and dropped
  x_lanes = kernels.lane_rows(x) if lanes is None else lanes
  if padded:
    x_lanes = jnp.pad(x_lanes, ((0, padded), (0, 0), (0, 0)))
    index, weights = (jnp.pad(a.reshape(tokens, k), ((0, padded), (0, 0))) for a in (index, weights))
  kind = cost.target_device().device_kind
  vmem = kernels.vmem_bytes(kind)
  shape = cost.LayerShape(tokens + padded, d_in, d_out, num_experts, rank, k, x.dtype.name, kernel is not None)
  fit = tiling(shape, kind)
  if fit is None:
    raise ValueError(f"no token tile of a [{d_in}, {d_out}] layer with {num_experts} experts fits {vmem} bytes of "
                     f"VMEM with its tables in half of {kernels.smem_bytes(kind)} bytes of SMEM")
  tile, block, columns, stream, plain = fit
  layout = tile_blocks(index, weights, scale, tile, block, num_experts)
  args = (x_lanes, jnp.asarray(lora_a, x.dtype), jnp.asarray(lora_b, x.dtype), *layout,
          *((jnp.asarray(kernel, x.dtype),) if plain else ()))

  def reference(x_lanes, lora_a, lora_b, token, block_expert, weight, *plain):
    rows = x_lanes.reshape(x_lanes.shape[0], -1)
    token = token + tile * jnp.arange(token.shape[0], dtype=token.dtype)[:, None]
    outputs = lora_of_blocks(rows, lora_a, lora_b, token.reshape(-1, weight.shape[-1]),
                             weight.reshape(-1, weight.shape[-1]), block_expert.reshape(-1))
    total = jnp.zeros((rows.shape[0], d_out), jnp.float32).at[token.reshape(-1)].add(
        outputs.reshape(-1, d_out).astype(jnp.float32))
    if plain:
      total = total + jnp.dot(rows, plain[0], preferred_element_type=jnp.float32)
    return total.astype(rows.dtype)

  def call(x_lanes, lora_a, lora_b, token, block_expert, weight, *plain):
    return kernels.routed_tiles(x_lanes, lora_a, lora_b, token, block_expert, weight,
                                kernel=plain[0] if plain else None, columns=columns, stream=stream, vmem_bytes=vmem,
                                interpret=not cost.targets_tpu())

  mixed = kernels.with_reference_grad(call, reference)(*args)[:tokens]
  if kernel is not None and not plain:
    mixed = plus_plain(x, kernel, mixed)
  return mixed.reshape(*lead, d_out)


MIXERS = {"dense": mix_dense, "gather": mix_gather, "ragged": mix_ragged, "blocks": mix_blocks,
          "grouped": mix_grouped, "fused": mix_fused, "tiles": mix_tiles}
# Variants: the blocks path in one chunk (a loop's cost is counted once, see cost.py) with MXU-sized 128 and 256
# row blocks (costed for GPU targets); the grouped matmul's 256-row tiles (named only, benchmarks/README.md).
VARIANTS = {"blocks@128": functools.partial(mix_blocks, block=128, chunk_rows=None),
            "blocks@256": functools.partial(mix_blocks, block=256, chunk_rows=None),
            "grouped@256": functools.partial(mix_grouped, tile=256)}
TAKES_LANES = ("fused", "tiles")  # mixers that read u laid out by `kernels.lane_rows` (`lanes`)
FUSES_PLAIN = ("fused", "tiles")  # mixers that form the plain layer's u W in their own kernel (`kernel`)
GATHER_MAX_PAIRS = 64
DENSE_MAX_BYTES = 2 ** 30


def candidates(layer: cost.LayerShape, platform: str, device_kind: str = "") -> dict:
  """The exact paths `auto` compares for `layer`: on a TPU (of `device_kind`, for its VMEM) where the kernels take
  the widths, the tiles kernel where its experts fit the chip's VMEM (`tiling`), and the fused kernels where the
  experts do not fit in one group of columns; else ragged and grouped; on a GPU ragged and the blocks variants; on both
  dense while its [tokens, E, d_out] intermediate is at most DENSE_MAX_BYTES (few experts or few tokens) and gather
  for a decoding step's few pairs (at most GATHER_MAX_PAIRS). Each candidate is one lowering per layer shape, so
  a TPU compile lowers no path that never won there (benchmarks/README.md, XL widths, E = 36 and 166): on v5e
  tiles was the least at 128 and 1024 tokens (a chip's share in the routed T5-XL) and at 16,384 tokens at
  2048 -> 2048 (1.06 / 1.13 of the plain layer against fused's 1.40 / 1.59), and within 0.05 of fused at 16,384
  tokens of the 5120-wide layers (its blocks are padded per tile); on v4, where the experts alone need several
  groups at every XL width, fused won at 16,384 tokens of the 5120-wide layers by 0.01-0.03 and at 2048 -> 2048
  with E=166 (1.37 against 2.51: streamed A and W read per 512-token tile), tiles at 2048 -> 2048 with E=36 (1.12
  against 1.28); the blocks variants and grouped@256 never."""
  if platform == "tpu" and kernels.supports(layer.d_in) and kernels.supports(layer.d_out):
    alone = tiling(dataclasses.replace(layer, plain=False), device_kind)
    names = ["tiles"] * (alone is not None) + ["fused"] * (alone is None or alone.columns > 1)
  elif platform == "tpu":
    names = ["ragged", "grouped"]
  else:
    names = ["ragged", "blocks@128", "blocks@256"]
  dense_bytes = layer.tokens * layer.experts * layer.d_out * jnp.dtype(layer.dtype).itemsize
  names += ["dense"] * (dense_bytes <= DENSE_MAX_BYTES) + ["gather"] * (layer.pairs <= GATHER_MAX_PAIRS)
  return {name: Candidate(name, layer.k) for name in names}


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One path's routed layer, `route(u, router, lora_a, lora_b, kernel=kernel)` with impl `name` (scale 1): the
  update, or with the plain layer's kernel the layer's output; what `auto` costs (`cost.compiled_cost`)."""
  name: str
  top_k: int

  def __call__(self, u, router, lora_a, lora_b, kernel=None):
    return route(u, router, lora_a, lora_b, top_k=self.top_k, scale=1.0, impl=self.name, kernel=kernel)[0]


def mixer(name: str):
  """The mixer of an implementation or variant name (a key of MIXERS or VARIANTS)."""
  return {**MIXERS, **VARIANTS}[name]


def resolve_impl(impl: str, pairs: Optional[int] = None, layer: Optional[cost.LayerShape] = None,
                 device=None) -> str:
  """'auto' -> the exact path for the target device (default `cost.target_device()`); other names are themselves.

  TPU and GPU: the least roofline time of `candidates(layer)` by the compiler's cost analysis
  (`cost.cheapest`: one lowering per candidate, cached per platform, device kind and layer shape).

  CPU, from measurements (`pairs` = tokens x k, or `layer`'s): 'gather' up to GATHER_MAX_PAIRS pairs (a
  decoding step routes batch x k rows per layer; there the blocks path's fixed cost, a sort, a scatter and a
  scan per layer, dominates and the gather path's tokens k d_in r intermediate is at most 64 d_in r floats),
  'blocks' above. Measured on a 2-core CPU, float32, r=16, k=2, one routed T5-base layer, routed / plain-layer
  time (benchmarks/routed_layer.py --tokens N --shapes 768x768,768x3072, load 4-8), blocks vs gather:
    8 tokens (16 pairs):   E=36 12.8 / 1.8 and 2.8 / 1.3;  E=166 3.8 / 2.0 and 2.9 / 1.7;
    32 tokens (64 pairs):  E=36  2.4 / 2.0 and 1.7 / 2.1;  E=166 2.6 / 1.5 and 2.0 / 2.1;
    128 tokens (256 pairs): E=36 1.9 / 3.4 and 1.4 / 5.3; E=166 3.1 / 2.5 and 3.2 / 7.6;
  and at 2048 tokens (T5-XL layers) blocks 1.3-1.5, gather 5.2, dense 7.4 (benchmarks/README.md).
  Unknown `pairs`: the large-batch choice. The dense reference is chosen only where it is costed cheapest.
  """
  if impl != "auto":
    return impl
  device = device or cost.target_device()
  if device.platform == "cpu":
    pairs = layer.pairs if layer is not None else pairs
    return "gather" if pairs is not None and pairs <= GATHER_MAX_PAIRS else "blocks"
  if layer is None:
    raise ValueError(f"choosing a routing implementation for {device.device_kind} needs the layer's shape")
  return cost.cheapest(candidates(layer, device.platform, device.device_kind), layer, device)


def layer_shape(u, lora_b, top_k: int, plain: bool = False) -> cost.LayerShape:
  """The `cost.LayerShape` of a routed layer's activations `u` and experts' `lora_b` (`plain`: with its plain
  matmul)."""
  num_experts, rank, d_out = lora_b.shape
  return cost.LayerShape(math.prod(u.shape[:-1]), u.shape[-1], d_out, num_experts, rank, top_k,
                         jnp.dtype(u.dtype).name, plain)


def choose(u, router, *, top_k, score="standardized", rows=None, lanes=False):
  """The routing choice of one linear layer: scores -> top-k. Returns (weights [..., k], index [..., k], u_lanes):
  u_lanes is `kernels.lane_rows(u)` where `lanes` asks for it and the scores kernel wrote it (`router_scores`),
  else None.

  With score 'per_row', `router` is `{score: vectors}` over ROW_SCORES and `rows` the batch's `RowRouting`
  (`row_scores`, each row's own top-k)."""
  if score == "per_row":
    return (*top_k_weights(row_scores(u, router, rows), top_k, rows.top_k[:, None, None]), None)
  scores, u_lanes = router_scores(u, router, score, lanes)
  return (*top_k_weights(scores, top_k), u_lanes)


def router_scores(u, router, score: str, lanes: bool = False):
  """(SCORES[score](u, router), u_lanes). For a TPU target the scores are made in one read of u where the tokens
  fill whole tiles and the score is in ROWWISE_SCORES (SpectR's [tile, E, r] projections exceed a kernel's VMEM):
  the router side once, then `kernels.rowwise` applies the row-wise rest to each tile of tokens; with `lanes` that
  kernel also writes u_lanes = `kernels.lane_rows(u)` (the fused path's rows). Otherwise u_lanes is None."""
  lead, d_in = u.shape[:-1], u.shape[-1]
  if not cost.targets_tpu() or score not in ROWWISE_SCORES or not kernels.rowwise_supports(math.prod(lead)):
    return SCORES[score](u, router), None
  prepare, per_token = ROWWISE_SCORES[score]
  out = kernels.rowwise(per_token, u.reshape(-1, d_in), *prepare(router, u.dtype), lanes=lanes)
  scores, u_lanes = out if lanes else (out, None)
  return scores.reshape(*lead, -1), u_lanes


def route(u, router, lora_a, lora_b, *, top_k, scale, score="standardized", impl="auto", rows=None, kernel=None):
  """The routed LoRA update of one linear layer: `choose`, then the chosen experts' outputs mixed. A mixer of
  TAKES_LANES reads the token rows the scores kernel wrote (`choose` with `lanes`). With the plain layer's
  `kernel` W <[d_in, d_out]>, the first result is the layer's output u W + update (u's dtype): a mixer of
  FUSES_PLAIN forms it in its own kernel, else it is XLA's u W plus the update.

  Returns (update <u.dtype>[..., d_out] (or u W + update), weights [..., k], index [..., k]).
  """
  plain = kernel is not None
  name = resolve_impl(impl, layer=layer_shape(u, lora_b, top_k, plain))
  lanes = name in TAKES_LANES
  weights, index, u_lanes = choose(u, router, top_k=top_k, score=score, rows=rows, lanes=lanes)
  mix = functools.partial(mixer(name), lanes=u_lanes) if lanes else mixer(name)
  if plain and name in FUSES_PLAIN:
    return mix(u, lora_a, lora_b, weights, index, scale, kernel=kernel), weights, index
  update = mix(u, lora_a, lora_b, weights, index, scale)
  if plain:
    update = plus_plain(u, kernel, update)
  return update, weights, index
