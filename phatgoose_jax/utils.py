"""What every stage shares, t5x `utils.py` style: the configured model and mesh, and variables initialised,
restored and placed on that mesh (the optimiser is `training.optimizers.make_optimizer`, configured in gin).

The model's configuration comes from gin (`gin/models/*.gin` bind `model_config` and `lora_config`); a
checkpoint supplies weights only and must match the configured architecture (`checkpoints.load(expect=)`).
Without a model file (`size=None`) the checkpoint's architecture is used; dropout and dtype always come
from the configuration.
"""
import functools
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
from flax import traverse_util

from phatgoose_jax import host_memory, partitioning
from phatgoose_jax import checkpoints
from phatgoose_jax.checkpoints import Loaded
from phatgoose_jax.t5 import layout
from phatgoose_jax.experts.config import ExpertConfig
from phatgoose_jax.models import EncoderDecoderModel
from phatgoose_jax.t5 import config as t5_config
from phatgoose_jax.t5 import network

COMPUTE_DTYPES = ("float32", "bfloat16")
PRECISIONS = ("float32", "bfloat16", "official")


def precision_fields(precision: str) -> dict:
  """The `T5Config` fields (`dtype`, `autocast`) of a precision (algorithm.md §2): 'float32' (the default: the
  exact formulas, the reference the tests compare against), 'official' (bf16 compute rounded at each step as the
  official runs under bf16 torch.autocast, colm/models/t5xl/t5.gin:20) or 'bfloat16' (bf16 compute with the
  official router math, the rest of the network rounded as XLA does)."""
  if precision not in PRECISIONS:
    raise ValueError(f"model dtype (--precision) must be one of {', '.join(PRECISIONS)}, got {precision!r}")
  return dict(dtype="float32" if precision == "float32" else "bfloat16", autocast=precision == "official")


def in_compute_dtype(variables: Mapping, dtype: str) -> Mapping:
  """The variables for a model computing in `dtype`: with 'bfloat16' every floating array in bfloat16, as the
  official bf16 evaluation casts all frozen parameters (r-three/phatgoose src/models/manipulations/basic.py:54-59);
  else unchanged. With the bf16 compute (`model_config.dtype`) this is that evaluation (algorithm.md §4)."""
  if dtype != "bfloat16":
    return variables
  return jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                variables)


@gin.configurable
def model_config(checkpoint_config: Optional[t5_config.T5Config] = None, *, size: Optional[str] = None,
                 overrides: Optional[dict] = None, dropout_rate: float = 0.1, dtype: str = "float32",
                 scan_layers: bool = False, remat_policy: str = "none") -> Optional[t5_config.T5Config]:
  """The configured T5 v1.1: a preset (`tiny`, `small` ... `xxl`) with optional architecture `overrides`.

  Without a configured `size`, the architecture is `checkpoint_config`'s (None if not given); dropout, precision
  (`dtype`, one of PRECISIONS: `precision_fields`) and layout are always the configured ones (`scan_layers`: each
  stack under `nn.scan`, one layer body compiled per stack, t5/network.py; `remat_policy`: what each layer keeps
  for the backward pass, one of `network.REMAT_POLICIES`)."""
  if remat_policy not in network.REMAT_POLICIES:
    raise ValueError(f"remat_policy must be one of {', '.join(network.REMAT_POLICIES)}, got {remat_policy!r}")
  configured = dict(dropout_rate=dropout_rate, scan_layers=scan_layers, remat_policy=remat_policy,
                    **precision_fields(dtype))
  if size is not None:
    return t5_config.preset(size, **(overrides or {})).replace(**configured)
  if checkpoint_config is None:
    return None
  return checkpoint_config.replace(**configured)


@gin.configurable
def frozen_base_dtype(dtype: str = "float32") -> str:
  """Storage dtype of the frozen base's parameters (LoRA, gates and optimizer state stay float32): 'bfloat16'
  halves the base's memory, as the official trains under bf16; the XL and XXL model files bind it."""
  if dtype not in COMPUTE_DTYPES:
    raise ValueError(f"frozen_base_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
  return dtype


def params_shardings(config: t5_config.T5Config, mesh, rules) -> dict:
  """The `NamedSharding`s of a base model's `params` on `mesh` (from shapes only)."""
  abstract = jax.eval_shape(get_model(config).get_initial_variables, jax.random.key(0))
  return partitioning.variables_shardings({"params": abstract["params"]}, mesh, rules)["params"]


def restore_base(path: str, dtype: Optional[str] = None) -> Loaded:
  """The checkpoint at `path` (any format) checked against the configured architecture, with the configured
  model config; its `params` restored straight into their shardings on the configured mesh in `dtype`
  (default `frozen_base_dtype()`), each process reading only its devices' slices; stacked for a model under
  `scan_layers` one parameter at a time (checkpoints/layout.py)."""
  expect = model_config()
  config = expect or model_config(checkpoints.architecture(path))
  mesh, rules = sharding()
  loaded = checkpoints.load(path, expect=expect, shardings=params_shardings(config.replace(scan_layers=False), mesh,
                                                                             rules), dtype=dtype or frozen_base_dtype())
  config = model_config(loaded.config)
  if not config.scan_layers:
    return loaded._replace(config=config)
  params = _stacked_params(loaded.variables["params"], config, params_shardings(config, mesh, rules))
  return loaded._replace(config=config, variables=layout.for_model({**loaded.variables, "params": params}, config))


def _stacked_params(params: dict, config: t5_config.T5Config, shardings: dict) -> dict:
  """`layout.stack_layers` of freshly restored per-layer `params` one stacked leaf at a time, each layer's
  array deleted once its stack is placed: beside the restored base only one parameter's stacked copy is alive
  (stacking a whole stack at once held every layer's array until the last leaf was stacked: a second base)."""
  flat = traverse_util.flatten_dict(params)
  groups = {}
  for key in flat:
    if key[0] in ("encoder", "decoder") and key[1].startswith("layers_"):
      groups.setdefault((key[0], key[2:]), []).append(key)
  out = {k: v for k, v in flat.items() if not (k[0] in ("encoder", "decoder") and k[1].startswith("layers_"))}
  flat_shardings = traverse_util.flatten_dict(shardings)
  for (stack, rest), keys in groups.items():
    name = (stack, layout.STACKED_NAME) + rest
    one = traverse_util.unflatten_dict({k: flat[k] for k in keys})
    placed = traverse_util.unflatten_dict({name: flat_shardings[name]})
    stacked = layout.stack_layers({"params": one}, config, {"params": placed})["params"]
    out[name] = traverse_util.flatten_dict(stacked)[name]
    for k in keys:
      x = flat.pop(k)
      if isinstance(x, jax.Array):
        x.delete()
  return traverse_util.unflatten_dict(out)


@gin.configurable
def lora_config(rank: int = 16, targets: Sequence[str] = t5_config.ALL_TARGETS) -> ExpertConfig:
  """The single-expert LoRA of algorithm.md §2 (rank 16 on every linear layer)."""
  return ExpertConfig(mode="lora", rank=rank, targets=tuple(targets))


@gin.configurable
def sharding(mesh=None, rules=None) -> tuple:
  """(Mesh, logical axis rules): `partitioning.make_mesh()` and the standard rules unless given."""
  return mesh or partitioning.make_mesh(), tuple(rules or partitioning.standard_logical_axis_rules())


@functools.lru_cache(maxsize=None)
def get_model(config: t5_config.T5Config, experts: ExpertConfig = ExpertConfig()) -> EncoderDecoderModel:
  """One `EncoderDecoderModel` per (config, experts): its jitted functions compile once per process."""
  return EncoderDecoderModel(config, experts)


def _reboxed(boxed: Any, values: Any) -> Any:
  """`values` (plain arrays) carrying the logical axis names of the matching boxed tree."""
  is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
  return jax.tree.map(lambda b, v: b.replace_boxed(jnp.asarray(v)) if is_box(b) else jnp.asarray(v),
                      boxed, values, is_leaf=is_box)


def init_variables(model: EncoderDecoderModel, seed: int, **collections) -> dict:
  """Boxed variables of `model` on the configured mesh: the given collections (arrays) as they are, the
  others (LoRA, gates, experts: whatever is not given) drawn from `seed` inside `jax.jit` with their
  shardings as `out_shardings`. A given collection is never drawn (its shapes come from `jax.eval_shape`),
  so a frozen base from a checkpoint is never initialised at random. With nothing given (a model trained from
  scratch) every collection is drawn eagerly: XLA fusing a whole-model initialisation moves some normal draws
  by an ulp, and the seeded base must stay the same. Given collections may be in the per-layer layout of
  checkpoints and libraries: they are stacked for a model under `scan_layers`."""
  collections = layout.for_model(collections, model.config)
  if not collections:  # a model from scratch (base pretraining): drawn as it always was, eagerly
    return model.get_initial_variables(jax.random.key(seed))
  abstract = jax.eval_shape(model.get_initial_variables, jax.random.key(seed))
  fresh = [name for name in abstract if name not in collections]
  mesh, rules = sharding()
  shardings = partitioning.variables_shardings({name: abstract[name] for name in fresh}, mesh, rules)
  draw = jax.jit(lambda key: {name: partitioning.unbox(model.get_initial_variables(key)[name]) for name in fresh},
                 out_shardings=shardings)
  values = {**draw(jax.random.key(seed)), **collections}
  host_memory.release_free_memory()  # what compiling `draw` (the whole model's initialiser) left in the heap
  return {name: _reboxed(abstract[name], values[name]) for name in abstract}


def place(model: EncoderDecoderModel, variables: dict, mesh, rules) -> dict:
  """`variables` placed with the NamedShardings their logical axes give on `mesh`."""
  abstract = jax.eval_shape(lambda: model.get_initial_variables(jax.random.key(0)))
  abstract = {k: abstract[k] for k in variables}
  shardings = partitioning.variables_shardings(abstract, mesh, rules)
  return jax.device_put(partitioning.unbox(variables), shardings)
