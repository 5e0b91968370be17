"""Parameter and module names: our t5x-style tree <-> Hugging Face T5, written once for every format.

Our base tree is t5x's T5 1.1 tree (`encoder/layers_0/attention/query/kernel`, kernels `[in, out]`).
Expert collections are flat dicts keyed by '/'-joined module paths (`encoder/layers_0/attention/query`)
plus a leaf name (`lora_a`, `lora_b`, `gate`). Hugging Face names the same linear modules
`encoder.block.0.layer.0.SelfAttention.q` and stores `[out, in]` weights.
"""
import re
from typing import Callable, Dict, Iterable, List, Mapping, Tuple

import jax
import numpy as np

from phatgoose_jax.t5.config import ALL_TARGETS, T5Config

# Our attention sub-module name -> Hugging Face projection name.
_HF_ATTENTION = {"query": "q", "key": "k", "value": "v", "out": "o"}
_OUR_ATTENTION = {v: k for k, v in _HF_ATTENTION.items()}

# (stack, our block name) -> (HF sub-layer index, HF block class attribute).
_BLOCKS = {
    ("encoder", "attention"): (0, "SelfAttention"),
    ("encoder", "mlp"): (1, "DenseReluDense"),
    ("decoder", "self_attention"): (0, "SelfAttention"),
    ("decoder", "encoder_decoder_attention"): (1, "EncDecAttention"),
    ("decoder", "mlp"): (2, "DenseReluDense"),
}
_HF_BLOCKS = {(stack, idx, cls): block for (stack, block), (idx, cls) in _BLOCKS.items()}
# Our layer-norm name in front of each block.
_NORMS = {
    ("encoder", "attention"): "pre_attention_layer_norm",
    ("encoder", "mlp"): "pre_mlp_layer_norm",
    ("decoder", "self_attention"): "pre_self_attention_layer_norm",
    ("decoder", "encoder_decoder_attention"): "pre_cross_attention_layer_norm",
    ("decoder", "mlp"): "pre_mlp_layer_norm",
}

_OUR_MODULE = re.compile(r"(encoder|decoder)/layers_(\d+)/(\w+)/(\w+)")
HF_MODULE_PATTERN = (r"(encoder|decoder)\.block\.(\d+)\.layer\.(\d+)\."
                     r"(SelfAttention|EncDecAttention|DenseReluDense)\.(q|k|v|o|wi_0|wi_1|wo)")
_HF_MODULE = re.compile(HF_MODULE_PATTERN)


def flatten(tree: Mapping, sep: str = "/") -> Dict[str, object]:
  """Nested dicts -> `{'a/b/c': leaf}`."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      for sub, leaf in flatten(value, sep).items():
        flat[f"{key}{sep}{sub}"] = leaf
    else:
      flat[str(key)] = value
  return flat


def unflatten(flat: Mapping[str, object], sep: str = "/") -> dict:
  """`{'a/b/c': leaf}` -> nested dicts."""
  tree: dict = {}
  for key, leaf in flat.items():
    *parents, name = key.split(sep)
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[name] = leaf
  return tree


def _blocks(stack: str) -> List[str]:
  return [block for (s, block) in _BLOCKS if s == stack]


def _kinds(block: str) -> Tuple[str, ...]:
  return ("wi_0", "wi_1", "wo") if block == "mlp" else tuple(_HF_ATTENTION)


def num_layers(config: T5Config, stack: str) -> int:
  return config.num_encoder_layers if stack == "encoder" else config.num_decoder_layers


def module_paths(config: T5Config, targets: Iterable[str] = ALL_TARGETS) -> List[str]:
  """Every linear module whose kind is in `targets`, in model order: `encoder/layers_0/attention/query`, ..."""
  targets = set(targets)
  paths = []
  for stack in ("encoder", "decoder"):
    for i in range(num_layers(config, stack)):
      for block in _blocks(stack):
        paths += [f"{stack}/layers_{i}/{block}/{k}" for k in _kinds(block) if k in targets]
  return paths


def module_kind(path: str) -> str:
  """The module's kind, one of `ALL_TARGETS`: `.../attention/query` -> `query`."""
  return path.rsplit("/", 1)[-1]


def hf_short_name(kind: str) -> str:
  """Our module kind -> the Hugging Face attribute name (`query` -> `q`, `wo` -> `wo`), as in PEFT target_modules."""
  return _HF_ATTENTION.get(kind, kind)


def to_hf_module(path: str) -> str:
  """`decoder/layers_1/encoder_decoder_attention/value` -> `decoder.block.1.layer.1.EncDecAttention.v`."""
  m = _OUR_MODULE.fullmatch(path)
  if not m or (m.group(1), m.group(3)) not in _BLOCKS or m.group(4) not in _kinds(m.group(3)):
    raise ValueError(f"not a T5 linear module path: {path!r}")
  stack, layer, block, kind = m.groups()
  idx, cls = _BLOCKS[(stack, block)]
  return f"{stack}.block.{layer}.layer.{idx}.{cls}.{hf_short_name(kind)}"


def from_hf_module(name: str) -> str:
  """`encoder.block.0.layer.0.SelfAttention.q` -> `encoder/layers_0/attention/query`."""
  m = _HF_MODULE.fullmatch(name)
  block = m and _HF_BLOCKS.get((m.group(1), int(m.group(3)), m.group(4)))
  if not block or m.group(5) not in {hf_short_name(k) for k in _kinds(block)}:
    raise ValueError(f"not a Hugging Face T5 linear module name: {name!r}")
  stack, layer, kind = m.group(1), m.group(2), m.group(5)
  return f"{stack}/layers_{layer}/{block}/{_OUR_ATTENTION.get(kind, kind)}"


def linear_shape(config: T5Config, path: str) -> Tuple[int, int]:
  """`(d_in, d_out)` of a linear module."""
  kind = module_kind(path)
  if kind in ("wi_0", "wi_1"):
    return config.d_model, config.d_ff
  if kind == "wo":
    return config.d_ff, config.d_model
  if kind == "out":
    return config.joined_kv, config.d_model
  return config.d_model, config.joined_kv


def param_shapes(config: T5Config) -> Dict[str, Tuple[int, ...]]:
  """Every base parameter of our tree, flat '/'-joined path -> shape."""
  shapes = {"token_embedder/embedding": (config.vocab_size, config.d_model),
            "decoder/logits_dense/kernel": (config.d_model, config.vocab_size)}
  for stack in ("encoder", "decoder"):
    shapes[f"{stack}/relpos_bias/rel_embedding"] = (config.num_heads, config.relative_attention_num_buckets)
    shapes[f"{stack}/{stack}_norm/scale"] = (config.d_model,)
    for i in range(num_layers(config, stack)):
      for block in _blocks(stack):
        shapes[f"{stack}/layers_{i}/{_NORMS[(stack, block)]}/scale"] = (config.d_model,)
  for path in module_paths(config):
    shapes[f"{path}/kernel"] = linear_shape(config, path)
  return shapes


def hf_param_names(config: T5Config) -> Dict[str, Tuple[str, bool]]:
  """Our flat path -> (Hugging Face state-dict name, whether the array is transposed between the two)."""
  names = {"token_embedder/embedding": ("shared.weight", False),
           "decoder/logits_dense/kernel": ("lm_head.weight", True)}
  for stack in ("encoder", "decoder"):
    names[f"{stack}/relpos_bias/rel_embedding"] = (
        f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", True)
    names[f"{stack}/{stack}_norm/scale"] = (f"{stack}.final_layer_norm.weight", False)
    for i in range(num_layers(config, stack)):
      for block in _blocks(stack):
        idx = _BLOCKS[(stack, block)][0]
        names[f"{stack}/layers_{i}/{_NORMS[(stack, block)]}/scale"] = (
            f"{stack}.block.{i}.layer.{idx}.layer_norm.weight", False)
  for path in module_paths(config):
    names[f"{path}/kernel"] = (f"{to_hf_module(path)}.weight", True)
  return names


def shape_mismatch_report(expected: Mapping[str, tuple], found: Mapping[str, tuple]) -> str:
  """Human-readable list of missing, unexpected and wrongly-shaped names; empty when they agree."""
  lines = []
  wrong = [k for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
  lines += [f"  shape of {k}: expected {tuple(expected[k])}, found {tuple(found[k])}" for k in wrong]
  lines += [f"  missing {k}: expected shape {tuple(expected[k])}" for k in expected if k not in found]
  lines += [f"  unexpected {k}: shape {tuple(found[k])}" for k in found if k not in expected]
  return "\n".join(lines)


def check_shapes(expected: Mapping[str, tuple], found: Mapping[str, tuple], what: str) -> None:
  """Raise ValueError naming every missing, unexpected and wrongly-shaped entry of `found`."""
  report = shape_mismatch_report(expected, found)
  if report:
    raise ValueError(f"{what} does not match the expected parameters:\n{report}")


def place_sliced(shapes: Mapping[str, tuple], shardings: Mapping[str, object], dtype,
                 read: Callable[[str, tuple], np.ndarray]) -> Dict[str, jax.Array]:
  """`{name: jax.Array}` laid out by `shardings[name]` (flat '/' keys), each device's shard read by
  `read(name, index)` (`index` a tuple of slices into the array of `shapes[name]`) and cast to `dtype`: a
  process reads only the slices its own devices hold, and no whole array is assembled on the host."""
  return {name: jax.make_array_from_callback(tuple(shape), shardings[name],
                                             lambda index, n=name: np.asarray(read(n, index), dtype))
          for name, shape in shapes.items()}
