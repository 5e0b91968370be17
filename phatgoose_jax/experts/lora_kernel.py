"""The LoRA outputs of expert-sorted blocks in one Pallas TPU kernel that gathers its token rows itself.

For block b of `block` slots, all routed to expert e = block_expert[b] (`routing.expert_blocks`' layout):

  rows = x[token of each slot]     DMA'd row by row from HBM into VMEM, the next block's rows while this one computes
  h = (rows A_e) w                 float32 accumulation, w the slot's routing weight times the LoRA scale
  y = h B_e                        float32 accumulation, rounded to x's dtype

The gathered rows are read from HBM once and never written back, h never leaves VMEM, and A_e, B_e are fetched
per block (not again while consecutive blocks share an expert). Against a row gather followed by two grouped
matmuls (`routing.mix_grouped`), the gathered [slots, d_in] rows and the [slots, r] hidden values make no round
trip through HBM. The kernel's cost estimate, which XLA's cost analysis reports for it, counts what it moves:
each pair's row (a padding slot reads none), each slot's output, token and weight, and one A and B per run of
blocks of one expert (the blocks are sorted by expert, so at most min(blocks, E) runs).

Forward only: the gradient is that of the same formula in plain JAX (`routing.lora_of_blocks`), so training
through it is exact. Off TPU the kernel runs interpreted (exact, slow: for tests).
"""
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def _kernel(slot_token, block_expert, x_hbm, a_ref, b_ref, w_ref, out_ref, rows, sems):
  """One block: wait for its rows (started by the previous step, or now for the first), start the next block's,
  then y = ((rows A_e) w) B_e. The grid runs in order ('arbitrary'), so the prefetch crosses steps. A padding
  slot (token = tokens) reads no row: its row is zeroed, and its weight is 0."""
  del block_expert  # read by the A and B index maps
  step, steps = pl.program_id(0), pl.num_programs(0)
  block, tokens = rows.shape[1], x_hbm.shape[0]

  def fetch(b, buffer, start):
    for j in range(block):
      token = slot_token[b * block + j]
      copy = pltpu.make_async_copy(x_hbm.at[jnp.minimum(token, tokens - 1)], rows.at[buffer, j], sems.at[buffer])
      if not start:
        pl.when(token < tokens)(copy.wait)
        continue
      pl.when(token < tokens)(copy.start)

      @pl.when(token >= tokens)
      def _(j=j):
        rows[buffer, j] = jnp.zeros(rows.shape[2:], rows.dtype)

  pl.when(step == 0)(lambda: fetch(0, 0, start=True))
  pl.when(step + 1 < steps)(lambda: fetch(step + 1, (step + 1) % 2, start=True))
  fetch(step, step % 2, start=False)
  buffer = step % 2
  hidden = sum(jnp.dot(rows[buffer, :, c, :], a_ref[c], preferred_element_type=jnp.float32)
               for c in range(rows.shape[2]))
  # The [1, block] weights as a [block, 1] column: the diagonal matrix diag(w) summed over its rows (exact).
  diagonal = jax.lax.broadcasted_iota(jnp.int32, (block, block), 0) == jax.lax.broadcasted_iota(
      jnp.int32, (block, block), 1)
  weight = jnp.sum(jnp.where(diagonal, jnp.broadcast_to(w_ref[...], (block, block)), 0.0), axis=1, keepdims=True)
  out_ref[...] = jnp.dot((hidden * weight).astype(b_ref.dtype), b_ref[...],
                         preferred_element_type=jnp.float32).astype(out_ref.dtype)


LANES = 128


def supports(d_in: int) -> bool:
  """Whether the kernel takes rows of width d_in: each row is DMA'd as whole [d_in / 128, 128] lane rows."""
  return d_in % LANES == 0


def lora_blocks(x, lora_a, lora_b, token, block_expert, weight, *, pairs, interpret=False):
  """y <x.dtype>[blocks, block, d_out]: slot (b, t)'s LoRA output ((x[token[b, t]] A_e) weight[b, t]) B_e, with
  e = block_expert[b].

  x <[tokens, d_in]>, d_in a multiple of 128; lora_a <[E, d_in, r]>, lora_b <[E, r, d_out]> in x's dtype;
  token <int32>[blocks, block], `tokens` for a padding slot (its weight must be 0); block_expert <int32>[blocks];
  weight <float32>[blocks, block]; `pairs` the number of slots that are not padding. Each row is laid out as [d_in / 128, 128] (a row of the tiled [tokens, d_in]
  layout is not a DMA-able unit: XLA relays x out once for the call), and A alike.
  """
  (tokens, d_in), (num_experts, rank, d_out) = x.shape, lora_b.shape
  if not supports(d_in):
    raise ValueError(f"lora_blocks needs a row width that {LANES} divides, got {d_in}")
  num_blocks, block = token.shape
  slots, lanes, itemsize = num_blocks * block, d_in // LANES, jnp.dtype(x.dtype).itemsize
  cost = pl.CostEstimate(flops=2 * slots * rank * (d_in + d_out), transcendentals=0,
                         bytes_accessed=(pairs * d_in + slots * d_out) * itemsize + slots * 8
                         + min(num_blocks, num_experts) * rank * (d_in + d_out) * itemsize)
  per_block = lambda b, token, expert: (b, 0, 0)  # noqa: E731
  per_expert = lambda b, token, expert: (expert[b], 0, 0)  # noqa: E731
  call = pl.pallas_call(
      _kernel,
      out_shape=jax.ShapeDtypeStruct((num_blocks, block, d_out), x.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(num_blocks,),
          in_specs=[pl.BlockSpec(memory_space=pl.ANY),
                    pl.BlockSpec((None, lanes, LANES, rank), lambda b, token, expert: (expert[b], 0, 0, 0)),
                    pl.BlockSpec((None, rank, d_out), per_expert),
                    pl.BlockSpec((None, 1, block), per_block)],
          out_specs=pl.BlockSpec((None, block, d_out), per_block),
          scratch_shapes=[pltpu.VMEM((2, block, lanes, LANES), x.dtype), pltpu.SemaphoreType.DMA((2,))]),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
      interpret=interpret,
      cost_estimate=cost,
  )
  return call(token.reshape(-1), block_expert, x.reshape(tokens, lanes, LANES),
              lora_a.reshape(num_experts, lanes, LANES, rank), lora_b, weight[:, None, :])
