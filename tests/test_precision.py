"""The bf16 evaluation option (algorithm.md §4): bf16 parameters and router math as the official bf16
evaluation computes them (r-three/phatgoose src/models/addons/moe.py under torch.autocast), float32 the default."""
import math

import gin
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from phatgoose_jax import assembly
from phatgoose_jax import library as lib
from phatgoose_jax.checkpoints import names, native
from phatgoose_jax.experts import routing

from random_trees import TINY, random_batch, random_expert, random_params

BF16 = ml_dtypes.bfloat16


def bf16(x):
  return np.asarray(x, np.float32).astype(BF16).astype(np.float64)


def np_layer_norm(x):
  x = np.asarray(x, np.float64)
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)


def test_bf16_scores_round_as_the_official_autocast():
  """moe.py:406-420 under autocast: LayerNorm in float32, bf16 matmul (rounded output), bf16 scaling."""
  rng = np.random.default_rng(0)
  u = (3 * rng.standard_normal((64, 48))).astype(BF16)
  router = rng.standard_normal((7, 48)).astype(np.float32)
  got = routing.phatgoose_scores(jnp.asarray(u), jnp.asarray(router))
  assert got.dtype == jnp.bfloat16
  dots = bf16(bf16(np_layer_norm(u.astype(np.float32))) @ bf16(np_layer_norm(bf16(router))).T)
  expected = bf16(dots * math.sqrt(1 / 48))
  np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=2 ** -7)  # at most one bf16 step apart
  assert np.mean(np.asarray(got, np.float64) == expected) > 0.95


def test_bf16_top_k_weights_round_before_choosing():
  """moe.py:480-487: softmax in float32 rounded to bf16; moe.py:670-677: renormalised in float32, rounded."""
  rng = np.random.default_rng(1)
  scores = rng.standard_normal((256, 9)).astype(BF16)
  weights, index = routing.top_k_weights(jnp.asarray(scores), 2)
  assert weights.dtype == jnp.bfloat16
  s = scores.astype(np.float64)
  probs = bf16(np.exp(s - s.max(-1, keepdims=True)) / np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True))
  top = np.take_along_axis(probs, np.asarray(index), axis=-1)
  assert np.all(top[:, 0] >= top[:, 1]) and np.all(top[:, 1:2] >= np.sort(probs, -1)[:, -2:-1])
  np.testing.assert_allclose(np.asarray(weights, np.float64), bf16(top / (top.sum(-1, keepdims=True) + 1e-6)),
                             rtol=2 ** -8)
  weights32, _ = routing.top_k_weights(jnp.asarray(scores, jnp.float32), 2)
  assert weights32.dtype == jnp.float32


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  root = tmp_path_factory.mktemp("precision")
  params = random_params()
  native.save_native(str(root / "base"), {"params": params}, TINY)
  library = lib.ExpertLibrary(str(root / "lib"))
  for i, name in enumerate(["a", "b", "c"]):
    lora, gates = random_expert(i)
    library.add(name, lora, base=lib.base_fingerprint(TINY, params), gates=gates)
  return str(root / "base"), library.path


def logits_and_routes(loaded):
  batch = random_batch(2, batch=4, in_len=12, out_len=8)
  logits, state = loaded.model.logits(loaded.variables, batch, mutable=("intermediates",))
  return np.asarray(logits, np.float32), {k: v[0] for k, v in names.flatten(state["intermediates"]).items()}


def test_bf16_option_runs_bf16_and_stays_close_to_float32(saved):
  base, library = saved
  full = assembly.load_model(base, library, "phatgoose", impl="dense")
  half = assembly.load_model(base, library, "phatgoose", impl="dense", dtype="bfloat16")
  assert {x.dtype for x in jax.tree_util.tree_leaves(full.variables)} == {np.dtype(np.float32)}
  assert {x.dtype for x in jax.tree_util.tree_leaves(half.variables)} == {np.dtype(BF16)}
  logits32, routes32 = logits_and_routes(full)
  logits16, routes16 = logits_and_routes(half)
  weights = [k for k in routes16 if k.endswith("route_weights")]
  assert weights and all(routes16[k].dtype == jnp.bfloat16 and routes32[k].dtype == jnp.float32 for k in weights)
  assert np.mean(np.abs(logits16 - logits32)) < 0.1 * np.mean(np.abs(logits32))
  assert np.mean(logits16.argmax(-1) == logits32.argmax(-1)) > 0.85
  index = [k for k in routes16 if k.endswith("route_index")]
  same = np.mean([np.mean(np.sort(routes16[k], -1) == np.sort(routes32[k], -1)) for k in index])
  assert same > 0.8


def test_the_configured_dtype_switches_evaluation_to_bf16(saved):
  base, library = saved
  gin.clear_config()
  try:
    gin.parse_config("utils.model_config.dtype = 'bfloat16'")
    loaded = assembly.load(base, library, "phatgoose")
  finally:
    gin.clear_config()
  assert loaded.model.config.dtype == "bfloat16"
  assert {x.dtype for x in jax.tree_util.tree_leaves(loaded.variables)} == {np.dtype(BF16)}
  assert assembly.load(base, library, "phatgoose").model.config.dtype == "float32"
