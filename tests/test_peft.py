"""PEFT LoRA adapters for T5: files written exactly as `PeftModel.save_pretrained` writes them.

`peft` is not installed here, so the adapter is built by hand in PEFT's format: `adapter_config.json`
(LoraConfig fields) and `adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight` [r, d_in]
and `base_model.model.<module>.lora_B.weight` [d_out, r], adapter name stripped. PEFT's forward is
`W u + (alpha / r) B A u` (`alpha / sqrt(r)` with rsLoRA).
"""
import json
import math
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from phatgoose_jax.checkpoints import names, peft
from phatgoose_jax.t5.config import preset

CONFIG = preset("tiny")
RANK = 4


def peft_config(**overrides):
  cfg = {"alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "google/t5-small-lm-adapt",
         "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
         "layer_replication": None, "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
         "lora_alpha": 8, "lora_dropout": 0.1, "megatron_config": None, "megatron_core": "megatron.core",
         "modules_to_save": None, "peft_type": "LORA", "r": RANK, "rank_pattern": {}, "revision": None,
         "target_modules": ["q", "v"], "task_type": "SEQ_2_SEQ_LM", "use_dora": False, "use_rslora": False}
  cfg.update(overrides)
  return cfg


def peft_weights(modules, seed=0):
  """HF module name -> (A [r, in], B [out, r]) for the given HF modules, random (B non-zero)."""
  rng = np.random.default_rng(seed)
  out = {}
  for module in modules:
    d_in, d_out = names.linear_shape(CONFIG, names.from_hf_module(module))
    out[module] = (rng.standard_normal((RANK, d_in)).astype(np.float32),
                   rng.standard_normal((d_out, RANK)).astype(np.float32))
  return out


def write_adapter(directory, cfg, weights, extra=None):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "adapter_config.json"), "w") as f:
    json.dump(cfg, f)
  tensors = {}
  for module, (a, b) in weights.items():
    tensors[f"base_model.model.{module}.lora_A.weight"] = a
    tensors[f"base_model.model.{module}.lora_B.weight"] = b
  tensors.update(extra or {})
  save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
  return str(directory)


def qv_modules():
  return [names.to_hf_module(p) for p in names.module_paths(CONFIG, ("query", "value"))]


@pytest.mark.parametrize("use_rslora", [False, True])
def test_import_matches_peft_numerics(tmp_path, use_rslora):
  weights = peft_weights(qv_modules())
  adapter = peft.load_peft(write_adapter(tmp_path, peft_config(use_rslora=use_rslora), weights), CONFIG)
  assert adapter.rank == RANK and adapter.targets == ("query", "value")
  assert len(adapter.lora) == 2 * len(qv_modules())
  module = "decoder.block.1.layer.1.EncDecAttention.v"
  ours = names.from_hf_module(module)
  a, b = weights[module]
  rng = np.random.default_rng(1)
  w = rng.standard_normal((CONFIG.joined_kv, CONFIG.d_model)).astype(np.float32)  # HF weight [out, in]
  u = rng.standard_normal((5, CONFIG.d_model)).astype(np.float32)
  scale = 8 / (math.sqrt(RANK) if use_rslora else RANK)
  expected = np.stack([w @ x + scale * (b @ (a @ x)) for x in u.astype(np.float64)])
  kernel = w.T
  got = u @ kernel + (u @ adapter.lora[f"{ours}/lora_a"] @ adapter.lora[f"{ours}/lora_b"]) / RANK
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_target_modules_are_honoured(tmp_path):
  weights = peft_weights(qv_modules())
  missing = dict(weights)
  missing.pop("encoder.block.1.layer.0.SelfAttention.v")
  with pytest.raises(ValueError, match=r"targeted but missing \['encoder.block.1.layer.0.SelfAttention.v'\]"):
    peft.load_peft(write_adapter(tmp_path / "missing", peft_config(), missing), CONFIG)
  stray = dict(weights, **peft_weights(["decoder.block.0.layer.2.DenseReluDense.wo"]))
  with pytest.raises(ValueError, match=r"not targeted but present \['decoder.block.0.layer.2.DenseReluDense.wo'\]"):
    peft.load_peft(write_adapter(tmp_path / "stray", peft_config(), stray), CONFIG)
  regex = r".*encoder.*SelfAttention\.(q|v)"
  encoder_first = {m: w for m, w in weights.items() if m.startswith("encoder.block.0.")}
  cfg = peft_config(target_modules=regex, layers_to_transform=[0])
  adapter = peft.load_peft(write_adapter(tmp_path / "regex", cfg, encoder_first), CONFIG)
  assert sorted(k.rsplit("/", 1)[0] for k in adapter.lora if k.endswith("lora_a")) == [
      "encoder/layers_0/attention/query", "encoder/layers_0/attention/value"]
  everything = peft_weights([names.to_hf_module(p) for p in names.module_paths(CONFIG)])
  adapter = peft.load_peft(write_adapter(tmp_path / "all", peft_config(target_modules="all-linear"), everything),
                           CONFIG)
  assert adapter.targets == ("query", "key", "value", "out", "wi_0", "wi_1", "wo")


@pytest.mark.parametrize("scale", [None, 0.5])
def test_export_import_round_trip_is_exact(tmp_path, scale):
  rng = np.random.default_rng(2)
  lora = {}
  for path in names.module_paths(CONFIG, ("query", "wi_1", "wo")):
    d_in, d_out = names.linear_shape(CONFIG, path)
    lora[f"{path}/lora_a"] = rng.standard_normal((d_in, RANK)).astype(np.float32)
    lora[f"{path}/lora_b"] = rng.standard_normal((RANK, d_out)).astype(np.float32)
  peft.save_peft(str(tmp_path), lora, CONFIG, scale=scale, base_model_name_or_path="google/t5-small-lm-adapt")
  with open(tmp_path / "adapter_config.json") as f:
    cfg = json.load(f)
  assert cfg["target_modules"] == ["q", "wi_1", "wo"] and cfg["r"] == RANK
  adapter = peft.load_peft(str(tmp_path), CONFIG)
  assert adapter.targets == ("query", "wi_1", "wo")
  assert set(adapter.lora) == set(lora)
  for k, v in lora.items():
    if scale is None:
      np.testing.assert_array_equal(adapter.lora[k], v)
    else:  # imported for our default 1/r: lora_b carries scale * r
      factor = scale * RANK if k.endswith("lora_b") else 1.0
      np.testing.assert_allclose(adapter.lora[k], v * factor, rtol=1e-6)


@pytest.mark.parametrize("overrides, extra, words", [
    ({"rank_pattern": {"q": 8}}, None, "per-module ranks"),
    ({"bias": "lora_only"}, None, "only bias='none'"),
    ({"use_dora": True}, None, "DoRA"),
    ({"fan_in_fan_out": True}, None, "fan_in_fan_out"),
    ({"peft_type": "IA3"}, None, "only 'LORA'"),
    ({}, {"base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_magnitude_vector": np.ones(32, np.float32)},
     "DoRA magnitude"),
    ({}, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((RANK, 8), np.float32)},
     "not a T5 LoRA adapter"),
])
def test_refuses_what_it_cannot_represent(tmp_path, overrides, extra, words):
  path = write_adapter(tmp_path, peft_config(**overrides), peft_weights(qv_modules()), extra)
  with pytest.raises(ValueError, match=words):
    peft.load_peft(path)
