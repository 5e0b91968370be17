"""The T5 network and its experts: parameter layout, cached decoding, and the expert modes."""
import json
import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util

from phatgoose_jax.models import EncoderDecoderModel, shift_right, unbox
from phatgoose_jax.t5.config import preset
from phatgoose_jax.experts.config import ExpertConfig

from random_trees import cached_decoding_logits, random_batch

GOLDEN = pathlib.Path(__file__).parent / "testdata" / "t5_tiny_params.json"
CFG = preset("tiny")


def layout(variables: dict) -> dict:
  """{'collection/path/to/leaf': {'shape': [...], 'axes': [...]}} of a boxed variables tree."""
  specs = nn.get_partition_spec(variables)
  flat = traverse_util.flatten_dict(unbox(variables), sep="/")
  flat_specs = traverse_util.flatten_dict(specs, sep="/")
  return {k: {"shape": list(v.shape), "axes": list(flat_specs[k])} for k, v in sorted(flat.items())}


def routed_layout():
  model = EncoderDecoderModel(CFG, ExpertConfig(mode="routed", rank=4, num_experts=3))
  return layout(model.get_initial_variables(jax.random.PRNGKey(0)))


def randomize(tree, seed, scale=0.3):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return treedef.unflatten([jax.random.normal(k, x.shape) * scale for k, x in zip(keys, leaves)])


def test_parameter_tree_matches_golden_t5x_layout():
  assert routed_layout() == json.loads(GOLDEN.read_text())


def test_base_tree_is_t5x():
  params = layout(EncoderDecoderModel(CFG).get_initial_variables(jax.random.PRNGKey(0)))
  assert params["params/encoder/layers_0/attention/query/kernel"]["axes"] == ["embed", "joined_kv"]
  assert params["params/decoder/layers_1/encoder_decoder_attention/out/kernel"]["axes"] == ["joined_kv", "embed"]
  assert params["params/decoder/logits_dense/kernel"]["shape"] == [CFG.d_model, CFG.vocab_size]
  assert params["params/token_embedder/embedding"]["axes"] == ["vocab", "embed"]
  assert params["params/encoder/relpos_bias/rel_embedding"]["axes"] == ["heads", "relpos_buckets"]


@pytest.mark.parametrize("mode", ["none", "lora", "gated", "routed"])
def test_cached_decoding_equals_full_forward(mode):
  experts = ExpertConfig(mode=mode, rank=4, num_experts=3 if mode == "routed" else 0, top_k=2)
  model = EncoderDecoderModel(CFG, experts)
  variables = unbox(model.get_initial_variables(jax.random.PRNGKey(1)))
  for collection in ("lora", "gates", "experts"):
    if collection in variables:
      variables[collection] = randomize(variables[collection], 2)
  batch = random_batch()
  full = np.asarray(model.logits(variables, batch))
  valid = batch["decoder_target_tokens"] > 0
  np.testing.assert_allclose(cached_decoding_logits(model, variables, batch)[valid], full[valid], atol=1e-4)


def test_greedy_decoding_follows_argmax_of_full_forward():
  """By causality, one teacher-forced forward on the greedy output predicts each of its tokens."""
  model = EncoderDecoderModel(CFG)
  variables = unbox(model.get_initial_variables(jax.random.PRNGKey(3)))
  enc = random_batch()["encoder_input_tokens"]
  out, aux = model.jit_predict(variables, {"encoder_input_tokens": enc, "decoder_input_tokens": np.zeros((len(enc), 5), np.int32)})
  out = np.asarray(out)
  batch = {"encoder_input_tokens": enc, "decoder_input_tokens": shift_right(out),
           "decoder_target_tokens": np.ones_like(out)}
  expected = np.argmax(np.asarray(model.logits(variables, batch)), -1)
  before_eos = np.cumsum(out == 1, axis=1) - (out == 1) == 0
  np.testing.assert_array_equal(out[before_eos], expected[before_eos])
  logits = np.asarray(model.logits(variables, batch), np.float64)
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  chosen = np.take_along_axis(log_probs, out[..., None], -1)[..., 0] * before_eos
  np.testing.assert_allclose(np.asarray(aux["scores"]), chosen.sum(-1), rtol=1e-4, atol=1e-4)


def test_score_batch_sums_and_averages_over_non_pad_targets():
  model = EncoderDecoderModel(CFG)
  variables = unbox(model.get_initial_variables(jax.random.PRNGKey(4)))
  batch = random_batch()
  score, aux = model.score_batch(variables, batch, return_intermediates=True)
  scores = {k: np.asarray(aux[k]) for k in ("sum_logprob", "mean_logprob", "num_target_tokens")}
  np.testing.assert_array_equal(np.asarray(score), scores["mean_logprob"])
  np.testing.assert_array_equal(np.asarray(model.score_batch(variables, batch)), scores["mean_logprob"])
  summed = EncoderDecoderModel(CFG, length_normalize=False)
  np.testing.assert_allclose(np.asarray(summed.score_batch(variables, batch)), scores["sum_logprob"], rtol=1e-6)
  logits = np.asarray(model.logits(variables, batch), np.float64)
  log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
      logits.max(-1, keepdims=True)
  tgt = batch["decoder_target_tokens"]
  token_ll = np.take_along_axis(log_probs, tgt[..., None], -1)[..., 0] * (tgt > 0)
  np.testing.assert_allclose(scores["sum_logprob"], token_ll.sum(-1), rtol=1e-5)
  np.testing.assert_allclose(scores["num_target_tokens"], (tgt > 0).sum(-1))
  np.testing.assert_allclose(scores["mean_logprob"], token_ll.sum(-1) / (tgt > 0).sum(-1), rtol=1e-5)


def single_and_routed(seed=5, num_experts=1, top_k=1, impl="dense"):
  single = EncoderDecoderModel(CFG, ExpertConfig(mode="lora", rank=4))
  routed = EncoderDecoderModel(CFG, ExpertConfig(mode="routed", rank=4, num_experts=num_experts, top_k=top_k,
                                                 impl=impl))
  base = unbox(single.get_initial_variables(jax.random.PRNGKey(seed)))
  base["lora"] = randomize(base["lora"], seed + 1)
  experts = unbox(routed.get_initial_variables(jax.random.PRNGKey(seed)))["experts"]
  return single, routed, base, randomize(experts, seed + 2)


def test_one_expert_top1_equals_single_expert_model():
  single, routed, variables, experts = single_and_routed()
  flat_lora = traverse_util.flatten_dict(variables["lora"])
  flat_experts = traverse_util.flatten_dict(experts)
  for key in flat_experts:
    if key[-1] in ("lora_a", "lora_b"):
      flat_experts[key] = flat_lora[key][None]
  routed_vars = {"params": variables["params"], "experts": traverse_util.unflatten_dict(flat_experts)}
  batch = random_batch(6)
  np.testing.assert_allclose(np.asarray(routed.logits(routed_vars, batch)), np.asarray(single.logits(variables, batch)),
                             atol=1e-5)


@pytest.mark.parametrize("impl", ["gather", "ragged"])
def test_fast_routing_paths_equal_dense_in_the_full_model(impl):
  _, dense, variables, experts = single_and_routed(num_experts=5, top_k=2)
  _, fast, _, _ = single_and_routed(num_experts=5, top_k=2, impl=impl)
  routed_vars = {"params": variables["params"], "experts": experts}
  batch = random_batch(7)
  np.testing.assert_allclose(np.asarray(fast.logits(routed_vars, batch)), np.asarray(dense.logits(routed_vars, batch)),
                             atol=1e-5)


def test_gate_is_sigmoid_of_dot_product():
  """A zero gate halves the LoRA update: W u + sigmoid(0) B A u / r (algorithm.md §3)."""
  lora = EncoderDecoderModel(CFG, ExpertConfig(mode="lora", rank=4))
  gated = EncoderDecoderModel(CFG, ExpertConfig(mode="gated", rank=4))
  variables = unbox(gated.get_initial_variables(jax.random.PRNGKey(8)))
  variables["lora"] = randomize(variables["lora"], 9)
  halved = {"params": variables["params"], "lora": jax.tree.map(lambda x: x, variables["lora"])}
  flat = traverse_util.flatten_dict(halved["lora"])
  halved["lora"] = traverse_util.unflatten_dict({k: v * 0.5 if k[-1] == "lora_b" else v for k, v in flat.items()})
  batch = random_batch(9)
  np.testing.assert_allclose(np.asarray(gated.logits(variables, batch)), np.asarray(lora.logits(halved, batch)),
                             atol=1e-5)


def test_bfloat16_compute_keeps_float32_parameters():
  model = EncoderDecoderModel(CFG.replace(dtype="bfloat16"), ExpertConfig(mode="lora", rank=4))
  variables = unbox(model.get_initial_variables(jax.random.PRNGKey(10)))
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(variables))
  f32 = EncoderDecoderModel(CFG, ExpertConfig(mode="lora", rank=4))
  batch = random_batch(10)
  low, high = np.asarray(model.logits(variables, batch)), np.asarray(f32.logits(variables, batch))
  assert low.dtype == np.float32 and np.abs(low - high).max() < 0.1 * np.abs(high).max()


if __name__ == "__main__":
  lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in routed_layout().items()]
  GOLDEN.write_text("{\n" + ",\n".join(lines) + "\n}\n")
