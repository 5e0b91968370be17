"""Our own checkpoints: an orbax-saved pytree plus the model's configs as JSON beside it.

Layout of a checkpoint directory:
  config.json   `{"format": "phatgoose-jax", "version": 1, "t5": {...T5Config}, "experts": {...ExpertConfig} | null}`
  state/        an orbax `StandardCheckpointer` checkpoint of any pytree (e.g. `{'params': ..., 'lora': ...}`)
`state/` is written first (orbax writes to a temporary directory and renames it when complete), then
`config.json` (written to a temporary file and renamed), so a checkpoint with both is complete.
"""
import dataclasses
import json
import os
from typing import Any, List, NamedTuple, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from phatgoose_jax.t5 import layout
from phatgoose_jax.t5.config import T5Config
from phatgoose_jax.experts.config import ExpertConfig

FORMAT = "phatgoose-jax"
VERSION = 1
CONFIG_FILE = "config.json"
STATE_DIR = "state"
# Fields that change the weights; dtype and dropout do not.
_ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(T5Config) if f.name not in ("dtype", "dropout_rate"))


class NativeCheckpoint(NamedTuple):
  """A restored checkpoint: the saved pytree and the configs stored with it."""
  state: Any
  t5_config: T5Config
  expert_config: Optional[ExpertConfig]


def _expert_to_dict(config: Optional[ExpertConfig]) -> Optional[dict]:
  return None if config is None else dict(dataclasses.asdict(config), targets=list(config.targets))


def save_native(directory: str, state: Any, t5_config: T5Config, expert_config: Optional[ExpertConfig] = None,
                *, overwrite: bool = False) -> None:
  """Save `state` ({collection: tree of arrays}) with orbax and the configs as `config.json` in `directory`,
  in the per-layer layout of t5x (a model under `scan_layers` is unstacked: checkpoints/layout.py)."""
  state, t5_config = layout.unstack_layers(state, t5_config), t5_config.replace(scan_layers=False)
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, STATE_DIR), state, force=overwrite)
    checkpointer.wait_until_finished()
  meta = {"format": FORMAT, "version": VERSION, "t5": t5_config.to_dict(),
          "experts": _expert_to_dict(expert_config)}
  tmp = os.path.join(directory, CONFIG_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(directory, CONFIG_FILE))


def _orbax_tmp_dirs(directory: str) -> List[str]:
  return sorted(n for n in os.listdir(directory) if n.startswith(STATE_DIR) and "tmp" in n)


def _check_state_dir(directory: str) -> str:
  """The orbax directory, or a clear error when it is missing, half-written or lacks its metadata."""
  state = os.path.join(directory, STATE_DIR)
  if not os.path.isdir(state):
    tmp = _orbax_tmp_dirs(directory)
    detail = f"found the unfinished orbax directory {tmp[0]!r}: the save was interrupted" if tmp else \
        f"no {STATE_DIR}/ directory"
    raise ValueError(f"incomplete checkpoint {directory}: {detail}")
  for required in ("_METADATA", "_CHECKPOINT_METADATA"):
    if not os.path.isfile(os.path.join(state, required)):
      raise ValueError(f"corrupt checkpoint {state}: orbax metadata file {required} is missing")
  return state


def read_configs(directory: str) -> Tuple[T5Config, Optional[ExpertConfig]]:
  """The `(T5Config, ExpertConfig or None)` stored in a checkpoint's `config.json`, validated."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no such checkpoint directory: {directory}")
  if not os.path.isfile(path):
    raise ValueError(f"incomplete checkpoint {directory}: {CONFIG_FILE} is missing (the save did not finish, "
                     f"or this is not a phatgoose-jax checkpoint)")
  try:
    with open(path) as f:
      meta = json.load(f)
    if meta.get("format") != FORMAT:
      raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
    experts = meta["experts"]
    return T5Config.from_dict(meta["t5"]), None if experts is None else ExpertConfig(**experts)
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(f"corrupt checkpoint config {path}: {type(e).__name__}: {e}") from e


def config_differences(found: T5Config, expected: T5Config) -> List[str]:
  """`'field: checkpoint X, expected Y'` for every architecture field where the two configs differ."""
  return [f"{name}: checkpoint {getattr(found, name)!r}, expected {getattr(expected, name)!r}"
          for name in _ARCH_FIELDS if getattr(found, name) != getattr(expected, name)]


def restore_target(directory: str, params_shardings: Any, dtype) -> Any:
  """The abstract tree to restore a checkpoint's state onto: its `params` in `dtype` with `params_shardings`
  (each process then reads only its own slices), other collections in their stored dtype, replicated on the
  same mesh."""
  with ocp.StandardCheckpointer() as checkpointer:
    stored = checkpointer.metadata(_check_state_dir(os.path.abspath(directory)))
  stored = getattr(stored, "item_metadata", stored)  # a StepMetadata, or the TreeMetadata itself
  stored = dict(getattr(stored, "tree", stored))
  mesh = jax.tree.leaves(params_shardings)[0].mesh
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  target = {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated), v)
            for k, v in stored.items() if k != "params"}
  if "params" in stored:
    target["params"] = jax.tree.map(lambda m, sh: jax.ShapeDtypeStruct(m.shape, dtype, sharding=sh),
                                    stored["params"], params_shardings)
  return target


def load_native(directory: str, *, expect: Optional[T5Config] = None, target: Any = None) -> NativeCheckpoint:
  """Restore a checkpoint written by `save_native`.

  `expect`: refuse a checkpoint whose base model differs from this config (the differing fields are named).
  `target`: optional abstract pytree (`jax.ShapeDtypeStruct`s with shardings) to restore onto.
  """
  directory = os.path.abspath(directory)
  t5_config, expert_config = read_configs(directory)
  if expect is not None:
    diffs = config_differences(t5_config, expect)
    if diffs:
      raise ValueError(f"checkpoint {directory} is for a different base model: " + "; ".join(diffs))
  state_dir = _check_state_dir(directory)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      state = checkpointer.restore(state_dir, target)
  except Exception as e:
    raise ValueError(f"corrupt checkpoint {state_dir}: orbax could not restore it: {type(e).__name__}: {e}") from e
  return NativeCheckpoint(state, t5_config, expert_config)
