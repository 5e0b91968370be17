"""Hugging Face T5 v1.1 checkpoints (`config.json` + safetensors or PyTorch weights) <-> our t5x-style tree.

Hugging Face stores `nn.Linear` weights as `[out, in]`; our kernels are `[in, out]`, so every kernel is
transposed, as are `lm_head.weight` ([vocab, d_model] -> logits kernel [d_model, vocab]) and the relative
position bias ([buckets, heads] -> [heads, buckets]). The name table lives in `names.hf_param_names`.
"""
import json
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from phatgoose_jax.checkpoints import names
from phatgoose_jax.t5.config import T5Config

# HF config.json key -> T5Config field.
_CONFIG_KEYS = {
    "vocab_size": "vocab_size", "d_model": "d_model", "d_kv": "d_kv", "d_ff": "d_ff",
    "num_heads": "num_heads", "num_layers": "num_encoder_layers", "num_decoder_layers": "num_decoder_layers",
    "relative_attention_num_buckets": "relative_attention_num_buckets",
    "relative_attention_max_distance": "relative_attention_max_distance",
    "dropout_rate": "dropout_rate", "layer_norm_epsilon": "layer_norm_epsilon",
}
# Copies of `shared.weight` that some checkpoints also store.
_EMBEDDING_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# Present in old T5 checkpoints but never used by the model.
_UNUSED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def _lm_head_tied(hf: dict) -> bool:
  """Whether `lm_head` may share `shared.weight`; refuse the v1.0 tied-and-rescaled output.

  transformers >= 5 always sets `tie_word_embeddings: true` and records the v1.0 output rescaling
  (`d_model ** -0.5`) as `scale_decoder_outputs`; older versions use `tie_word_embeddings` for both.
  """
  tied = hf.get("tie_word_embeddings", True)
  if hf.get("scale_decoder_outputs", tied):
    raise ValueError("tie_word_embeddings must be false: this is a T5 v1.0-style checkpoint (tied, rescaled "
                     "output embedding), not T5 v1.1")
  return bool(tied)


def config_from_hf(hf: dict) -> T5Config:
  """A `T5Config` from a Hugging Face T5 `config.json` dict; refuses anything but T5 v1.1 (gated-GELU, untied)."""
  if hf.get("model_type", "t5") not in ("t5", "mt5"):
    raise ValueError(f"config.json model_type is {hf.get('model_type')!r}; expected a T5 v1.1 model ('t5')")
  if hf.get("feed_forward_proj") != "gated-gelu":
    raise ValueError(f"feed_forward_proj must be 'gated-gelu' (T5 v1.1), got {hf.get('feed_forward_proj')!r}")
  _lm_head_tied(hf)
  fields = {ours: hf[theirs] for theirs, ours in _CONFIG_KEYS.items() if hf.get(theirs) is not None}
  fields.setdefault("num_decoder_layers", fields.get("num_encoder_layers", T5Config.num_encoder_layers))
  return T5Config(**fields)


def config_to_hf(config: T5Config) -> dict:
  """The `config.json` dict that transformers' `T5ForConditionalGeneration` reads as this T5 v1.1 model."""
  hf = {theirs: getattr(config, ours) for theirs, ours in _CONFIG_KEYS.items()}
  hf.update(architectures=["T5ForConditionalGeneration"], model_type="t5", feed_forward_proj="gated-gelu",
            tie_word_embeddings=False, is_encoder_decoder=True, decoder_start_token_id=0, pad_token_id=0,
            eos_token_id=1, initializer_factor=1.0)
  return hf


def _to_numpy(tensor) -> np.ndarray:
  """A torch tensor as a float32 numpy array (bf16 included, which numpy cannot take directly)."""
  return tensor.detach().float().numpy() if tensor.is_floating_point() else tensor.numpy()


def _read_torch(path: str) -> Dict[str, np.ndarray]:
  """A PyTorch state-dict file; torch is imported only here."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"reading {path} needs PyTorch (pip install torch), or convert it to safetensors") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {k: _to_numpy(v) for k, v in state.items()}


def read_weights_file(path: str) -> Dict[str, np.ndarray]:
  """One `.safetensors` or PyTorch state-dict file as name -> numpy array."""
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    return load_file(path)
  return _read_torch(path)


def read_state_dict(directory: str) -> Dict[str, np.ndarray]:
  """The weights of a Hugging Face model directory: single or sharded safetensors, else PyTorch .bin."""
  for single, index in (("model.safetensors", "model.safetensors.index.json"),
                        ("pytorch_model.bin", "pytorch_model.bin.index.json")):
    if os.path.exists(os.path.join(directory, single)):
      return read_weights_file(os.path.join(directory, single))
    if os.path.exists(os.path.join(directory, index)):
      with open(os.path.join(directory, index)) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      state = {}
      for shard in shards:
        state.update(read_weights_file(os.path.join(directory, shard)))
      return state
  raise FileNotFoundError(f"no model.safetensors[.index.json] or pytorch_model.bin[.index.json] in {directory}")


def _drop_copies(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Remove the unused and duplicate entries, checking that embedding copies equal `shared.weight`."""
  state = {k: v for k, v in state.items() if k not in _UNUSED}
  for name in _EMBEDDING_COPIES:
    if name in state:
      copy = state.pop(name)
      shared = state.setdefault("shared.weight", copy)
      if shared.shape != copy.shape or not np.array_equal(shared, copy):
        raise ValueError(f"{name} differs from shared.weight; T5 ties input embeddings, so they must be equal")
  return state


def params_from_state_dict(config: T5Config, state: Dict[str, np.ndarray], lm_head_tied: bool = False) -> dict:
  """Our nested float32 tree from a Hugging Face T5 state dict; mismatches are listed by HF name and shape."""
  state = _drop_copies(state)
  if lm_head_tied and "lm_head.weight" not in state and "shared.weight" in state:
    state["lm_head.weight"] = state["shared.weight"]
  table = names.hf_param_names(config)
  shapes = names.param_shapes(config)
  expected = {hf: shapes[ours][::-1] if t else shapes[ours] for ours, (hf, t) in table.items()}
  names.check_shapes(expected, {k: v.shape for k, v in state.items()}, "Hugging Face checkpoint")
  flat = {ours: np.asarray(state[hf].T if t else state[hf], np.float32) for ours, (hf, t) in table.items()}
  return names.unflatten(flat)


def state_dict_from_params(config: T5Config, params: dict) -> Dict[str, np.ndarray]:
  """A Hugging Face T5 state dict (float32, contiguous) from our tree."""
  flat = {k: np.asarray(v, np.float32) for k, v in names.flatten(params).items()}
  names.check_shapes(names.param_shapes(config), {k: v.shape for k, v in flat.items()}, "parameter tree")
  return {hf: np.ascontiguousarray(flat[ours].T if t else flat[ours])
          for ours, (hf, t) in names.hf_param_names(config).items()}


def safetensors_files(directory: str) -> Optional[List[str]]:
  """The safetensors weight files of a model directory (single or sharded), or None when it has none."""
  if os.path.exists(os.path.join(directory, "model.safetensors")):
    return [os.path.join(directory, "model.safetensors")]
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      return [os.path.join(directory, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
  return None


def _sliced_params(config: T5Config, files: List[str], tied: bool, shardings: dict, dtype) -> dict:
  """Our params placed by `shardings`, each device's slice read from the safetensors files (`get_slice`);
  a transposed kernel's slice `[i, j]` is the stored `[j, i]` slice, transposed."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  where, found = {}, {}
  for path in files:
    with safe_open(path, framework="numpy") as handle:
      for key in handle.keys():
        where[key], found[key] = path, tuple(handle.get_slice(key).get_shape())
  table = names.hf_param_names(config)
  if tied and "lm_head.weight" not in where:
    table = {ours: ("shared.weight", t) if hf == "lm_head.weight" else (hf, t) for ours, (hf, t) in table.items()}
  shapes = names.param_shapes(config)
  expected = {hf: shapes[ours][::-1] if t else shapes[ours] for ours, (hf, t) in table.items()}
  stored = {k: v for k, v in found.items() if k in expected or k not in _EMBEDDING_COPIES + _UNUSED}
  names.check_shapes(expected, stored, "Hugging Face checkpoint")

  def read(ours, index):  # the file is mapped only while one slice is copied out: its pages leave the RSS
    hf, transposed = table[ours]
    with safe_open(where[hf], framework="numpy") as handle:
      part = handle.get_slice(hf)[tuple(index[::-1]) if transposed else tuple(index)]
      return np.array(part.T if transposed else part, dtype, order="C")  # one copy: nothing keeps the map
  return names.unflatten(names.place_sliced(shapes, names.flatten(shardings), dtype, read))


def load_hf(directory: str, shardings: Optional[dict] = None, dtype=np.float32) -> Tuple[T5Config, dict]:
  """`(T5Config, params)` from a Hugging Face T5 v1.1 directory (`config.json` + weights).

  With `shardings` (a tree of our params' `NamedSharding`s) and safetensors weights, every array is read
  slice by slice straight into its sharding in `dtype` (`names.place_sliced`); else whole float32 arrays."""
  with open(os.path.join(directory, "config.json")) as f:
    hf = json.load(f)
  config = config_from_hf(hf)
  files = safetensors_files(directory)
  if shardings is not None and files is not None:
    return config, _sliced_params(config, files, _lm_head_tied(hf), shardings, dtype)
  return config, params_from_state_dict(config, read_state_dict(directory), _lm_head_tied(hf))


def save_hf(directory: str, config: T5Config, params: dict) -> None:
  """Write `config.json` + `model.safetensors` that `T5ForConditionalGeneration.from_pretrained` loads."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  state = state_dict_from_params(config, params)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config_to_hf(config), f, indent=2, sort_keys=True)
  save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
