"""The 'official' precision: each op rounded as the official bf16 runs (r-three/phatgoose under CUDA
torch.autocast over bf16 frozen parameters, colm/models/t5xl/t5.gin:20, src/models/manipulations/basic.py:54-59).

The torch references are explicit `.to(torch.bfloat16)` / `.float()` casts mirroring CUDA autocast (torch's
own list, torch/testing/_internal/autocast_test_lists.py: matmul and linear in bf16; pow, softmax, rsqrt,
layer_norm and sum in float32): CPU autocast has other op lists, so it is not used for the ops themselves.
"""
import math

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from phatgoose_jax import assembly, utils
from phatgoose_jax.experts.config import ExpertConfig
from phatgoose_jax.experts.lora import ExpertDense
from phatgoose_jax.t5 import layers
from phatgoose_jax.t5.config import T5Config
from test_precision import saved  # noqa: F401 (the fixture: a tiny base and a three-expert library)

BF16 = torch.bfloat16
CFG = T5Config(d_model=32, d_ff=48, num_heads=4, d_kv=8, dropout_rate=0.0, **utils.precision_fields("official"))


def rand(seed, *shape, scale=1.0):
  return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def bf16(x):
  """float32 numpy -> torch bf16 (the official's frozen parameters and activations)."""
  return torch.from_numpy(np.array(x, np.float32)).to(BF16)


def as_np(t):
  return t.float().numpy()


def jax_np(x):
  return np.asarray(jnp.asarray(x, jnp.float32))


def test_precision_fields_and_model_config():
  assert utils.precision_fields("official") == {"dtype": "bfloat16", "autocast": True}
  assert utils.precision_fields("bfloat16") == {"dtype": "bfloat16", "autocast": False}
  assert utils.precision_fields("float32") == {"dtype": "float32", "autocast": False}
  config = utils.model_config(T5Config(), dtype="official")
  assert (config.dtype, config.autocast) == ("bfloat16", True)
  assert config.fingerprint() == T5Config().fingerprint()
  with pytest.raises(ValueError, match="official"):
    utils.precision_fields("fp16")


def test_rmsnorm_equals_hf_t5_layer_norm_in_bf16():
  """T5LayerNorm.forward (transformers modeling_t5.py:65-72) over a bf16 weight and bf16 hidden states."""
  x, scale = rand(0, 3, 5, 32), rand(1, 32, scale=0.5) + 1.0
  hs, weight = bf16(x), bf16(scale)
  variance = hs.to(torch.float32).pow(2).mean(-1, keepdim=True)
  expected = weight * (hs * torch.rsqrt(variance + 1e-6)).to(BF16)  # bf16 * f32 -> f32 (promotion), then cast
  got = layers.RMSNorm(1e-6, jnp.bfloat16, True).apply({"params": {"scale": scale}}, jnp.asarray(as_np(hs)))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(jax_np(got), as_np(expected))


def test_attention_logits_bias_and_softmax_equal_hf_t5_attention_in_bf16():
  """The 4.x T5Attention.forward: bf16 scores (matmul), += the bf16 position bias plus mask (bf16 add),
  softmax(scores.float()).type_as(scores), bf16 matmul with the values. Masked keys: -1e10 here, bf16's min
  there: both weigh 0."""
  b, q, k, h, d = 2, 5, 6, 4, 8
  query, key, value = (bf16(rand(i, b, q if i == 2 else k, h, d)) for i in (2, 3, 4))
  table_bias = bf16(rand(5, 1, h, q, k))
  valid = np.ones((b, k), bool)
  valid[1, 4:] = False
  scores = torch.matmul(query.transpose(1, 2), key.transpose(1, 2).transpose(2, 3))
  scores = scores + (table_bias + torch.where(torch.from_numpy(valid)[:, None, None, :], 0.0,
                                              torch.finfo(BF16).min).to(BF16))
  weights = F.softmax(scores.float(), dim=-1).type_as(scores)
  expected = torch.matmul(weights, value.transpose(1, 2)).transpose(1, 2)
  mask = layers.attention_mask(np.ones((b, q), bool), valid)
  got = layers.dot_product_attention(jnp.asarray(as_np(query), jnp.bfloat16), jnp.asarray(as_np(key), jnp.bfloat16),
                                     jnp.asarray(as_np(value), jnp.bfloat16),
                                     mask + jnp.asarray(as_np(table_bias), jnp.bfloat16), lambda w, deterministic: w,
                                     True, autocast=True)
  np.testing.assert_array_equal(jax_np(got), as_np(expected))


def cuda_autocast_gelu(gate):
  """NewGELUActivation (transformers activations.py) on a bf16 input as CUDA autocast runs it: `pow` in float32,
  so the result is float32."""
  return 0.5 * gate * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (gate + 0.044715 * torch.pow(gate.float(), 3.0))))


def test_gated_gelu_mlp_equals_hf_t5_dense_gated_act_dense_in_bf16():
  """T5DenseGatedActDense (modeling_t5.py:106-122) with NewGELUActivation under CUDA autocast: bf16 wi_0 / wi_1,
  `pow` in float32 so gelu(wi_0 x) * wi_1 x is float32, cast to wo's bf16 dtype. Tolerance: one bf16 ulp of
  the output (torch's and XLA's float32 tanh differ in the last bits, which can flip the bf16 rounding)."""
  x = rand(6, 2, 5, 32)
  wi_0, wi_1, wo = rand(7, 32, 48, scale=0.3), rand(8, 32, 48, scale=0.3), rand(9, 48, 32, scale=0.2)
  hs = bf16(x)
  gate, linear = hs @ bf16(wi_0), hs @ bf16(wi_1)
  expected = ((cuda_autocast_gelu(gate) * linear).to(BF16) @ bf16(wo)).float().numpy()
  params = {"wi_0": {"kernel": wi_0}, "wi_1": {"kernel": wi_1}, "wo": {"kernel": wo}}
  got = jax_np(layers.MlpBlock(CFG).apply({"params": params}, jnp.asarray(as_np(hs), jnp.bfloat16)))
  np.testing.assert_allclose(got, expected, rtol=2 ** -7, atol=0)
  assert np.mean(got == expected) > 0.9


def lora_variables(seed, d_in=32, d_out=24, r=4, num=None):
  """(kernel, lora_a, lora_b) as float32 jax arrays (the variables a model holds)."""
  lead = () if num is None else (num,)
  shapes = [((d_in, d_out), 0.3), ((*lead, d_in, r), 0.5), ((*lead, r, d_out), 1.0)]
  return tuple(jnp.asarray(rand(seed + i, *shape, scale=scale)) for i, (shape, scale) in enumerate(shapes))


def test_lora_linear_equals_official_lora_linear_in_bf16():
  """LoRALinear.forward (src/models/custom_modules/lora/lora_linear.py:23-29): W bf16 (frozen), B A a bf16
  matmul of the float32 LoRA, / r and + W in bf16, F.linear in bf16. Our kernel, lora_a, lora_b are W^T, A^T, B^T."""
  kernel, lora_a, lora_b = lora_variables(10)
  x = bf16(rand(13, 2, 5, 32))
  weight = bf16(np.asarray(kernel).T) + torch.matmul(bf16(np.asarray(lora_b).T), bf16(np.asarray(lora_a).T)) / 4
  expected = F.linear(x, weight)
  layer = ExpertDense(24, ("embed", "mlp"), ExpertConfig(mode="lora", rank=4, targets=("wi_0",)),
                      dtype=jnp.bfloat16, autocast=True, name="wi_0")
  got = layer.apply({"params": {"kernel": kernel}, "lora": {"lora_a": lora_a, "lora_b": lora_b}},
                    jnp.asarray(as_np(x), jnp.bfloat16))
  np.testing.assert_array_equal(jax_np(got), as_np(expected))


def test_gated_linear_equals_official_input_gate_in_bf16():
  """FFNExperts with learn_input_gate='only_sigmoid' over one bf16 expert (src/models/addons/moe.py:796-799, 842,
  686-711, 780-784) beside the bf16 host linear: sigmoid(sum(h * v)) in float32 (a bf16 x float32 product),
  h * gate in float32, bf16 matmuls through layer1 / layer2, times the bf16 weight 1, / r in bf16."""
  kernel, lora_a, lora_b = lora_variables(20)
  gate_vector = jnp.asarray(rand(23, 32, scale=0.3))
  x = bf16(rand(24, 2, 5, 32))
  gate = torch.sigmoid(torch.sum(x * torch.from_numpy(np.array(gate_vector)), dim=-1))
  inputs = x * gate.unsqueeze(-1)
  expert = (inputs.to(BF16) @ bf16(lora_a)) @ bf16(lora_b)
  expected = F.linear(x, bf16(np.asarray(kernel).T)) + expert * torch.tensor(1.0, dtype=BF16) / 4
  layer = ExpertDense(24, ("embed", "mlp"), ExpertConfig(mode="gated", rank=4, targets=("wi_0",)),
                      dtype=jnp.bfloat16, autocast=True, name="wi_0")
  got = layer.apply({"params": {"kernel": kernel}, "lora": {"lora_a": lora_a, "lora_b": lora_b},
                     "gates": {"gate": gate_vector}}, jnp.asarray(as_np(x), jnp.bfloat16))
  np.testing.assert_array_equal(jax_np(got), as_np(expected))


def official_routed(x, kernel, router, lora_a, lora_b, top_k, r):
  """Router._forward (moe.py:406-422, 480, 487) and FFNExperts._forward's dispatch (moe.py:670-711, 780-784)
  over bf16 parameters under CUDA autocast, beside the bf16 host linear."""
  hidden = x.reshape(-1, x.shape[-1])
  d_in = hidden.shape[-1]
  normed = [F.layer_norm(t.float(), (d_in,)).to(BF16) for t in (hidden, router)]  # layer_norm: float32
  scores = torch.matmul(normed[0], normed[1].T)
  scores = scores * math.sqrt(1 / d_in)
  probs = torch.softmax(scores.float(), dim=-1).to(BF16)
  top_w, top_i = torch.topk(probs, top_k, dim=-1)
  top_w = (top_w / (torch.sum(top_w.float(), dim=-1, keepdim=True) + 1e-6)).to(BF16)  # sum: float32 in autocast
  gates = torch.zeros_like(probs).scatter(1, top_i, top_w)
  out = torch.zeros(hidden.shape[0], lora_b.shape[-1], dtype=BF16)
  for e in range(router.shape[0]):
    rows = torch.nonzero(gates[:, e]).flatten()
    out = out.index_add(0, rows, ((hidden[rows] @ lora_a[e]) @ lora_b[e]) * gates[rows, e][:, None])
  return F.linear(x, kernel.T) + (out / r).reshape(*x.shape[:-1], -1), top_w, top_i


def test_routed_layer_equals_official_router_and_dispatch_in_bf16():
  """Scores, top-k weights (the top-k sum in float32: `sum` runs in float32 under CUDA autocast, so the quotient
  is float32 rounded once to bf16, moe.py:674-677) and the mixed output, bit for bit."""
  kernel, lora_a, lora_b = lora_variables(30, num=5)
  router = jnp.asarray(rand(33, 5, 32))
  x = bf16(rand(34, 2, 7, 32))
  expected, top_w, top_i = official_routed(x, bf16(kernel), bf16(router), bf16(lora_a), bf16(lora_b), 2, 4)
  layer = ExpertDense(24, ("embed", "mlp"), ExpertConfig(mode="routed", rank=4, num_experts=5, targets=("wi_0",)),
                      dtype=jnp.bfloat16, autocast=True, name="wi_0")
  got, state = layer.apply({"params": {"kernel": kernel},
                            "experts": {"lora_a": lora_a, "lora_b": lora_b, "router": router}},
                           jnp.asarray(as_np(x), jnp.bfloat16), mutable=["intermediates"])
  np.testing.assert_array_equal(np.asarray(state["intermediates"]["route_index"][0]).reshape(-1, 2), top_i.numpy())
  np.testing.assert_array_equal(jax_np(state["intermediates"]["route_weights"][0]).reshape(-1, 2), as_np(top_w))
  np.testing.assert_array_equal(jax_np(got), as_np(expected))


class CudaAutocastGelu(torch.nn.Module):
  """NewGELUActivation on a bf16 input as under CUDA autocast: `pow` in float32, so the result is float32."""

  def forward(self, gate):
    return cuda_autocast_gelu(gate)


def test_whole_model_equals_transformers_t5_in_bf16(tmp_path):
  """A tiny T5 under 'official' against transformers' T5 with every parameter in bf16 (the official evaluation
  casts all frozen parameters, src/models/manipulations/basic.py:54-59) under CPU torch.autocast, its eager
  attention (the 4.x attention of the official runs; sdpa's fused kernel rounds otherwise) and its GELU's `pow`
  in float32 as CUDA autocast runs it: the logits bit for bit, where 'float32' and 'bfloat16' differ. The model
  runs op by op (not jitted): XLA's fusions keep some bf16 intermediates in float32 unless the process runs
  with XLA_FLAGS=--xla_allow_excess_precision=false (algorithm.md §2)."""
  from phatgoose_jax.checkpoints.hf import load_hf
  from phatgoose_jax.models import EncoderDecoderModel, shift_right
  from test_parity_hf import CONFIGS, hf_model, padded_batch
  reference = hf_model(tmp_path, 0, **CONFIGS[0]).to(BF16)
  reference.set_attn_implementation("eager")
  for block in [*reference.encoder.block, *reference.decoder.block]:
    block.layer[-1].DenseReluDense.act = CudaAutocastGelu()
  config, params = load_hf(str(tmp_path))
  enc, tgt = padded_batch(0)
  dec_in = shift_right(tgt)
  with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
    expected = reference(input_ids=torch.tensor(enc, dtype=torch.long), attention_mask=torch.tensor(enc > 0),
                         decoder_input_ids=torch.tensor(dec_in, dtype=torch.long)).logits.float().numpy()
  valid = tgt > 0
  equal = {}
  for precision in utils.PRECISIONS:
    model = EncoderDecoderModel(config.replace(dropout_rate=0.0, **utils.precision_fields(precision)))
    logits = jax_np(model.module.apply({"params": params}, jnp.asarray(enc), jnp.asarray(dec_in), jnp.asarray(tgt)))
    equal[precision] = np.mean(logits[valid] == expected[valid])
  assert equal["official"] == 1.0
  assert equal["float32"] < 0.5 and equal["bfloat16"] < 0.5


@pytest.mark.parametrize("configured", [True, False])
def test_evaluation_runs_the_official_precision(saved, configured):
  """Configured (`utils.model_config.dtype`, the evaluate run's PRECISION) or given (`dtype`, the CLI's
  --dtype): the routed model computes in bf16 with the autocast roundings, over bf16 variables."""
  base, library = saved
  gin.clear_config()
  try:
    gin.parse_config(f"utils.model_config.dtype = '{'official' if configured else 'float32'}'")
    loaded = assembly.load_model(base, library, "phatgoose", dtype=None if configured else "official")
  finally:
    gin.clear_config()
  assert (loaded.model.config.dtype, loaded.model.config.autocast) == ("bfloat16", True)
  assert {x.dtype for x in jax.tree_util.tree_leaves(loaded.variables)} == {np.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("command", ["score", "generate", "serve"])
def test_cli_takes_the_official_precision(command):
  """--dtype names every precision; a bad one is a usage error (exit 2) naming the choices."""
  from phatgoose_jax import cli
  parser = cli.build_parser()
  args = parser.parse_args([command, "--base", "b", "--dtype", "official"])
  assert args.dtype == "official"
  with pytest.raises(SystemExit) as exit_info:
    parser.parse_args([command, "--base", "b", "--dtype", "fp16"])
  assert exit_info.value.code == 2


@pytest.mark.parametrize("mode", ["lora", "gated"])
def test_training_under_the_official_precision_keeps_float32_trainables(saved, mode):
  """train-expert / train-gate restore their base with the configured precision (`utils.restore_base`); the
  trained collection (LoRA, or the gates) and its gradient stay float32 through the bf16 autocast ops."""
  from phatgoose_jax.models import EncoderDecoderModel
  from random_trees import random_batch
  base, _ = saved
  gin.clear_config()
  try:
    gin.parse_config("utils.model_config.dtype = 'official'")
    restored = utils.restore_base(base)
  finally:
    gin.clear_config()
  assert (restored.config.dtype, restored.config.autocast) == ("bfloat16", True)
  model = EncoderDecoderModel(restored.config, ExpertConfig(mode=mode, rank=4))
  variables = model.get_initial_variables(jax.random.key(0))
  trained_lora = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape) * 0.1, variables["lora"])
  variables = {**variables, "params": restored.variables["params"], "lora": trained_lora}  # B != 0: gates learn
  trained = "lora" if mode == "lora" else "gates"
  batch = random_batch(1, batch=2, in_len=6, out_len=4)
  grads = jax.grad(lambda t: model.loss_fn({**variables, trained: t}, batch)[0])(variables[trained])
  leaves = jax.tree_util.tree_leaves(grads)
  assert {x.dtype for x in leaves} == {np.dtype(np.float32)}
  assert all(np.isfinite(np.asarray(x)).all() and np.abs(np.asarray(x)).max() > 0 for x in leaves)
