"""The fused routed-LoRA kernel (experts/kernels.py) against a numpy recomputation, interpreted on this CPU:
rows gathered inside the kernel across several blocks (the next block's rows prefetched while one computes),
padding slots that read no row, and the row-width check."""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phatgoose_jax.experts import cost, kernels, routing

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (jax[tpu])")


def test_blocks_equal_numpy_with_padding_slots():
  rng = np.random.default_rng(0)
  tokens, d_in, d_out, experts, rank, blocks, block = 50, 256, 136, 4, 8, 5, 8
  x = rng.normal(size=(tokens, d_in)).astype(np.float32)
  a = rng.normal(size=(experts, d_in, rank)).astype(np.float32)
  b = rng.normal(size=(experts, rank, d_out)).astype(np.float32)
  token = rng.integers(0, tokens, (blocks, block)).astype(np.int32)
  token[1, 5:] = tokens  # padding: no row read, weight 0
  token[4, 2:] = tokens
  weight = np.where(token < tokens, rng.uniform(0.1, 1.0, (blocks, block)), 0.0).astype(np.float32)
  block_expert = np.array([0, 0, 2, 3, 1], np.int32)
  got = kernels.lora_blocks(jnp.asarray(x), jnp.asarray(a), jnp.asarray(b), jnp.asarray(token),
                                jnp.asarray(block_expert), jnp.asarray(weight), pairs=int((token < tokens).sum()),
                                interpret=True)
  rows = x[np.minimum(token, tokens - 1)].astype(np.float64)
  hidden = np.einsum("bti,bir->btr", rows, a[block_expert].astype(np.float64)) * weight[..., None]
  want = np.einsum("btr,bro->bto", hidden, b[block_expert].astype(np.float64))
  assert np.abs(want).max() > 1.0 and np.all(want[1, 5:] == 0)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


def test_a_row_width_that_128_does_not_divide_is_refused():
  assert kernels.supports(2048) and kernels.supports(5120) and not kernels.supports(768 + 64)
  x = jnp.zeros((8, 96))
  with pytest.raises(ValueError, match="row width that 128 divides, got 96"):
    kernels.lora_blocks(x, jnp.zeros((2, 96, 4)), jnp.zeros((2, 4, 8)), jnp.zeros((1, 8), jnp.int32),
                            jnp.zeros((1,), jnp.int32), jnp.zeros((1, 8)), pairs=8, interpret=True)


def test_fused_is_a_tpu_candidate_where_it_takes_the_row_width():
  layer = cost.LayerShape(tokens=16384, d_in=2048, d_out=2048, experts=36, rank=16, k=2, dtype="bfloat16")
  assert "fused" in routing.candidates(layer, "tpu") and "fused" not in routing.candidates(layer, "gpu")
  odd = cost.LayerShape(tokens=16384, d_in=2048 + 64, d_out=2048, experts=36, rank=16, k=2, dtype="bfloat16")
  assert "fused" not in routing.candidates(odd, "tpu")


@needs_libtpu
def test_fused_compiles_for_a_tpu_and_moves_fewer_bytes_than_the_gather_and_grouped_matmuls():
  """Mosaic compiles the kernel for a v5e chip from this CPU host (layouts, DMAs and scalar prefetch checked),
  and by the compiler's cost analysis the fused path moves fewer bytes than megablox's row gather + two gmms."""
  from jax.experimental import topologies
  device = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices[0]
  layer = cost.LayerShape(tokens=2048, d_in=512, d_out=256, experts=8, rank=16, k=2, dtype="bfloat16")
  fused_flops, fused_bytes = cost.compiled_cost(routing.mixer("fused"), layer, device)
  grouped_flops, grouped_bytes = cost.compiled_cost(routing.mixer("grouped"), layer, device)
  lora_flops = 2 * layer.pairs * layer.rank * (layer.d_in + layer.d_out)
  assert lora_flops <= fused_flops < 1.5 * lora_flops
  assert fused_bytes < grouped_bytes
