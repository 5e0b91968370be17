"""One loader for every checkpoint format: `load(path)`.

  native       a directory written by `native.save_native` (`config.json` with format "phatgoose-jax" +
               orbax `state/`): a base (`params`), a fine-tuned model, or an assembled routed model
               (`params` + `experts`, or + a merged `lora`) with its ExpertConfig;
  Hugging Face a T5 v1.1 directory (`config.json` + safetensors or `.bin` weights);
  t5x          a `checkpoint_N/` directory (msgpack + tensorstore arrays) or its parent (latest step).

The format is recognised from the files, never from a flag. With `expect` (the configured T5Config), the
checkpoint must have that architecture: every differing field is listed in the error. Dropout and compute
dtype are never read from a checkpoint; they come from the configuration.
"""
import json
import os
from typing import NamedTuple, Optional

from phatgoose_jax.checkpoints import hf, native, t5x
from phatgoose_jax.experts.config import ExpertConfig
from phatgoose_jax.t5.config import T5Config

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


class Loaded(NamedTuple):
  """A restored model: its architecture, variables (`params` plus any expert collection) and expert mode."""
  config: T5Config
  variables: dict
  experts: ExpertConfig
  format: str


def checkpoint_format(path: str) -> str:
  """'native', 'hf' or 't5x': which reader a path needs; a ValueError naming what was looked for."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"no checkpoint at {path}: the path does not exist")
  config_file = os.path.join(path, native.CONFIG_FILE)
  if os.path.isfile(config_file):
    try:
      with open(config_file) as f:
        is_native = json.load(f).get("format") == native.FORMAT
    except (OSError, ValueError, AttributeError) as e:
      raise ValueError(f"unreadable {config_file}: {e}") from e
    if is_native:
      return "native"
    if any(os.path.exists(os.path.join(path, name)) for name in HF_WEIGHT_FILES):
      return "hf"
  try:
    t5x.find_checkpoint_dir(path)
  except (FileNotFoundError, ValueError) as e:
    raise ValueError(f"no model checkpoint at {path}: expected a phatgoose-jax checkpoint (config.json + state/), "
                     f"a Hugging Face T5 directory (config.json + model.safetensors) or a t5x checkpoint "
                     f"(checkpoint_N/)") from e
  return "t5x"


def _check_architecture(found: T5Config, expect: Optional[T5Config], path: str) -> None:
  diffs = [] if expect is None else native.config_differences(found, expect)
  if diffs:
    raise ValueError(f"checkpoint {path} does not match the configured model: " + "; ".join(diffs))


def load(path: str, *, expect: Optional[T5Config] = None, shardings: Optional[dict] = None,
         dtype: str = "float32") -> Loaded:
  """The model stored at `path`, whatever its format (see the module docstring).

  With `shardings` (a tree of `NamedSharding`s of the base `params`) the base is restored straight into
  them in `dtype`, each process reading only the slices its devices hold (orbax for native checkpoints,
  tensorstore for t5x, safetensors slices for Hugging Face); without, as host arrays (float32)."""
  kind = checkpoint_format(path)
  if kind == "native":
    target = None if shardings is None else native.restore_target(path, shardings, dtype)
    restored = native.load_native(path, target=target)
    config, variables = restored.t5_config, dict(restored.state)
    experts = restored.expert_config or ExpertConfig()
    if "params" not in variables:
      raise ValueError(f"checkpoint {path} holds {sorted(variables)} but no base model `params`")
  elif kind == "hf":
    config, params = hf.load_hf(path, shardings, dtype)
    variables, experts = {"params": params}, ExpertConfig()
  else:
    config, params = t5x.load_t5x(path, expect, shardings, dtype)
    variables, experts = {"params": params}, ExpertConfig()
  _check_architecture(config, expect, path)
  if expect is not None:
    config = expect
  return Loaded(config, variables, experts, kind)


def architecture(path: str) -> T5Config:
  """The T5 architecture of the checkpoint at `path`, from its metadata alone (no weights read)."""
  kind = checkpoint_format(path)
  if kind == "native":
    return native.read_configs(path)[0]
  if kind == "hf":
    with open(os.path.join(path, native.CONFIG_FILE)) as f:
      return hf.config_from_hf(json.load(f))
  return t5x.architecture(path)
