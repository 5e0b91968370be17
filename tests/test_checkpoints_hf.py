"""Hugging Face T5 checkpoints <-> our tree, proven against transformers' own T5 (tiny, random, offline)."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from phatgoose_jax.checkpoints import hf, names  # pylint: disable=wrong-import-position
from phatgoose_jax.t5.config import T5Config, preset  # pylint: disable=wrong-import-position

TINY = dict(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_heads=4, num_layers=2, num_decoder_layers=3,
            relative_attention_num_buckets=8, relative_attention_max_distance=20)


def tiny_hf_model(seed: int = 0):
  """A random T5 v1.1 in transformers, with an lm_head of its own (transformers 5 ties it at init)."""
  torch.manual_seed(seed)
  config = transformers.T5Config(feed_forward_proj="gated-gelu", tie_word_embeddings=False, **TINY)
  model = transformers.T5ForConditionalGeneration(config).eval()
  model.lm_head.weight = torch.nn.Parameter(torch.randn(TINY["vocab_size"], TINY["d_model"]))
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.rand_like(p))  # layer norms start at exactly 1: make every value distinctive
  return model


def _weights(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  model = tiny_hf_model()
  path = str(tmp_path_factory.mktemp("hf"))
  model.save_pretrained(path)
  return path, _weights(model)


def test_names_round_trip_and_count():
  xl = preset("xl")
  paths = names.module_paths(xl)
  assert len(paths) == 24 * 7 + 24 * 11  # encoder: q, k, v, o, wi_0, wi_1, wo; decoder adds cross-attention
  assert [names.from_hf_module(names.to_hf_module(p)) for p in paths] == paths
  assert names.to_hf_module("encoder/layers_0/attention/query") == "encoder.block.0.layer.0.SelfAttention.q"
  assert names.to_hf_module("decoder/layers_1/encoder_decoder_attention/value") == \
      "decoder.block.1.layer.1.EncDecAttention.v"
  assert names.to_hf_module("decoder/layers_0/mlp/wo") == "decoder.block.0.layer.2.DenseReluDense.wo"
  assert names.from_hf_module("encoder.block.3.layer.1.DenseReluDense.wi_1") == "encoder/layers_3/mlp/wi_1"
  for bad in ("encoder.block.0.layer.1.EncDecAttention.q", "decoder.block.0.layer.2.SelfAttention.q"):
    with pytest.raises(ValueError):
      names.from_hf_module(bad)
  tree = {"a": {"b": 1, "c": {"d": 2}}}
  assert names.unflatten(names.flatten(tree)) == tree


def test_load_hf_maps_every_value_exactly(hf_dir):
  path, weights = hf_dir
  config, params = hf.load_hf(path)
  assert config == T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_heads=4, num_encoder_layers=2,
                            num_decoder_layers=3, relative_attention_num_buckets=8,
                            relative_attention_max_distance=20)
  flat = names.flatten(params)
  assert set(flat) == set(names.param_shapes(config))
  np.testing.assert_array_equal(flat["encoder/layers_1/attention/query/kernel"],
                                weights["encoder.block.1.layer.0.SelfAttention.q.weight"].T)
  np.testing.assert_array_equal(flat["decoder/layers_2/encoder_decoder_attention/out/kernel"],
                                weights["decoder.block.2.layer.1.EncDecAttention.o.weight"].T)
  np.testing.assert_array_equal(flat["decoder/layers_0/mlp/wo/kernel"],
                                weights["decoder.block.0.layer.2.DenseReluDense.wo.weight"].T)
  np.testing.assert_array_equal(flat["decoder/layers_1/pre_cross_attention_layer_norm/scale"],
                                weights["decoder.block.1.layer.1.layer_norm.weight"])
  np.testing.assert_array_equal(flat["encoder/relpos_bias/rel_embedding"],
                                weights["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].T)
  np.testing.assert_array_equal(flat["token_embedder/embedding"], weights["shared.weight"])
  np.testing.assert_array_equal(flat["decoder/logits_dense/kernel"], weights["lm_head.weight"].T)
  for ours, (name, transposed) in names.hf_param_names(config).items():
    np.testing.assert_array_equal(flat[ours], weights[name].T if transposed else weights[name])
    assert flat[ours].dtype == np.float32


def test_save_hf_loads_in_transformers_identically(hf_dir, tmp_path):
  path, weights = hf_dir
  config, params = hf.load_hf(path)
  hf.save_hf(str(tmp_path), config, params)
  model = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  assert model.config.d_ff == 24 and model.config.num_decoder_layers == 3
  assert model.config.feed_forward_proj == "gated-gelu"
  reloaded = _weights(model)
  assert set(reloaded) == set(weights)
  for k, v in weights.items():
    np.testing.assert_array_equal(reloaded[k], v, err_msg=k)
  original = transformers.T5ForConditionalGeneration.from_pretrained(path).eval()
  ids = torch.tensor([[3, 5, 7, 1]])
  with torch.no_grad():
    expect = original(input_ids=ids, decoder_input_ids=ids).logits
    got = model(input_ids=ids, decoder_input_ids=ids).logits
  torch.testing.assert_close(got, expect, rtol=0, atol=0)


def test_pytorch_bin_and_sharded_safetensors(hf_dir, tmp_path):
  from safetensors.numpy import save_file
  path, weights = hf_dir
  _, expected = hf.load_hf(path)
  config_json = open(os.path.join(path, "config.json")).read()
  bin_dir, shard_dir = tmp_path / "bin", tmp_path / "sharded"
  for d in (bin_dir, shard_dir):
    d.mkdir()
    (d / "config.json").write_text(config_json)
  torch.save({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in weights.items()}, bin_dir / "pytorch_model.bin")
  keys = sorted(weights)
  shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
  for name, part in shards.items():
    save_file({k: weights[k] for k in part}, str(shard_dir / name), metadata={"format": "pt"})
  index = {"metadata": {}, "weight_map": {k: n for n, part in shards.items() for k in part}}
  (shard_dir / "model.safetensors.index.json").write_text(json.dumps(index))
  _, sharded = hf.load_hf(str(shard_dir))
  for k, v in names.flatten(expected).items():
    np.testing.assert_array_equal(names.flatten(sharded)[k], v)
  _, from_bin = hf.load_hf(str(bin_dir))
  for k, v in names.flatten(expected).items():
    got = names.flatten(from_bin)[k]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, v, rtol=1e-2)


def _copy_dir(src, dst, edit_config=None, edit_weights=None):
  from safetensors.numpy import load_file, save_file
  dst.mkdir()
  config = json.load(open(os.path.join(src, "config.json")))
  weights = load_file(os.path.join(src, "model.safetensors"))
  (edit_config or (lambda c: None))(config)
  (edit_weights or (lambda w: None))(weights)
  (dst / "config.json").write_text(json.dumps(config))
  save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
  return str(dst)


def test_mismatch_lists_names_and_shapes(hf_dir, tmp_path):
  path, _ = hf_dir

  def edit(w):
    del w["encoder.final_layer_norm.weight"]
    w["encoder.block.0.layer.0.SelfAttention.extra.weight"] = np.zeros((2, 2), np.float32)

  bad = _copy_dir(path, tmp_path / "bad", lambda c: c.update(d_ff=32), edit)
  with pytest.raises(ValueError) as err:
    hf.load_hf(bad)
  message = str(err.value)
  assert "shape of encoder.block.0.layer.1.DenseReluDense.wi_0.weight: expected (32, 16), found (24, 16)" in message
  assert "shape of decoder.block.2.layer.2.DenseReluDense.wo.weight: expected (16, 32), found (16, 24)" in message
  assert "missing encoder.final_layer_norm.weight: expected shape (16,)" in message
  assert "unexpected encoder.block.0.layer.0.SelfAttention.extra.weight: shape (2, 2)" in message


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.update(feed_forward_proj="relu"), "feed_forward_proj must be 'gated-gelu'"),
    (lambda c: (c.update(tie_word_embeddings=True), c.pop("scale_decoder_outputs", None)),
     "tie_word_embeddings must be false"),
    (lambda c: c.update(model_type="bart"), "model_type"),
])
def test_refuses_configs_that_are_not_t5_v1_1(hf_dir, tmp_path, edit, words):
  with pytest.raises(ValueError, match=words):
    hf.load_hf(_copy_dir(hf_dir[0], tmp_path / "c", edit))


def test_embedding_copies_are_checked_and_tied_head_is_shared(hf_dir, tmp_path):
  path, weights = hf_dir

  def differing_copy(w):
    w["encoder.embed_tokens.weight"] = w["shared.weight"] + 1

  with pytest.raises(ValueError, match="encoder.embed_tokens.weight differs from shared.weight"):
    hf.load_hf(_copy_dir(path, tmp_path / "copy", edit_weights=differing_copy))
  # transformers >= 5 writes tie_word_embeddings=true, scale_decoder_outputs=false and may drop lm_head.
  tied = _copy_dir(path, tmp_path / "tied", lambda c: c.update(tie_word_embeddings=True, scale_decoder_outputs=False),
                   lambda w: w.pop("lm_head.weight"))
  _, params = hf.load_hf(tied)
  np.testing.assert_array_equal(params["decoder"]["logits_dense"]["kernel"], weights["shared.weight"].T)
