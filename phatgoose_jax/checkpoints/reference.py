"""The reference implementation's released expert checkpoints (algorithm.md §7) -> per-expert `lora` and `gates`.

The reference code stores all E experts in one state dict (safetensors or a PyTorch file), under Hugging
Face T5 module names, possibly behind a prefix (e.g. `model.`):
  <prefix><HF module>._addons.expert_lora.layer1__<i>        [d_in, r]  = A^T = our `lora_a`   (bf16)
  <prefix><HF module>._addons.expert_lora.layer2__<i>        [r, d_out] = B^T = our `lora_b`   (bf16)
  <prefix><HF module>._addons.router.expert_embeddings__<i>  [d_in]     = gate vector v      (fp32)
with `<HF module>` like `encoder.block.0.layer.0.SelfAttention.q`. Its LoRA output is `(B A u) / r`,
as ours, so the arrays are taken as they are (cast to float32). Base-model weights in the file are ignored.
"""
import os
import re
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from phatgoose_jax.checkpoints import hf, names
from phatgoose_jax.t5.config import ALL_TARGETS, T5Config

_EXPERT_KEY = re.compile(r".*(?:layer1|layer2|expert_embeddings)__\d+")
_KEY = re.compile(rf"(?P<prefix>.*?)(?P<module>{names.HF_MODULE_PATTERN})\.(?:.+\.)?"
                  rf"(?P<kind>layer1|layer2|expert_embeddings)__(?P<index>\d+)")
_LEAF = {"layer1": "lora_a", "layer2": "lora_b", "expert_embeddings": "gate"}
_ADDON = {"layer1": "_addons.expert_lora.layer1", "layer2": "_addons.expert_lora.layer2",
          "expert_embeddings": "_addons.router.expert_embeddings"}


class ReferenceExperts(NamedTuple):
  """Per-expert flat `lora` and `gates` collections (in the file's expert order), rank, kinds, key prefix."""
  loras: List[Dict[str, np.ndarray]]
  gates: List[Dict[str, np.ndarray]]
  rank: int
  targets: Tuple[str, ...]
  prefix: str


def _parse(state: Dict[str, np.ndarray], path: str) -> Tuple[str, Dict[Tuple[int, str], np.ndarray]]:
  """(prefix, {(expert, our leaf path): float32 array}) from the expert entries of a state dict."""
  entries, prefixes, odd = {}, set(), []
  for key, value in state.items():
    if not _EXPERT_KEY.fullmatch(key):
      continue
    m = _KEY.fullmatch(key)
    if not m:
      odd.append(key)
      continue
    prefixes.add(m.group("prefix"))
    leaf = f"{names.from_hf_module(m.group('module'))}/{_LEAF[m.group('kind')]}"
    entries[(int(m.group("index")), leaf)] = np.asarray(value, np.float32)
  if odd:
    raise ValueError(f"{path}: expert entries not on a T5 linear module: {sorted(odd)[:5]}")
  if not entries:
    raise ValueError(f"{path} holds no reference expert entries (`...layer1__<i>`, `...layer2__<i>`, "
                     f"`...expert_embeddings__<i>`)")
  if len(prefixes) != 1:
    raise ValueError(f"{path}: expert entries use several module-name prefixes: {sorted(prefixes)}")
  return prefixes.pop(), entries


def _split_experts(entries: Dict[Tuple[int, str], np.ndarray], path: str) -> List[Dict[str, np.ndarray]]:
  """One dict per expert, indices 0..E-1, all experts on the same modules."""
  count = max(i for i, _ in entries) + 1
  experts: List[Dict[str, np.ndarray]] = [{} for _ in range(count)]
  for (i, leaf), value in entries.items():
    experts[i][leaf] = value
  layout = set(experts[0])
  bad = [i for i, e in enumerate(experts) if set(e) != layout]
  if bad:
    raise ValueError(f"{path}: experts {bad} do not have the same entries as expert 0 (or are missing)")
  return experts


def _check_expert(expert: Dict[str, np.ndarray], config: Optional[T5Config], path: str) -> int:
  """Each module has layer1 and layer2 (and a gate for all modules or none) of consistent shapes; its rank."""
  modules = {k.rsplit("/", 1)[0] for k in expert}
  gated = {m for m in modules if f"{m}/gate" in expert}
  if gated and gated != modules:
    raise ValueError(f"{path}: router vectors for only some modules; missing for {sorted(modules - gated)[:5]}")
  ranks, problems = set(), []
  for m in sorted(modules):
    a, b = expert.get(f"{m}/lora_a"), expert.get(f"{m}/lora_b")
    if a is None or b is None or a.ndim != 2 or b.ndim != 2:
      problems.append(f"{m}: needs both layer1 and layer2, as matrices")
      continue
    d_in, d_out = names.linear_shape(config, m) if config else (a.shape[0], b.shape[1])
    ranks.add(a.shape[1])
    if a.shape != (d_in, a.shape[1]) or b.shape != (a.shape[1], d_out):
      problems.append(f"{m}: layer1 {a.shape}, layer2 {b.shape}, expected ({d_in}, r), (r, {d_out})")
    gate = expert.get(f"{m}/gate")
    if gate is not None and gate.shape != (d_in,):
      problems.append(f"{m}: expert_embeddings {gate.shape}, expected ({d_in},)")
  if len(ranks) > 1:
    problems.append(f"several ranks {sorted(ranks)}")
  if problems:
    raise ValueError(f"{path}: inconsistent reference experts:\n  " + "\n  ".join(problems))
  return ranks.pop()


def load_reference(path: str, config: Optional[T5Config] = None) -> ReferenceExperts:
  """Import every expert of a reference checkpoint file (`.safetensors` or a PyTorch state dict)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such reference checkpoint file: {path}")
  prefix, entries = _parse(hf.read_weights_file(path), path)
  experts = _split_experts(entries, path)
  ranks = {_check_expert(e, config, path) for e in experts}
  if len(ranks) > 1:
    raise ValueError(f"{path}: experts have different ranks {sorted(ranks)}")
  rank = ranks.pop()
  loras = [{k: v for k, v in e.items() if not k.endswith("/gate")} for e in experts]
  gates = [{k: v for k, v in e.items() if k.endswith("/gate")} for e in experts]
  kinds = {names.module_kind(k.rsplit("/", 1)[0]) for k in loras[0]}
  return ReferenceExperts(loras, gates, rank, tuple(t for t in ALL_TARGETS if t in kinds), prefix)


def _reference_state(loras: Sequence[Dict[str, np.ndarray]], gates: Sequence[Dict[str, np.ndarray]],
                     prefix: str) -> Dict[str, Tuple[np.ndarray, bool]]:
  """Reference key -> (float32 array, whether it is a LoRA factor, stored in the LoRA dtype)."""
  kinds = {leaf: kind for kind, leaf in _LEAF.items()}
  state = {}
  for i, lora in enumerate(loras):
    for key, value in {**lora, **(gates[i] if gates else {})}.items():
      module, leaf = key.rsplit("/", 1)
      name = f"{prefix}{names.to_hf_module(module)}.{_ADDON[kinds[leaf]]}__{i}"
      state[name] = (np.asarray(value, np.float32), leaf != "gate")
  return state


def save_reference(path: str, loras: Sequence[Dict[str, np.ndarray]],
                   gates: Optional[Sequence[Dict[str, np.ndarray]]] = None, *, prefix: str = "",
                   lora_dtype: str = "bfloat16") -> None:
  """Write experts in the reference layout: `.safetensors` by extension, else a PyTorch state dict.

  LoRA factors are stored in `lora_dtype` (the release uses bf16), router vectors in float32.
  """
  state = _reference_state(loras, gates, prefix)
  if path.endswith(".safetensors"):
    import ml_dtypes  # pylint: disable=import-outside-toplevel
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    dtype = ml_dtypes.bfloat16 if lora_dtype == "bfloat16" else np.dtype(lora_dtype)
    save_file({k: v.astype(dtype) if lora else v for k, (v, lora) in state.items()}, path,
              metadata={"format": "pt"})
    return
  import torch  # pylint: disable=import-outside-toplevel
  dtype = getattr(torch, lora_dtype)
  torch.save({k: torch.from_numpy(v).to(dtype) if lora else torch.from_numpy(v) for k, (v, lora) in state.items()},
             path)
