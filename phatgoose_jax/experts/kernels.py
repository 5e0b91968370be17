"""The routed layer's Pallas TPU kernels: the router scores in one read of the activations (`rowwise`), the
LoRA outputs of expert-sorted blocks with their token rows gathered inside the kernel (`lora_blocks`), and each
token's k outputs summed (`combine`); or, in place of the last two, the whole routed layer one token tile at a
time in VMEM (`routed_tiles`).

`rowwise(fn, u, *operands)` applies a function of a tile of token rows, fn(u[rows], *operands), to every tile,
each tile of u read from HBM once. XLA:TPU's cost analysis counts the standardised router scores of a
[16384, 5120] bf16 activation (one-pass moments, standardisation, the dot with E router vectors) at ~2.1x u's
bytes, having fused them only in part; applied row-wise by this kernel, the same function costs one read of u.

`lora_blocks`: for block b of `block` slots, all routed to expert e = block_expert[b] (`routing.expert_blocks`'
layout):

  rows = x[token of each slot]     DMA'd row by row from HBM into VMEM, the next block's rows while this one computes
  h = (rows A_e) w                 float32 accumulation, w the slot's routing weight times the LoRA scale
  y = h B_e                        float32 accumulation, rounded to x's dtype

The gathered rows are read from HBM once and never written back, h never leaves VMEM, and A_e, B_e are fetched
per block (not again while consecutive blocks share an expert). Against a row gather followed by two grouped
matmuls (`routing.mix_grouped`), the gathered [slots, d_in] rows and the [slots, r] hidden values make no round
trip through HBM. The kernel's cost estimate, which XLA's cost analysis reports for it, counts what it moves:
each pair's row (a padding slot reads none), each slot's output, token and weight, and one A and B per run of
blocks of one expert (the blocks are sorted by expert, so at most min(blocks, E) runs). A is read as [r, d_in]
(lane-dense; as [d_in, r] TPU memory pads its r lanes to 128).

`combine`: out[t] = the sum of token t's k slot outputs, their rows DMA'd from `lora_blocks`' output, plus u[t] W
where the layer's plain matmul is given (the routed layer's whole output from one kernel).

Forward only: the gradients are those of the same formulas in plain JAX (`routing.lora_of_blocks`, and `fn`
itself, and a gather-and-sum for `combine`: `with_reference_grad`), so training through them is exact. Off TPU
the kernels run interpreted (exact, slow: for tests).
"""
import contextlib
import contextvars
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax._src.pallas.mosaic import tpu_info


ROW_TILE = 128
LANES = 128
SPLIT_LANES = 8
VMEM_BYTES = 16 << 20  # a TensorCore's VMEM where the chip is not known: v4's
SMEM_BYTES = 1 << 20  # and its SMEM: v4's


_STAND_INS = contextvars.ContextVar("stand_ins", default=False)


@contextlib.contextmanager
def stand_ins():
  """Kernels traced in this context have an empty body: the same call (grid, blocks, scratch, cost estimate), so
  the same figures in XLA's cost analysis, which reads a Pallas call's `CostEstimate` and not its body, at a
  fraction of Mosaic's compile time (`cost.compiled_cost` costs candidates with them)."""
  token = _STAND_INS.set(True)
  try:
    yield
  finally:
    _STAND_INS.reset(token)


def body(kernel):
  """`kernel`, or an empty stand-in for it inside `stand_ins()`."""
  return (lambda *refs: None) if _STAND_INS.get() else kernel


def supports(d_in: int) -> bool:
  """Whether `lora_blocks` takes rows of width d_in: each row is DMA'd as whole [d_in / 128, 128] lane rows."""
  return d_in % LANES == 0


def rowwise_supports(tokens: int) -> bool:
  """Whether `rowwise` takes `tokens` rows: whole tiles of ROW_TILE rows."""
  return tokens % ROW_TILE == 0


def vmem_bytes(device_kind: str) -> int:
  """A TensorCore's VMEM on a chip of `device_kind` (16 MiB on v4, 128 MiB on v5e), VMEM_BYTES for a chip Pallas
  does not know (or not a TPU)."""
  version = tpu_info.chip_version_from_device_kind(device_kind)
  return VMEM_BYTES if version is None else tpu_info.get_tpu_info_for_chip(version, 1).vmem_capacity_bytes


def smem_bytes(device_kind: str) -> int:
  """A TensorCore's SMEM on a chip of `device_kind` (1 MiB on v4 and v5e), SMEM_BYTES for a chip Pallas does not
  know: where a kernel's scalar-prefetched operands (token and expert tables) live."""
  version = tpu_info.chip_version_from_device_kind(device_kind)
  return SMEM_BYTES if version is None else tpu_info.get_tpu_info_for_chip(version, 1).smem_capacity_bytes


def lane_rows(x: jax.Array) -> jax.Array:
  """x <[tokens, d]> as <[tokens, d / 128, 128]>: the layout `lora_blocks` DMAs whole rows from (a row of the tiled
  [tokens, d] layout shares its memory tiles with 7-15 other rows and is not a DMA-able unit). In XLA a relayout:
  one read and one write of x."""
  if not supports(x.shape[-1]):
    raise ValueError(f"the routed LoRA kernel needs a row width that {LANES} divides, got {x.shape[-1]}")
  return x.reshape(x.shape[0], x.shape[1] // LANES, LANES)


def in_hbm(*arrays, interpret: bool) -> tuple:
  """The arrays a kernel reads through its own pipeline (or DMAs), constrained to HBM in a TPU program (not
  `interpret`): XLA for a v4 otherwise stages such operands through the chip's CMEM before the kernel (copies its
  cost analysis counts: 50 of the 87 MB of a routed 1024-token 2048 -> 2048 layer), which the kernel's own
  pipelining makes redundant."""
  return arrays if interpret else tuple(pltpu.with_memory_space_constraint(x, pltpu.HBM) for x in arrays)


def with_reference_grad(kernel, reference):
  """kernel(*args), differentiated as reference(*args): the same values by plain JAX ops (the kernels here are
  forward only, so training through them takes the exact gradient of the formula they compute)."""
  call = jax.custom_vjp(kernel)
  call.defvjp(lambda *args: (kernel(*args), args), lambda args, cotangent: jax.vjp(reference, *args)[1](cotangent))
  return call


def rowwise(fn, u, *operands, lanes=False, interpret=False):
  """fn(u, *operands) for a row-wise `fn` (row i of its [tokens, n] result depends on u[i] alone), computed tile
  by tile: u <[tokens, d]> read once, `operands` whole in every step (fetched once). With `lanes`, also
  `lane_rows(u)`, written from the same read (returns the pair). The cost estimate counts fn's FLOPs per tile
  (`pl.estimate_cost`) times the tiles, and those bytes. Differentiable: the gradient is that of the same
  outputs in plain JAX."""
  if not rowwise_supports(u.shape[0]):
    raise ValueError(f"rowwise needs a token count that {ROW_TILE} divides, got {u.shape[0]}")

  def reference(u, *operands):
    return (fn(u, *operands), lane_rows(u)) if lanes else fn(u, *operands)

  kernel = functools.partial(_rowwise_call, fn, lanes=lanes, interpret=interpret)
  return with_reference_grad(kernel, reference)(u, *operands)


def _rowwise_call(fn, u, *operands, lanes, interpret):
  tokens, d = u.shape
  tile = [jax.ShapeDtypeStruct((ROW_TILE, d), u.dtype)] + [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in operands]
  out, per_tile = jax.eval_shape(fn, *tile), pl.estimate_cost(fn, *tile)
  whole = lambda x: pl.BlockSpec(x.shape, lambda i: (0,) * x.ndim)  # noqa: E731
  nbytes = lambda x: x.size * jnp.dtype(x.dtype).itemsize  # noqa: E731
  out_shapes = [jax.ShapeDtypeStruct((tokens, out.shape[1]), out.dtype)]
  out_specs = [pl.BlockSpec((ROW_TILE, out.shape[1]), lambda i: (i, 0))]
  if lanes:
    out_shapes.append(jax.ShapeDtypeStruct((tokens, d // LANES, LANES), u.dtype))
    out_specs.append(pl.BlockSpec((ROW_TILE, d // LANES, LANES), lambda i: (i, 0, 0)))

  def kernel(u_ref, *refs):
    operand_refs, out_refs = refs[:len(operands)], refs[len(operands):]
    out_refs[0][...] = fn(u_ref[...], *(r[...] for r in operand_refs)).astype(out_refs[0].dtype)
    if lanes:
      out_refs[1][...] = u_ref[...].reshape(out_refs[1].shape)

  results = pl.pallas_call(
      body(kernel),
      out_shape=out_shapes,
      grid=(tokens // ROW_TILE,),
      in_specs=[pl.BlockSpec((ROW_TILE, d), lambda i: (i, 0))] + [whole(x) for x in operands],
      out_specs=out_specs,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=interpret,
      cost_estimate=pl.CostEstimate(flops=tokens // ROW_TILE * per_tile.flops,
                                    transcendentals=tokens // ROW_TILE * per_tile.transcendentals,
                                    bytes_accessed=nbytes(u) * (1 + lanes) + sum(map(nbytes, operands))
                                    + tokens * out.shape[1] * jnp.dtype(out.dtype).itemsize),
  )(*in_hbm(u, *operands, interpret=interpret))
  return tuple(results) if lanes else results[0]


def _kernel(slot_token, block_expert, x_hbm, a_ref, b_ref, w_ref, out_ref, rows, sems):
  """One block: wait for its rows (started by the previous step, or now for the first), start the next block's,
  then y = ((rows A_e) w) B_e. The grid runs in order ('arbitrary'), so the prefetch crosses steps. A padding
  slot (token = tokens) reads no row: its row is zeroed, and its weight is 0."""
  del block_expert  # read by the A and B index maps
  step, steps = pl.program_id(0), pl.num_programs(0)
  block, tokens = rows.shape[1], x_hbm.shape[0]

  def fetch(b, buffer, start):
    def row(j, carry):  # a loop, not unrolled: one DMA per slot would be `block` copies of this body for Mosaic
      token = slot_token[b * block + j]
      copy = pltpu.make_async_copy(x_hbm.at[jnp.minimum(token, tokens - 1)], rows.at[buffer, j], sems.at[buffer])
      if not start:
        pl.when(token < tokens)(copy.wait)
        return carry
      pl.when(token < tokens)(copy.start)

      @pl.when(token >= tokens)
      def _():
        rows[buffer, j] = jnp.zeros(rows.shape[2:], rows.dtype)
      return carry

    jax.lax.fori_loop(0, block, row, 0)

  pl.when(step == 0)(lambda: fetch(0, 0, start=True))
  pl.when(step + 1 < steps)(lambda: fetch(step + 1, (step + 1) % 2, start=True))
  fetch(step, step % 2, start=False)
  outputs = _lora(rows.at[step % 2], a_ref[...], w_ref[...], b_ref[...])
  out_ref[...] = outputs.reshape(out_ref.shape).astype(out_ref.dtype)


def _hidden(rows, a, weight, dtype):
  """(rows A_e) w <dtype>[block, r] for a block's rows <ref [block, d_in / 128, 128]>, a = A_e^T <[r, d_in]> and its
  slots' weights w <float32>[1, block] (float32 accumulation, rounded to `dtype`, B's)."""
  block = rows.shape[0]
  hidden = jax.lax.dot_general(rows[...].reshape(block, -1), a, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)
  # The [1, block] weights as a [block, 1] column: the diagonal matrix diag(w) summed over its rows (exact).
  diagonal = jax.lax.broadcasted_iota(jnp.int32, (block, block), 0) == jax.lax.broadcasted_iota(
      jnp.int32, (block, block), 1)
  column = jnp.sum(jnp.where(diagonal, jnp.broadcast_to(weight, (block, block)), 0.0), axis=1, keepdims=True)
  return (hidden * column).astype(dtype)


def _lora(rows, a, weight, b):
  """((rows A_e) w) B_e <float32>[block, d_out] (`_hidden`, then float32 accumulation) for b = B_e <[r, d_out]>."""
  return jnp.dot(_hidden(rows, a, weight, b.dtype), b, preferred_element_type=jnp.float32)


def lora_blocks(x_lanes, lora_a, lora_b, token, block_expert, weight, *, pairs, interpret=False):
  """y <x_lanes.dtype>[blocks, block, d_out / 128, 128] (`lane_rows` per slot, for `combine`): slot (b, t)'s LoRA
  output ((x[token[b, t]] A_e) weight[b, t]) B_e, with e = block_expert[b].

  x_lanes <[tokens, d_in / 128, 128]> (`lane_rows`); lora_a <[E, d_in, r]>, lora_b <[E, r, d_out]> in x's dtype;
  token <int32>[blocks, block], `tokens` for a padding slot (its weight must be 0); block_expert <int32>[blocks];
  weight <float32>[blocks, block]; `pairs` the number of slots that are not padding.
  """
  (_, lanes, _), (num_experts, rank, d_out) = x_lanes.shape, lora_b.shape
  num_blocks, block = token.shape
  d_in, slots, itemsize = lanes * LANES, num_blocks * block, jnp.dtype(x_lanes.dtype).itemsize
  cost = pl.CostEstimate(flops=2 * slots * rank * (d_in + d_out), transcendentals=0,
                         bytes_accessed=(pairs * d_in + slots * d_out) * itemsize + slots * 8
                         + min(num_blocks, num_experts) * rank * (d_in + d_out) * itemsize)
  per_block = lambda b, token, expert: (b, 0, 0)  # noqa: E731
  per_expert = lambda b, token, expert: (expert[b], 0, 0)  # noqa: E731
  call = pl.pallas_call(
      body(_kernel),
      out_shape=jax.ShapeDtypeStruct((num_blocks, block, d_out // LANES, LANES), x_lanes.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(num_blocks,),
          in_specs=[pl.BlockSpec(memory_space=pl.ANY),
                    pl.BlockSpec((None, rank, d_in), per_expert),
                    pl.BlockSpec((None, rank, d_out), per_expert),
                    pl.BlockSpec((None, 1, block), per_block)],
          out_specs=pl.BlockSpec((None, block, d_out // LANES, LANES), lambda b, token, expert: (b, 0, 0, 0)),
          scratch_shapes=[pltpu.VMEM((2, block, lanes, LANES), x_lanes.dtype), pltpu.SemaphoreType.DMA((2,))]),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
      interpret=interpret,
      cost_estimate=cost,
  )
  operands = in_hbm(x_lanes, jnp.swapaxes(lora_a, 1, 2), lora_b, interpret=interpret)
  return call(token.reshape(-1), block_expert, *operands, weight[:, None, :])


def _combine_kernel(slot, y_hbm, *refs):
  """One (column tile j, token tile i): wait for its tokens' k slot rows each, columns of tile j (started by the
  previous step, or now for the first), start the next step's, then out = (u W) + the sum of each token's k rows
  (float32; `u W` where the plain layer is given)."""
  u_ref, w_ref = refs[:-3] if len(refs) == 5 else (None, None)
  out_ref, rows, sems = refs[-3:]
  tiles = pl.num_programs(1)  # step s is column tile s // tiles, token tile s % tiles
  step, steps = pl.program_id(0) * tiles + pl.program_id(1), pl.num_programs(0) * tiles
  pairs, lanes = rows.shape[1], rows.shape[2]
  tile = out_ref.shape[0]
  k = pairs // tile

  def fetch(s, buffer, start):
    def pair(p, carry):  # pair p = (token t, choice j) lands in row j * tile + t
      row = y_hbm.at[slot[s % tiles * pairs + p]]
      columns = pl.ds(pl.multiple_of(s // tiles * lanes, SPLIT_LANES), lanes)
      source = row if lanes == y_hbm.shape[1] else row.at[columns]
      copy = pltpu.make_async_copy(source, rows.at[buffer, p % k * tile + p // k], sems.at[buffer])
      copy.start() if start else copy.wait()
      return carry

    jax.lax.fori_loop(0, pairs, pair, 0)

  pl.when(step == 0)(lambda: fetch(0, 0, start=True))
  pl.when(step + 1 < steps)(lambda: fetch(step + 1, (step + 1) % 2, start=True))
  fetch(step, step % 2, start=False)
  buffer = step % 2
  plain = None if u_ref is None else jnp.dot(u_ref[...], w_ref[...], preferred_element_type=jnp.float32)
  for c in range(lanes):  # per 128 lanes: a whole [tile, width] float32 sum beside `plain` may exceed v4's VMEM
    total = sum(rows[buffer, j * tile:(j + 1) * tile, c, :].astype(jnp.float32) for j in range(k))
    if plain is not None:
      total = total + plain[:, c * LANES:(c + 1) * LANES]
    out_ref[:, c * LANES:(c + 1) * LANES] = total.astype(out_ref.dtype)


def column_tile(d_in: int, d_out: int, k: int, itemsize: int, vmem_bytes: int) -> Optional[int]:
  """The widest column tile (d_out, or a multiple of SPLIT_LANES x 128 that divides it: a DMA offset into the pair
  rows' lanes must be whole memory tiles) whose `combine` step with the plain layer fits 7/8 of `vmem_bytes` (the
  rest for the compiler's own), or None. A step holds W's [d_in, tile] columns (one buffer: they change once per
  column tile) and, double-buffered, u's [ROW_TILE, d_in] rows, the output tile and the k ROW_TILE pair rows,
  and the float32 product. Each further column tile reads u once more."""
  def step_bytes(n):
    return itemsize * (d_in * n + 2 * ROW_TILE * (d_in + n * (1 + k))) + 4 * ROW_TILE * n

  widths = [d_out] + list(range(SPLIT_LANES * LANES, d_out, SPLIT_LANES * LANES))
  return max((n for n in widths if d_out % n == 0 and step_bytes(n) <= vmem_bytes * 7 // 8), default=None)


def combine(y_lanes, slot, k: int, *, u=None, kernel=None, vmem_bytes=VMEM_BYTES, interpret=False):
  """out <[tokens, d_out]>: out[t] = sum_j y[slot[t k + j]], each token's k pair outputs summed (float32), the rows
  DMA'd from y_lanes <[slots, d_out / 128, 128]> (`lora_blocks`' output) tile by tile of ROW_TILE tokens. With the
  plain layer's u <[tokens, d_in]> and kernel <[d_in, d_out]>, out[t] = u[t] W + that sum, the product formed in
  the same kernel (float32 accumulation, one rounding): the routed layer's output, the plain matmul reading u
  once per column tile (`column_tile` within `vmem_bytes`, the chip's VMEM) and W once, and the pair outputs
  never added in HBM.

  slot <int32>[tokens k], tokens a multiple of ROW_TILE. In place of an XLA scatter-add of the slots into the
  tokens, which XLA:TPU's cost analysis counts erratically with the width (a [37248, d] scatter-add into 16,384
  rows: 340 MB at d = 1024, 68 MB at 2048, less than its updates' bytes, 3.6 GB at 5120): this moves each pair's
  row once and writes each token's row once, and its cost estimate says so.
  """
  _, lanes, _ = y_lanes.shape
  tokens, itemsize = slot.shape[0] // k, jnp.dtype(y_lanes.dtype).itemsize
  if not rowwise_supports(tokens):
    raise ValueError(f"combine needs a token count that {ROW_TILE} divides, got {tokens}")
  d_out = lanes * LANES
  plain = kernel is not None
  d_in = u.shape[1] if plain else 0
  width = column_tile(d_in, d_out, k, itemsize, vmem_bytes) if plain else d_out
  if width is None:
    raise ValueError(f"no column tile of a [{d_in}, {d_out}] kernel fits {vmem_bytes} bytes of VMEM")
  columns = d_out // width
  flops = tokens * (k - 1 + plain) * d_out + 2 * tokens * d_in * d_out
  nbytes = (tokens * (k + 1) * d_out + columns * tokens * d_in + d_in * d_out) * itemsize + tokens * k * 4
  in_specs = [pl.BlockSpec(memory_space=pl.ANY)]
  if plain:
    in_specs += [pl.BlockSpec((ROW_TILE, d_in), lambda j, i, slot: (i, 0)),
                 pl.BlockSpec((d_in, width), lambda j, i, slot: (0, j), pipeline_mode=pl.Buffered(1))]
  return pl.pallas_call(
      body(_combine_kernel),
      out_shape=jax.ShapeDtypeStruct((tokens, d_out), y_lanes.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(columns, tokens // ROW_TILE),
          in_specs=in_specs,
          out_specs=pl.BlockSpec((ROW_TILE, width), lambda j, i, slot: (i, j)),
          scratch_shapes=[pltpu.VMEM((2, k * ROW_TILE, width // LANES, LANES), y_lanes.dtype),
                          pltpu.SemaphoreType.DMA((2,))]),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary", "arbitrary"),
                                           vmem_limit_bytes=vmem_bytes if plain else None),
      interpret=interpret,
      cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=nbytes),
  )(slot, *in_hbm(y_lanes, *((u, kernel.astype(u.dtype)) if plain else ()), interpret=interpret))


TOKEN_TILES = (2048, 1024, 512, 256, 128)  # the token tiles of `routed_tiles`, largest first: ROW_TILE x 2^n




def _tiles_kernel(token, block_expert, u_ref, a_ref, b_ref, w_ref, *refs, plain: bool, stream: bool):
  """One (token tile, column group). At the tile's first group: each of its expert-sorted blocks' weighted hidden
  values h = (rows A_e) w, the block's rows gathered from the tile in VMEM, kept for the tile's other groups. In
  every group: acc = each block's h B_e in the group's columns added row by row into its slots' tokens (float32),
  then out = u W + acc (`u W` where the plain layer is given). A padding slot is token 0 of its tile with weight 0:
  it adds zeros. With `stream`, A is in HBM and each run of blocks of one expert DMAs its A_e into one of two
  buffers, the next run's started during the current run's last block."""
  kernel_ref, refs = (refs[0], refs[1:]) if plain else (None, refs)
  out_ref, acc, rows, outputs, hidden = refs[:5]
  tile, num_blocks, block = pl.program_id(0), w_ref.shape[0], rows.shape[0]
  first = lambda b: (tile * num_blocks + b) * block  # noqa: E731  (the block's first slot)
  expert = lambda b: block_expert[tile * num_blocks + b]  # noqa: E731

  def a_of(b, buffer):
    """A_e^T of block b: resident, or (`stream`) its run's buffer, waited for at the run's first block."""
    if not stream:
      return a_ref[expert(b)]
    a_buffers, sems = refs[5:]
    copy = lambda b, buffer: pltpu.make_async_copy(a_ref.at[expert(b)], a_buffers.at[buffer], sems.at[buffer])  # noqa: E731
    pl.when((b == 0) | (expert(b) != expert(jnp.maximum(b - 1, 0))))(lambda: copy(b, buffer).wait())
    pl.when((b + 1 < num_blocks) & (expert(jnp.minimum(b + 1, num_blocks - 1)) != expert(b)))(
        lambda: copy(b + 1, 1 - buffer).start())
    return a_buffers[buffer]

  @pl.when(pl.program_id(1) == 0)
  def _():
    def one_block(b, buffer):
      def gather(j, carry):
        rows[j] = u_ref[token[first(b) + j]]
        return carry

      if stream:  # a new run of blocks: the other buffer
        buffer = jnp.where((b > 0) & (expert(b) != expert(jnp.maximum(b - 1, 0))), 1 - buffer, buffer)
      jax.lax.fori_loop(0, block, gather, 0)
      hidden[b] = _hidden(rows, a_of(b, buffer), w_ref[b], hidden.dtype)
      return buffer

    if stream:
      a_buffers, sems = refs[5:]
      pltpu.make_async_copy(a_ref.at[expert(0)], a_buffers.at[0], sems.at[0]).start()
    jax.lax.fori_loop(0, num_blocks, one_block, jnp.int32(0))

  acc[...] = jnp.zeros(acc.shape, acc.dtype)

  def one_block(b, carry):
    def add(j, carry):
      row = pl.ds(token[first(b) + j], 1)
      acc[row, :] += outputs[pl.ds(j, 1), :]
      return carry

    outputs[...] = jnp.dot(hidden[b], b_ref[expert(b)], preferred_element_type=jnp.float32)
    jax.lax.fori_loop(0, block, add, 0)
    return carry

  def finish(r, carry):  # ROW_TILE rows at a time: a smaller body for Mosaic to unroll than the whole tile
    rows = pl.ds(pl.multiple_of(r * ROW_TILE, ROW_TILE), ROW_TILE)
    total = acc[rows, :]
    if plain:
      total += jnp.dot(u_ref[rows].reshape(ROW_TILE, -1), kernel_ref[...], preferred_element_type=jnp.float32)
    out_ref[rows, :] = total.astype(out_ref.dtype)
    return carry

  jax.lax.fori_loop(0, num_blocks, one_block, 0)
  jax.lax.fori_loop(0, acc.shape[0] // ROW_TILE, finish, 0)


def padded_row(width: int, itemsize: int) -> int:
  """Elements a `lane_rows` row of `width` takes in TPU memory: its width / 128 lane rows padded to a whole memory
  tile of (32 / 8 itemsize) x 8 rows."""
  lanes, sublanes = math.ceil(width / LANES), 8 * 4 // itemsize
  return math.ceil(lanes / sublanes) * sublanes * LANES


def tile_block_count(tile: int, k: int, experts: int, block: int) -> int:
  """Blocks of `block` slots that a tile's tile x k pairs, sorted by expert, can need (each expert's last block
  partly padding), plus one."""
  return (tile * k + experts * (block - 1)) // block + 1


def tiles_bytes(tile: int, tokens: int, d_in: int, d_out: int, experts: int, rank: int, k: int, block: int,
                itemsize: int, plain: bool, columns: int = 1, stream: bool = False) -> int:
  """VMEM that a `routed_tiles` step of `tile` of `tokens` tokens and d_out / `columns` columns holds: the experts'
  A whole (with `stream`, two experts' A); the tile's u rows and slot weights, B's and W's columns of the group,
  each double-buffered where it changes during the grid; the output (double-buffered); the float32 sums, the
  plain product of ROW_TILE rows, one block's rows and outputs, and the tile's hidden values (r padded to 128
  lanes; a block's weights to 8 x 128 floats)."""
  width, blocks = d_out // columns, tile_block_count(tile, k, experts, block)
  per_tile, per_group = 1 + (tile < tokens), 1 + (columns > 1)
  u_and_weights = per_tile * (itemsize * tile * padded_row(d_in, itemsize) + blocks * 8 * max(block, LANES) * 4)
  experts_and_w = itemsize * ((2 if stream else experts) * rank * d_in
                              + per_group * (experts * rank + plain * d_in) * width)
  sums = 4 * (tile + block + plain * ROW_TILE) * width
  return (u_and_weights + experts_and_w + 2 * itemsize * tile * width + sums
          + itemsize * (block * padded_row(d_in, itemsize) + blocks * block * max(rank, LANES)))


def tiles_cost(tokens: int, tile: int, d_in: int, d_out: int, experts: int, rank: int, block: int, slots: int,
               itemsize: int, plain: bool, columns: int, stream: bool = False) -> tuple[int, int]:
  """(FLOPs, HBM bytes) of `routed_tiles`: each of `slots` slots' (x A_e) w and its B_e product and sum, plus u W;
  u read once (in its `lane_rows` layout) and the output written once, the experts' A once (with `stream`, once
  per tile per run of blocks of one expert: at most min(blocks, E)), their B and W once (once per tile where there
  are several column groups), each slot's token and weight once."""
  tiles, blocks = tokens // tile, slots // (tokens // tile) // block
  flops = 2 * slots * rank * (d_in + d_out) + slots * d_out + plain * 2 * tokens * d_in * d_out
  per_tile = tiles if columns > 1 else 1
  a_reads = tiles * min(blocks, experts) if stream else experts
  nbytes = (itemsize * (tokens * padded_row(d_in, itemsize) + tokens * d_out + a_reads * rank * d_in
                        + per_tile * (experts * rank + plain * d_in) * d_out)
            + slots * 8 + tiles * blocks * 4)
  return flops, nbytes


def routed_tiles(u_lanes, lora_a, lora_b, token, block_expert, weight, *, kernel=None, columns: int = 1,
                 stream: bool = False, vmem_bytes=VMEM_BYTES, interpret=False):
  """out <u.dtype>[tokens, d_out]: the routed layer one token tile at a time, everything of a tile in VMEM:

    out[t] = u[t] W + sum over the tile's slots s of token t of ((u[t] A_e) w_s) B_e     (e the slot's expert)

  (u W where the plain layer's kernel <[d_in, d_out]> is given; float32 accumulation, one rounding), each tile in
  `columns` groups of d_out / columns columns (a multiple of 128). The tile's pairs are sorted by expert into
  blocks (`routing.tile_blocks`): token <int32>[tiles, slots] the token of each slot within its tile (0 for
  padding), block_expert <int32>[tiles, blocks], weight <float32>[tiles, blocks, block] (0 for padding). u_lanes
  <[tokens, d_in / 128, 128]> (`lane_rows`, the rows a block gathers from VMEM); lora_a <[E, d_in, r]>, lora_b
  <[E, r, d_out]>.

  Against `lora_blocks` + `combine`: no token row is read from HBM but the tile's own, once, and no slot output
  makes a round trip through HBM, for the experts' A held whole in VMEM (`tiles_bytes`: a v5e's 128 MiB holds
  them and W at XL widths in one group, a v4's 16 MiB 36 XL experts with W in groups of columns), or with
  `stream` fetched per tile, once per run of blocks of one expert (166 XL experts on a v4). The blocks' hidden
  values (x A_e) w are formed once per tile and kept for its groups; with several groups, B's and W's columns are
  read once per tile.
  """
  tokens, lanes_in, _ = u_lanes.shape
  num_experts, rank, d_out = lora_b.shape
  tiles, num_blocks, block = weight.shape
  tile, d_in, itemsize = tokens // tiles, lanes_in * LANES, jnp.dtype(u_lanes.dtype).itemsize
  plain, width = kernel is not None, d_out // columns
  if width * columns != d_out or width % LANES:
    raise ValueError(f"routed_tiles needs column groups of a multiple of {LANES} columns, got {columns} of {d_out}")
  flops, nbytes = tiles_cost(tokens, tile, d_in, d_out, num_experts, rank, block, tiles * num_blocks * block,
                             itemsize, plain, columns, stream)
  once = dict(pipeline_mode=pl.Buffered(1))  # blocks whose index never changes in the grid: one buffer
  per_tile, per_group = (once if tiles == 1 else {}), (once if columns == 1 else {})
  in_specs = [pl.BlockSpec((tile, lanes_in, LANES), lambda i, j, token, expert: (i, 0, 0), **per_tile),
              pl.BlockSpec(memory_space=pl.ANY) if stream else
              pl.BlockSpec((num_experts, rank, d_in), lambda i, j, token, expert: (0, 0, 0), **once),
              pl.BlockSpec((num_experts, rank, width), lambda i, j, token, expert: (0, 0, j), **per_group),
              pl.BlockSpec((None, num_blocks, 1, block), lambda i, j, token, expert: (i, 0, 0, 0), **per_tile)]
  if plain:
    in_specs.append(pl.BlockSpec((d_in, width), lambda i, j, token, expert: (0, j), **per_group))
  return pl.pallas_call(
      body(functools.partial(_tiles_kernel, plain=plain, stream=stream)),
      out_shape=jax.ShapeDtypeStruct((tokens, d_out), u_lanes.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(tiles, columns),
          in_specs=in_specs,
          out_specs=pl.BlockSpec((tile, width), lambda i, j, token, expert: (i, j)),
          scratch_shapes=[pltpu.VMEM((tile, width), jnp.float32),
                          pltpu.VMEM((block, lanes_in, LANES), u_lanes.dtype),
                          pltpu.VMEM((block, width), jnp.float32),
                          pltpu.VMEM((num_blocks, block, rank), lora_b.dtype)]
          + [pltpu.VMEM((2, rank, d_in), u_lanes.dtype), pltpu.SemaphoreType.DMA((2,))] * stream),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                           vmem_limit_bytes=vmem_bytes),
      interpret=interpret,
      cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=nbytes),
  )(token.reshape(-1), block_expert.reshape(-1),
    *in_hbm(u_lanes, jnp.swapaxes(lora_a, 1, 2), lora_b, interpret=interpret), weight[:, :, None, :],
    *in_hbm(*((kernel.astype(u_lanes.dtype),) if plain else ()), interpret=interpret))
