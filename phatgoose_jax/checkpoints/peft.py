"""Hugging Face PEFT LoRA adapters for T5 <-> our flat `lora` collection.

The PEFT format (what `PeftModel.save_pretrained` writes for a LoRA on `T5ForConditionalGeneration`):
  adapter_config.json          `{"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": [...],
                               "use_rslora": false, "bias": "none", "fan_in_fan_out": false, ...}`
  adapter_model.safetensors    (or adapter_model.bin) with, per adapted module,
                               `base_model.model.<HF module>.lora_A.weight` [r, d_in] and `...lora_B.weight`
                               [d_out, r] (the adapter name, e.g. `.default`, is stripped on save).
PEFT computes `W u + s B A u` with `s = alpha / r` (`alpha / sqrt(r)` with rsLoRA). We compute
`u @ kernel + (u @ lora_a @ lora_b) / r`, so `lora_a = A^T` and `lora_b = (s r) B^T`: the PEFT scale is
folded into `lora_b`. Export writes `lora_alpha = r * scale` (1 for our default scale 1/r) and
`B = lora_b^T`, so export -> import is exact.
"""
import json
import math
import os
import re
from typing import Dict, Iterable, NamedTuple, Optional, Tuple

import numpy as np

from phatgoose_jax.checkpoints import hf, names
from phatgoose_jax.t5.config import ALL_TARGETS, T5Config

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.[^.]+)?\.weight")


class PeftAdapter(NamedTuple):
  """An imported adapter: the flat `lora` collection, its rank and the module kinds it adapts."""
  lora: Dict[str, np.ndarray]
  rank: int
  targets: Tuple[str, ...]


def _refuse_unsupported(cfg: dict, path: str) -> None:
  """Raise for adapter options that our LoRA cannot represent."""
  checks = [
      (cfg.get("peft_type", "LORA") == "LORA", f"peft_type is {cfg.get('peft_type')!r}, only 'LORA' is supported"),
      (not cfg.get("rank_pattern"), f"per-module ranks (rank_pattern {cfg.get('rank_pattern')}) are not supported"),
      (not cfg.get("alpha_pattern"), f"per-module alphas (alpha_pattern {cfg.get('alpha_pattern')}) are not supported"),
      (cfg.get("bias", "none") == "none", f"bias={cfg.get('bias')!r}: only bias='none' is supported (T5 has none)"),
      (not cfg.get("use_dora"), "DoRA adapters (use_dora=true) are not supported"),
      (not cfg.get("fan_in_fan_out"), "fan_in_fan_out=true (Conv1D-style weights) is not a T5 layout"),
      (not cfg.get("modules_to_save"), f"modules_to_save {cfg.get('modules_to_save')} (full weights) is not supported"),
      (not cfg.get("layer_replication"), "layer_replication is not supported"),
  ]
  problems = [message for ok, message in checks if not ok]
  if problems:
    raise ValueError(f"unsupported PEFT adapter {path}: " + "; ".join(problems))


def matches_target_modules(target_modules, module: str) -> bool:
  """PEFT's rule: a string is a regex matched against the full module name; a list matches exact names
  or name suffixes after a dot; 'all-linear' matches every linear layer (T5 has no other LoRA targets here)."""
  if target_modules == "all-linear":
    return True
  if isinstance(target_modules, str):
    return re.fullmatch(target_modules, module) is not None
  return module in target_modules or any(module.endswith("." + t) for t in target_modules)


def _layer_ok(layers, module: str) -> bool:
  """PEFT's `layers_to_transform` (an int or list of block indices; None: all)."""
  if layers is None:
    return True
  block = int(module.split(".")[2])
  return block in ([layers] if isinstance(layers, int) else layers)


def _read_adapter(directory: str) -> Tuple[dict, Dict[str, np.ndarray]]:
  with open(os.path.join(directory, CONFIG_FILE)) as f:
    cfg = json.load(f)
  for name in WEIGHTS_FILES:
    if os.path.exists(os.path.join(directory, name)):
      return cfg, hf.read_weights_file(os.path.join(directory, name))
  raise FileNotFoundError(f"no {' or '.join(WEIGHTS_FILES)} in {directory}")


def _split_keys(weights: Dict[str, np.ndarray], path: str) -> Dict[str, Dict[str, np.ndarray]]:
  """HF module name -> {'A': ..., 'B': ...}; refuses non-LoRA, DoRA and non-T5 keys."""
  modules: Dict[str, Dict[str, np.ndarray]] = {}
  for key, value in weights.items():
    m = _KEY.fullmatch(key)
    if not m:
      kind = "DoRA magnitude" if "lora_magnitude_vector" in key else "a weight other than lora_A/lora_B:"
      raise ValueError(f"unsupported PEFT adapter {path}: {kind} {key!r}")
    try:
      names.from_hf_module(m.group("module"))
    except ValueError as e:
      raise ValueError(f"{path} is not a T5 LoRA adapter: {m.group('module')!r} is not a T5 linear layer") from e
    modules.setdefault(m.group("module"), {})[m.group("ab")] = np.asarray(value, np.float32)
  return modules


def _targeted(cfg: dict, module: str) -> bool:
  """Whether PEFT puts a LoRA on `module`: `target_modules`, minus `exclude_modules`, within `layers_to_transform`."""
  exclude = cfg.get("exclude_modules")
  return (matches_target_modules(cfg["target_modules"], module) and _layer_ok(cfg.get("layers_to_transform"), module)
          and not (exclude and matches_target_modules(exclude, module)))


def _check_modules(cfg: dict, modules: Iterable[str], config: Optional[T5Config], path: str) -> None:
  """Every module in the file is targeted by the config; with a T5Config, every targeted module is present."""
  target = cfg.get("target_modules")
  if target is None:
    return
  found = set(modules)
  stray = sorted(m for m in found if not _targeted(cfg, m))
  missing = []
  if config is not None:
    every = [names.to_hf_module(p) for p in names.module_paths(config)]
    missing = [m for m in every if _targeted(cfg, m) and m not in found]
  if stray or missing:
    raise ValueError(f"PEFT adapter {path} does not match its target_modules {target!r}: "
                     f"not targeted but present {stray}; targeted but missing {missing}")


def _convert(modules: Dict[str, Dict[str, np.ndarray]], rank: int, factor: float,
             config: Optional[T5Config], path: str) -> Dict[str, np.ndarray]:
  """Our flat lora dict; checks that each module has A [r, in] and B [out, r] of the right sizes."""
  lora = {}
  for module, ab in modules.items():
    ours = names.from_hf_module(module)
    if set(ab) != {"A", "B"}:
      raise ValueError(f"PEFT adapter {path}: {module} has lora_{''.join(sorted(ab))} only, needs lora_A and lora_B")
    a, b = ab["A"], ab["B"]
    if a.ndim != 2 or b.ndim != 2:
      raise ValueError(f"PEFT adapter {path}: {module} lora_A {a.shape} / lora_B {b.shape} are not matrices")
    d_in, d_out = names.linear_shape(config, ours) if config else (a.shape[1], b.shape[0])
    if a.shape != (rank, d_in) or b.shape != (d_out, rank):
      raise ValueError(f"PEFT adapter {path}: {module} lora_A {a.shape} / lora_B {b.shape}, expected "
                       f"({rank}, {d_in}) / ({d_out}, {rank})")
    lora[f"{ours}/lora_a"] = np.ascontiguousarray(a.T)
    lora[f"{ours}/lora_b"] = np.ascontiguousarray(b.T) * np.float32(factor)
  return lora


def peft_to_ours_factor(cfg: dict) -> float:
  """`s * r`, the factor folded into `lora_b` so that our `1/r` scale reproduces PEFT's scale `s`."""
  r, alpha = cfg["r"], cfg.get("lora_alpha", 8)
  return alpha * math.sqrt(r) if cfg.get("use_rslora") else alpha


def load_peft(directory: str, config: Optional[T5Config] = None) -> PeftAdapter:
  """Import a PEFT LoRA adapter for T5 as our flat `lora` collection (for the default scale 1/r).

  With `config`, shapes are checked against the model and every module that `target_modules` selects
  must be present.
  """
  cfg, weights = _read_adapter(directory)
  _refuse_unsupported(cfg, directory)
  if "r" not in cfg:
    raise ValueError(f"{os.path.join(directory, CONFIG_FILE)} has no rank 'r'")
  modules = _split_keys(weights, directory)
  if not modules:
    raise ValueError(f"PEFT adapter {directory} holds no LoRA weights")
  _check_modules(cfg, modules, config, directory)
  lora = _convert(modules, cfg["r"], peft_to_ours_factor(cfg), config, directory)
  kinds = {names.module_kind(k.rsplit("/", 1)[0]) for k in lora}
  return PeftAdapter(lora, cfg["r"], tuple(t for t in ALL_TARGETS if t in kinds))


def _lora_rank(lora: Dict[str, np.ndarray]) -> int:
  ranks = {np.shape(v)[1] for k, v in lora.items() if k.endswith("/lora_a")}
  if len(ranks) != 1:
    raise ValueError(f"expected one LoRA rank over all modules, found {sorted(ranks)}")
  return ranks.pop()


def _target_modules(modules: Iterable[str], config: T5Config) -> list:
  """Short PEFT target names (`q`, `wo`, ...) when they select exactly these modules, else the full names."""
  modules = sorted(modules)
  kinds = [t for t in ALL_TARGETS if any(names.module_kind(m) == t for m in modules)]
  if sorted(names.module_paths(config, kinds)) == modules:
    return [names.hf_short_name(k) for k in kinds]
  return [names.to_hf_module(m) for m in modules]


def save_peft(directory: str, lora: Dict[str, np.ndarray], config: T5Config, *, scale: Optional[float] = None,
              base_model_name_or_path: Optional[str] = None) -> None:
  """Export our `lora` collection (used with `scale`, default 1/r) as a PEFT adapter directory."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  rank = _lora_rank(lora)
  modules = sorted({k.rsplit("/", 1)[0] for k in lora})
  weights = {}
  for module in modules:
    key = _PREFIX + names.to_hf_module(module)
    weights[f"{key}.lora_A.weight"] = np.ascontiguousarray(np.asarray(lora[f"{module}/lora_a"], np.float32).T)
    weights[f"{key}.lora_B.weight"] = np.ascontiguousarray(np.asarray(lora[f"{module}/lora_b"], np.float32).T)
  adapter = {
      "peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM", "base_model_name_or_path": base_model_name_or_path,
      "r": rank, "lora_alpha": 1.0 if scale is None else scale * rank, "lora_dropout": 0.0,
      "target_modules": _target_modules(modules, config), "bias": "none", "fan_in_fan_out": False,
      "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
      "layers_to_transform": None, "layers_pattern": None, "init_lora_weights": True, "inference_mode": True,
      "revision": None,
  }
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(adapter, f, indent=2, sort_keys=True)
  save_file(weights, os.path.join(directory, WEIGHTS_FILES[0]), metadata={"format": "pt"})
