"""The routed layer's Pallas TPU kernels (experts/kernels.py) against numpy recomputations, interpreted on this CPU:
the fused LoRA blocks (rows gathered inside the kernel across several blocks, the next block's rows prefetched
while one computes, padding slots that read no row), the combine of each token's pair outputs, and the router
scores applied tile by tile (with the kernel's row layout written beside them); their gradients; and, with libtpu,
that Mosaic compiles them for a TPU chip from this host."""
import importlib.util
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phatgoose_jax.experts import cost, kernels, routing

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (jax[tpu])")


def test_lora_blocks_equal_numpy_with_padding_slots():
  rng = np.random.default_rng(0)
  tokens, d_in, d_out, experts, rank, blocks, block = 50, 256, 384, 4, 8, 5, 8
  x = rng.normal(size=(tokens, d_in)).astype(np.float32)
  a = rng.normal(size=(experts, d_in, rank)).astype(np.float32)
  b = rng.normal(size=(experts, rank, d_out)).astype(np.float32)
  token = rng.integers(0, tokens, (blocks, block)).astype(np.int32)
  token[1, 5:] = tokens  # padding: no row read, weight 0
  token[4, 2:] = tokens
  weight = np.where(token < tokens, rng.uniform(0.1, 1.0, (blocks, block)), 0.0).astype(np.float32)
  block_expert = np.array([0, 0, 2, 3, 1], np.int32)
  got = kernels.lora_blocks(kernels.lane_rows(jnp.asarray(x)), jnp.asarray(a), jnp.asarray(b), jnp.asarray(token),
                            jnp.asarray(block_expert), jnp.asarray(weight), pairs=int((token < tokens).sum()),
                            interpret=True)
  assert got.shape == (blocks, block, d_out // 128, 128)
  rows = x[np.minimum(token, tokens - 1)].astype(np.float64)
  hidden = np.einsum("bti,bir->btr", rows, a[block_expert].astype(np.float64)) * weight[..., None]
  want = np.einsum("btr,bro->bto", hidden, b[block_expert].astype(np.float64))
  assert np.abs(want).max() > 1.0 and np.all(want[1, 5:] == 0)
  np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want, rtol=1e-5, atol=1e-4)


def test_combine_sums_each_tokens_pair_rows():
  rng = np.random.default_rng(1)
  tokens, k, slots, d = 256, 2, 600, 256
  y = rng.normal(size=(slots, d)).astype(np.float32)
  slot = rng.permutation(slots)[:tokens * k].astype(np.int32)
  got = kernels.combine(kernels.lane_rows(jnp.asarray(y)), jnp.asarray(slot), k, interpret=True)
  np.testing.assert_allclose(np.asarray(got), y[slot].reshape(tokens, k, d).sum(1), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="token count that 128 divides, got 100"):
    kernels.combine(kernels.lane_rows(jnp.asarray(y)), jnp.asarray(slot[:200]), k, interpret=True)


def test_combine_with_the_plain_layer_adds_u_w_in_one_kernel_over_any_column_tiling():
  """out = u W + each token's pair rows, over one column tile or two (a VMEM budget that holds half of W): the
  same values, float32 accumulation; the tile is the widest that divides d_out and fits, none where none fits."""
  rng = np.random.default_rng(3)
  tokens, k, slots, d_in, d_out = 256, 2, 600, 128, 2048
  y = rng.normal(size=(slots, d_out)).astype(np.float32)
  slot = rng.permutation(slots)[:tokens * k].astype(np.int32)
  u, w = rng.normal(size=(tokens, d_in)).astype(np.float32), rng.normal(size=(d_in, d_out)).astype(np.float32)
  want = y[slot].reshape(tokens, k, d_out).sum(1) + u.astype(np.float64) @ w
  assert kernels.column_tile(d_in, d_out, k, 4, 16 << 20) == 2048
  assert kernels.column_tile(d_in, d_out, k, 4, 6 << 20) == 1024
  assert kernels.column_tile(d_in, d_out, k, 4, 1 << 20) is None
  for vmem in [16 << 20, 6 << 20]:
    got = kernels.combine(kernels.lane_rows(jnp.asarray(y)), jnp.asarray(slot), k, u=jnp.asarray(u),
                          kernel=jnp.asarray(w), vmem_bytes=vmem, interpret=True)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)
  # XL widths: W's columns whole on a v5e, split on a v4 where they do not fit its 16 MiB
  v4, v5e = kernels.vmem_bytes("TPU v4"), kernels.vmem_bytes("TPU v5 lite")
  assert (v4, v5e) == (16 << 20, 128 << 20)
  assert kernels.column_tile(2048, 2048, 2, 2, v5e) == kernels.column_tile(5120, 2048, 2, 2, v5e) == 2048
  assert kernels.column_tile(5120, 2048, 2, 2, v4) is None  # u W beside the kernels there (XLA's)


def test_routed_tiles_equal_numpy_over_several_tiles_with_and_without_the_plain_layer():
  """Each tile's pairs sorted into blocks within the tile (`routing.tile_blocks`, padding slots of weight 0), the
  blocks' rows gathered in VMEM and their outputs added into their tokens' rows: out = u W + sum over each token's
  pairs of ((u A_e) w) B_e, in float32, over 3 tiles of 128 tokens, in one group of columns or three, the experts'
  A held whole or streamed per run of blocks."""
  rng = np.random.default_rng(5)
  tokens, k, d_in, d_out, experts, rank, block, tile = 384, 2, 256, 384, 5, 8, 16, 128
  u = rng.normal(size=(tokens, d_in)).astype(np.float32)
  a = rng.normal(size=(experts, d_in, rank)).astype(np.float32)
  b = rng.normal(size=(experts, rank, d_out)).astype(np.float32)
  w = rng.normal(size=(d_in, d_out)).astype(np.float32)
  index = np.stack([rng.permutation(experts)[:k] for _ in range(tokens)]).astype(np.int32)
  weights = rng.uniform(0.1, 1.0, (tokens, k)).astype(np.float32)
  token, block_expert, weight = routing.tile_blocks(jnp.asarray(index), jnp.asarray(weights), 0.5, tile, block,
                                                    experts)
  assert token.shape[0] == block_expert.shape[0] == weight.shape[0] == tokens // tile
  assert float(jnp.sum(weight)) == pytest.approx(0.5 * weights.sum(), rel=1e-5)  # every pair once, padding 0
  hidden = np.einsum("ti,tkir->tkr", u.astype(np.float64), a[index]) * (0.5 * weights)[..., None]
  update = np.einsum("tkr,tkro->to", hidden, b[index])
  for (kernel, want), columns, stream in itertools.product([(None, update), (w, update + u.astype(np.float64) @ w)],
                                                          [1, 3], [False, True]):
    got = kernels.routed_tiles(kernels.lane_rows(jnp.asarray(u)), jnp.asarray(a), jnp.asarray(b), token,
                               block_expert, weight, kernel=None if kernel is None else jnp.asarray(kernel),
                               columns=columns, stream=stream, interpret=True)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)
  with pytest.raises(ValueError, match="multiple of 128 columns, got 2 of 384"):
    kernels.routed_tiles(kernels.lane_rows(jnp.asarray(u)), jnp.asarray(a), jnp.asarray(b), token, block_expert,
                         weight, columns=2, interpret=True)


def test_token_tiles_hold_xl_experts_in_a_v5e_and_stream_them_in_a_v4_where_they_do_not_fit():
  """Of the tiles of 128 x 2^n tokens dividing the count, the column groups, A held whole or streamed and u W in the
  kernel or XLA's beside it, whose step fits 5/8 of VMEM, the least roofline time of the kernel's own cost (a
  smaller tile pads more blocks; several groups read W once per tile; streaming reads A once per tile), its blocks
  sized for its pairs. At T5-XL widths a v5e's 128 MiB holds 36 or 166 experts and W's columns in 1-4 groups; a
  v4's 16 MiB holds 36 experts and a chip's 1024-token share of the model in one tile beside W's columns in 16-40
  groups, streams A where d_in is 5120 or E 166, and leaves u W to XLA at 16,384 tokens (W read per tile)."""
  v4, v5e = "TPU v4", "TPU v5 lite"
  fit = lambda tokens, d_in, d_out, experts, kind, plain=True: routing.tiling(  # noqa: E731
      cost.LayerShape(tokens, d_in, d_out, experts, 16, 2, "bfloat16", plain), kind)
  assert fit(16384, 2048, 2048, 36, v5e) == (1024, 16, 1, False, True) == fit(1024, 2048, 2048, 166, v5e)
  assert fit(16384, 2048, 2048, 36, v5e, plain=False) == (2048, 32, 1, False, False)
  assert fit(16384, 2048, 5120, 166, v5e) == (2048, 16, 4, False, True)
  assert fit(16384, 5120, 2048, 166, v5e) == (2048, 16, 4, True, True)  # A per tile costs less than W per tile
  assert fit(384, 2048, 2048, 36, v5e)[:3] == (128, 16, 1)  # 3 x 128: the largest power-of-two tile dividing it
  assert fit(100, 256, 256, 4, v5e).tile == 128  # padded to 128 tokens
  assert fit(1024, 2048, 2048, 36, v4) == (1024, 16, 16, False, True)
  assert fit(1024, 5120, 2048, 36, v4) == (256, 16, 4, True, False)
  assert fit(16384, 2048, 2048, 36, v4) == (512, 16, 8, False, False)
  assert fit(16384, 2048, 2048, 36, v4, plain=False) == (128, 16, 1, False, False)
  assert fit(16384, 2048, 2048, 166, v4) == (512, 16, 16, True, False)
  assert fit(16384, 5120, 2048, 166, v4) is None  # 128-token tiles' tables: 1.4 MB, over half of its 1 MiB SMEM
  assert fit(1024, 2048, 2048, 36, "cpu") == fit(1024, 2048, 2048, 36, v4)  # an unknown chip: a v4


@pytest.mark.parametrize("impl", ["fused", "tiles", "blocks"])
def test_a_route_given_the_plain_kernel_returns_the_layers_output_with_its_gradient(impl):
  """route(..., kernel=W) is u W + route(...): formed in the fused path's combine kernel or the tiles kernel, or
  added beside a path that does not fuse it; its gradients (u, W and the experts) are those of the sum."""
  rng = np.random.default_rng(4)
  u = jnp.asarray(rng.normal(size=(2, 100, 256)), jnp.float32)
  router = jnp.asarray(rng.normal(size=(4, 256)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(256, 384)) / 16, jnp.float32)
  a = jnp.asarray(rng.normal(size=(4, 256, 8)) / 16, jnp.float32)
  b = jnp.asarray(rng.normal(size=(4, 8, 384)) / 4, jnp.float32)
  fused = lambda u, w, a, b: routing.route(u, router, a, b, top_k=2, scale=0.5, impl=impl, kernel=w)[0]  # noqa: E731
  apart = lambda u, w, a, b: u @ w + routing.route(u, router, a, b, top_k=2, scale=0.5, impl="dense")[0]  # noqa: E731
  np.testing.assert_allclose(np.asarray(fused(u, w, a, b)), np.asarray(apart(u, w, a, b)), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda *args: jnp.sum(jnp.sin(f(*args)))  # noqa: E731
  got = jax.grad(loss(fused), (0, 1, 2, 3))(u, w, a, b)
  want = jax.grad(loss(apart), (0, 1, 2, 3))(u, w, a, b)
  for g, x in zip(got, want):  # float32 sums of ~200 tokens' terms in another order
    np.testing.assert_allclose(np.asarray(g), np.asarray(x), rtol=1e-4, atol=3e-5)


def test_rowwise_scores_equal_the_function_and_write_the_row_layout():
  """The standardized scores tile by tile are bit-identical to the whole-array function in bf16 (the official
  bf16 rounding) and equal to float32 rounding in float32; the row layout is u's; the gradient is the
  function's."""
  rng = np.random.default_rng(2)
  u = jnp.asarray(rng.normal(size=(256, 384)) + 0.5, jnp.bfloat16)
  router = jnp.asarray(rng.normal(size=(7, 384)), jnp.bfloat16)
  per_tile = lambda u, router: kernels.rowwise(  # noqa: E731  # as router_scores makes them on a TPU
      routing.standardized_scores, u, *routing.phatgoose_router(router, u.dtype), interpret=True)
  scores, lanes = kernels.rowwise(routing.standardized_scores, u, *routing.phatgoose_router(router, u.dtype),
                                  lanes=True, interpret=True)
  assert scores.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(scores, np.float32),
                                np.asarray(routing.phatgoose_scores(u, router), np.float32))
  np.testing.assert_array_equal(np.asarray(lanes), np.asarray(u).reshape(256, 3, 128))
  u32, router32 = u.astype(jnp.float32), router.astype(jnp.float32)
  np.testing.assert_allclose(np.asarray(per_tile(u32, router32)),
                             np.asarray(routing.phatgoose_scores(u32, router32)), rtol=0, atol=2e-6)
  loss = lambda f: lambda u, r: jnp.sum(jnp.sin(f(u, r)))  # noqa: E731
  got = jax.grad(loss(per_tile), (0, 1))(u32, router32)
  want = jax.grad(loss(routing.phatgoose_scores), (0, 1))(u32, router32)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_widths_and_token_counts_the_kernels_refuse():
  assert kernels.supports(2048) and kernels.supports(5120) and not kernels.supports(768 + 64)
  with pytest.raises(ValueError, match="row width that 128 divides, got 96"):
    kernels.lane_rows(jnp.zeros((8, 96)))
  with pytest.raises(ValueError, match="token count that 128 divides, got 100"):
    kernels.rowwise(routing.phatgoose_scores, jnp.zeros((100, 128)), jnp.zeros((3, 128)), interpret=True)


def test_tiles_or_else_fused_replaces_the_sorted_tpu_candidates_where_they_take_the_widths():
  """The tiles kernel where a step fits the chip's VMEM (a v5e: every XL layer; a v4: every XL layer, 166 experts'
  A streamed per tile), the fused kernels where the experts need several groups of columns; ragged and grouped
  where the widths are not whole 128-lane rows."""
  layer = cost.LayerShape(tokens=16384, d_in=2048, d_out=5120, experts=36, rank=16, k=2, dtype="bfloat16")
  with_plain = cost.LayerShape(**{**layer.__dict__, "plain": True})  # u W in the tiles or combine kernel
  for shape in [layer, with_plain]:
    assert list(routing.candidates(shape, "tpu", "TPU v5 lite")) == ["tiles"]  # one group of columns, W or not
    assert list(routing.candidates(shape, "tpu", "TPU v4")) == ["tiles", "fused"]  # v4: the experts in 20 groups
  square = cost.LayerShape(**{**with_plain.__dict__, "d_out": 2048})  # the experts in one group
  assert list(routing.candidates(square, "tpu", "TPU v4")) == ["tiles"]
  many = cost.LayerShape(**{**layer.__dict__, "experts": 166})  # v4: A streamed per tile, in 20 groups
  assert list(routing.candidates(many, "tpu", "TPU v4")) == ["tiles", "fused"]
  assert "fused" not in routing.candidates(layer, "gpu") and "tiles" not in routing.candidates(layer, "gpu")
  for odd in [dict(d_in=2048 + 64), dict(d_out=5120 + 64)]:
    assert list(routing.candidates(cost.LayerShape(**{**layer.__dict__, **odd}), "tpu")) == ["ragged", "grouped"]


@needs_libtpu
def test_fused_route_compiles_for_a_tpu_and_moves_fewer_bytes_than_the_grouped_matmuls():
  """Mosaic compiles the three kernels of a routed layer (scores, blocks, combine) for a v5e chip from this CPU
  host (layouts, DMAs and scalar prefetch checked), and by the compiler's cost analysis the fused layer moves
  fewer bytes than megablox's (row gather + two gmms + scatter-add) at FLOPs within 15% of its (the fused
  kernel counts its padding slots' work, the scores kernel its router standardisation per tile)."""
  from jax.experimental import topologies
  device = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding)  # noqa: E731
  args = spec(2048, 512), spec(8, 512), spec(8, 512, 16), spec(8, 16, 1024)
  figures = {}
  for impl in ["fused", "grouped"]:
    fn = jax.jit(lambda u, r, a, b, impl=impl: routing.route(u, r, a, b, top_k=2, scale=1 / 16, impl=impl)[0])
    with jax.set_mesh(jax.sharding.Mesh(np.array([device]), ("data",))):
      compiled = fn.lower(*args).compile()
    assert "tpu_custom_call" in compiled.as_text()
    figures[impl] = compiled.cost_analysis()
  assert figures["fused"]["bytes accessed"] < figures["grouped"]["bytes accessed"]
  assert figures["fused"]["flops"] < 1.15 * figures["grouped"]["flops"]  # + padding slots, router per tile


@needs_libtpu
def test_candidates_are_costed_with_stand_in_kernels_of_the_same_figures():
  """`cost.compiled_cost` compiles the kernels with empty bodies (Mosaic's compile of the real ones took 15 s a
  candidate for v4 at XL widths): XLA's cost analysis gives the same FLOPs and bytes as for the real kernels."""
  from jax.experimental import topologies
  device = topologies.get_topology_desc(topology_name="v4:2x2x1", platform="tpu").devices[0]
  layer = cost.LayerShape(tokens=512, d_in=512, d_out=1024, experts=8, rank=16, k=2, dtype="bfloat16", plain=True)
  for name in ["fused", "tiles"]:
    stand_in = cost.compiled_cost(routing.Candidate(name, 2), layer, device)
    fn = jax.jit(lambda *args: routing.Candidate(name, 2)(*args))  # its own trace, with the real kernels
    with jax.set_mesh(jax.sharding.Mesh(np.array([device]), ("data",))):
      compiled = fn.lower(*layer.arguments(device)).compile()
    real = compiled.cost_analysis()
    assert stand_in == (real["flops"], real["bytes accessed"]) and stand_in[0] > 2 * 512 * 512 * 1024


@needs_libtpu
@pytest.mark.parametrize("topology", ["v4:2x2x1", "v5e:2x2"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("impl", ["fused", "tiles"])
def test_the_routed_layer_compiles_for_each_tpu_generation_in_each_precision(topology, dtype, impl):
  """Mosaic compiles the kernels of a routed layer (scores, then blocks and combine with the plain matmul, or the
  tiles kernel with it) for v4 and v5e chips in float32 and bf16. The standardized router is made outside the
  scores kernel: a reduction over it inside does not compile for a v4 ("sublane gather not supported by this TPU
  generation")."""
  from jax.experimental import topologies
  device = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
  fn = jax.jit(lambda u, r, a, b, w: routing.route(u, r, a, b, top_k=2, scale=1 / 16, impl=impl, kernel=w)[0])
  with jax.set_mesh(jax.sharding.Mesh(np.array([device]), ("data",))):
    compiled = fn.lower(spec(256, 256), spec(36, 256), spec(36, 256, 16), spec(36, 16, 384), spec(256, 384)).compile()
  assert compiled.as_text().count("tpu_custom_call") >= {"fused": 3, "tiles": 2}[impl]
  assert compiled.cost_analysis()["flops"] >= 2 * 256 * 256 * 384  # u W inside the kernels' count


@needs_libtpu
@pytest.mark.parametrize("topology", ["v4:2x2x1", "v5e:2x2"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_tiles_kernel_streaming_the_experts_a_compiles_for_each_tpu_generation(topology, dtype):
  """Mosaic compiles the tiles kernel with the experts' A in HBM, DMA'd per run of blocks into two buffers, over
  two tiles in three column groups with W, for v4 and v5e chips in float32 and bf16."""
  from jax.experimental import topologies
  device = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  spec = lambda *shape, dtype=dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731

  def layer(u, a, b, w, index, weights):
    layout = routing.tile_blocks(index, weights, 0.5, 128, 16, 36)
    return kernels.routed_tiles(kernels.lane_rows(u), a, b, *layout, kernel=w, columns=3, stream=True)

  with jax.set_mesh(jax.sharding.Mesh(np.array([device]), ("data",))):
    compiled = jax.jit(layer).lower(spec(256, 256), spec(36, 256, 16), spec(36, 16, 384), spec(256, 384),
                                    spec(256, 2, dtype=jnp.int32), spec(256, 2, dtype=jnp.float32)).compile()
  assert compiled.as_text().count("tpu_custom_call") == 1


@needs_libtpu
@pytest.mark.parametrize("impl", ["fused", "tiles"])
def test_the_routed_xl_layer_compiles_for_a_v4_within_its_vmem(impl):
  """At T5-XL widths and 16,384 tokens the real kernels (not the stand-ins `auto` costs) fit a v4's 16 MiB of VMEM:
  the combine kernel's float32 sums beside `u W` once exceeded it by 1.7 MB."""
  from jax.experimental import topologies
  device = topologies.get_topology_desc(topology_name="v4:2x2x1", platform="tpu").devices[0]
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16,  # noqa: E731
                                             sharding=jax.sharding.SingleDeviceSharding(device))
  fn = jax.jit(lambda u, r, a, b, w: routing.route(u, r, a, b, top_k=2, scale=1 / 16, impl=impl, kernel=w)[0])
  with jax.set_mesh(jax.sharding.Mesh(np.array([device]), ("data",))):
    fn.lower(spec(16384, 2048), spec(36, 2048), spec(36, 2048, 16), spec(36, 16, 2048), spec(2048, 2048)).compile()


@needs_libtpu
def test_the_tiles_tables_fit_smem_where_tiling_takes_them():
  """`routing.tiling` keeps the scalar-prefetched token and expert tables within half the chip's 1 MiB SMEM: at
  16,384 tokens of a 5120 -> 2048 layer with 166 experts on a v4, 128-token tiles would need 1.4 MB (Mosaic:
  "would exceed memory ... prefetched SMEM operand"), so no tiling is offered there and 2048 -> 2048, which takes
  512-token tiles, compiles."""
  from jax.experimental import topologies
  device = topologies.get_topology_desc(topology_name="v4:2x2x1", platform="tpu").devices[0]
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16,  # noqa: E731
                                             sharding=jax.sharding.SingleDeviceSharding(device))
  fn = jax.jit(lambda u, r, a, b, w: routing.route(u, r, a, b, top_k=2, scale=1 / 16, impl="tiles", kernel=w)[0])
  with jax.set_mesh(jax.sharding.Mesh(np.array([device]), ("data",))):
    fn.lower(spec(16384, 2048), spec(166, 2048), spec(166, 2048, 16), spec(166, 16, 2048), spec(2048, 2048)).compile()
    with pytest.raises(ValueError, match="no token tile"):
      fn.lower(spec(16384, 5120), spec(166, 5120), spec(166, 5120, 16), spec(166, 16, 2048), spec(5120, 2048))
