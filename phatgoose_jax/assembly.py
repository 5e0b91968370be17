"""A base model, optionally with library experts combined by a router, as one model ready to run.

`load_model` builds every model the CLI, the stages and the demo run: a base checkpoint of any
format (`checkpoints.load`), an assembled checkpoint that carries its experts, or a base plus library
experts combined by a named router (algorithm.md §4-§5). The library's experts must all have been trained on
that base (their recorded fingerprint is checked) and share its rank and targets. `assemble` writes the
routed model as one native checkpoint that `load_model`, `phatgoose score`, `phatgoose evaluate` and t5x
load with its experts.
"""
from typing import Callable, Dict, Mapping, NamedTuple, Optional, Sequence

import gin
import jax
import jax.numpy as jnp

from phatgoose_jax import data
from phatgoose_jax import library as lib
from phatgoose_jax import routers, utils
from phatgoose_jax import vocab as vocab_lib
from phatgoose_jax.checkpoints import load as load_checkpoint
from phatgoose_jax.checkpoints import native
from phatgoose_jax.t5 import layout
from phatgoose_jax.models import EncoderDecoderModel, pad_tokens
from phatgoose_jax.t5.config import T5Config
from phatgoose_jax.tasks import sources

# The official average-activation run's max_examples_per_dataset (colm/experiments/bash_scripts/
# reinit_router_embedding.sh:103).
ACTIVATION_SAMPLE = 1000


class LoadedModel(NamedTuple):
  """A model and its variables; per-example routers (uniform, oracle, retrieval) add `expert_weights`,
  `fn(batch) -> <float32>[batch, E]`, to be passed in the batch under that name."""
  model: EncoderDecoderModel
  variables: dict
  expert_weights: Optional[Callable[[Mapping], object]] = None

  def with_expert_weights(self, batch: Mapping) -> dict:
    """`batch` plus its `expert_weights` feature when the router fixes one mixture per example."""
    batch = dict(batch)
    if self.expert_weights is not None:
      batch["expert_weights"] = self.expert_weights(batch)
    return batch


def check_base(library: lib.ExpertLibrary, names: Sequence[str], config: T5Config, params: Mapping) -> None:
  """Refuse experts that were not trained on this base model (config and weights fingerprint)."""
  expected = lib.base_fingerprint(config, params)
  others = [n for n in names if library.manifest(n)["base"] != expected]
  if others:
    raise lib.LibraryError(f"experts {others} of library {library.path} were trained on another base model than "
                           f"the one given (fingerprints differ); load them with the base they were trained on")


def route(library: lib.ExpertLibrary, names: Sequence[str], params: Mapping, router: str = "phatgoose",
          top_k: int = 2, impl: str = "auto", router_inputs: Optional[Mapping] = None) -> routers.Routing:
  """The library experts `names` combined by `router` on the base `params` (checked against the library)."""
  names = list(names)
  check_base(library, names, library.t5_config(), params)
  kwargs = dict(routers.options(router, top_k=top_k, impl=impl, params=params), **(router_inputs or {}))
  return routers.build(router, library, names, **kwargs)


def stored_as_frozen_base(params: Mapping) -> Mapping:
  """The base `params` in `utils.frozen_base_dtype()`, the dtype its experts were trained (and fingerprinted)
  on: a bf16-stored base (the XL/XXL model files) fingerprints as its bf16 values in every stage."""
  dtype = jnp.dtype(utils.frozen_base_dtype())
  return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def _model_config(stored: T5Config, config: Optional[T5Config], dtype: Optional[str]) -> T5Config:
  """The architecture a checkpoint of `stored` runs as: `config` if given, else `stored` with dropout off, the
  configured layer layout and the precision `dtype` (default: the configured one)."""
  configured = utils.model_config(stored)
  precision = utils.precision_fields(dtype) if dtype else dict(dtype=configured.dtype, autocast=configured.autocast)
  return config or stored.replace(dropout_rate=0.0, scan_layers=configured.scan_layers, **precision)


def routing_base(base: str, loaded=None, config: Optional[T5Config] = None, dtype: Optional[str] = None) -> tuple:
  """(the model config, the base `params` as its experts were trained on) of checkpoint `base` (or its
  `loaded` checkpoint), to route library experts over; refuses a checkpoint that carries experts."""
  loaded = loaded or load_checkpoint(base, expect=config)
  if loaded.experts.mode != "none":
    raise ValueError(f"{base} already carries experts ({loaded.experts.mode}); give its base model to route over "
                     f"a library")
  return _model_config(loaded.config, config, dtype), stored_as_frozen_base(loaded.variables["params"])


def load_model(base: str, library: Optional[str] = None, router: str = "phatgoose", top_k: int = 2,
               names: Optional[Sequence[str]] = None, impl: str = "auto", router_inputs: Optional[Mapping] = None,
               config: Optional[T5Config] = None, length_normalize: bool = True,
               dtype: Optional[str] = None) -> LoadedModel:
  """The model of checkpoint `base` (any format), routed over `library`'s experts when one is given.

  `config`: the configured architecture (dtype and dropout included) that the checkpoint must match; by
  default the checkpoint's architecture with dropout off, computing in `dtype` if given, else in the configured
  `utils.model_config.dtype` (a precision, `utils.precision_fields`): 'official' is the official bf16 evaluation
  (bf16 parameters, `utils.in_compute_dtype`, each op rounded as under torch.autocast, algorithm.md §2), 'bfloat16'
  the same parameters and router math (`experts/routing.py`) with XLA's roundings elsewhere. `router_inputs`
  are extra builder arguments (e.g. `data` for average_activation, `examples` for retrieval, `label_to_expert`
  for oracle).
  """
  loaded = load_checkpoint(base, expect=config)
  model_config = _model_config(loaded.config, config, dtype)
  if library is None:
    return LoadedModel(EncoderDecoderModel(model_config, loaded.experts, length_normalize),
                       layout.for_model(utils.in_compute_dtype(loaded.variables, model_config.dtype), model_config))
  _, params = routing_base(base, loaded)
  library_ = lib.ExpertLibrary(library)
  routing = route(library_, names or library_.names(), params, router, top_k, impl, router_inputs)
  model = EncoderDecoderModel(model_config, routing.expert_config, length_normalize)
  variables = layout.for_model(utils.in_compute_dtype(routing.variables(params), model_config.dtype), model_config)
  return LoadedModel(model, variables, routing.expert_weights)


def expert_dataset(library_: lib.ExpertLibrary, name: str) -> str:
  """The training task an expert records; refused for one that records none."""
  task = library_.manifest(name)["dataset"]
  if task is None:
    free = ", ".join(r for r, spec in routers.ROUTERS.items() if not spec.needs)
    raise ValueError(f"expert {name!r} records no training dataset, so routers that read expert data cannot use "
                     f"it; choose a router that needs none ({free})")
  return task


def expert_data(library_: lib.ExpertLibrary, names: Sequence[str], held_out: data.HeldOut,
                max_examples: Optional[int], batch_size: int) -> Dict[str, list]:
  """{expert: [batches of its training data]} (the first `max_examples` rows, or all): t5x features plus
  `inputs` (the input texts), in batches of `batch_size`."""
  out = {}
  for name in names:
    features = data.examples(expert_dataset(library_, name), "train", data.feature_lengths(),
                             max_examples=max_examples, held_out=held_out)
    features["inputs"] = features.pop("inputs_pretokenized")
    out[name] = data.batches(features, batch_size)
  return out


def stored_examples(library_: lib.ExpertLibrary, names: Sequence[str], held_out: data.HeldOut, count: int,
                    batch_size: int) -> Dict[str, list]:
  """{expert: [batches of the examples retrieval stores]} (`data.stored_examples`: the first `count` in the
  official dataset's own order): `inputs`, `answer_choices` and `encoder_input_tokens` (`encoded`)."""
  return {name: data.batches(encoded(task, data.stored_examples(task, count, held_out)), batch_size)
          for name, task in ((n, expert_dataset(library_, n)) for n in names)}


def sampled_examples(library_: lib.ExpertLibrary, names: Sequence[str], held_out: data.HeldOut, count: int,
                     batch_size: int) -> Dict[str, list]:
  """{expert: [batches of the examples average activation runs]} (`data.sampled_examples`: its dataset under
  the official `max_examples_per_dataset = count`, in its own order): `inputs` and `encoder_input_tokens`
  (`encoded`), in batches of its dataset's official training batch size (`sources.train_batch_size`), else of
  `batch_size`."""
  return {name: data.batches(encoded(task, data.sampled_examples(task, count, held_out)),
                             sources.train_batch_size(task) or batch_size)
          for name, task in ((n, expert_dataset(library_, n)) for n in names)}


def encoded(task: str, examples: Dict[str, list]) -> Dict[str, object]:
  """`examples` with `encoder_input_tokens`: their `inputs` in the task's vocabulary, trimmed to the configured
  input length with EOS kept, as `data.examples` encodes them."""
  length = data.feature_lengths()["inputs"]
  vocabulary = data.vocabulary(task)
  tokens = pad_tokens([vocab_lib.encode(vocabulary, text, length) for text in examples["inputs"]], length)
  return dict(examples, encoder_input_tokens=tokens)


@gin.configurable(denylist=["library_", "names", "router", "held_out"])
def router_inputs(library_: lib.ExpertLibrary, names: Sequence[str], router: str, held_out: data.HeldOut,
                  activation_examples: Optional[int] = None, retrieval_examples: int = 1000, batch_size: int = 64,
                  oracle_labels: Optional[dict] = None) -> dict:
  """What router `router` declares it needs beyond the base weights: its experts' training data (the first
  `activation_examples` rows, or all), their official average-activation sample (`sampled_examples`: of
  `activation_examples` pairs, default the official 1000, colm/experiments/bash_scripts/
  reinit_router_embedding.sh:103), retrieval's official store (`stored_examples`), the oracle's label map."""
  needs = routers.spec(router).needs
  inputs = {}
  if "data" in needs:
    inputs["data"] = expert_data(library_, names, held_out, activation_examples, batch_size)
  if "sample" in needs:
    inputs["sample"] = sampled_examples(library_, names, held_out, activation_examples or ACTIVATION_SAMPLE,
                                        batch_size)
  if "examples" in needs:
    inputs["examples"] = stored_examples(library_, names, held_out, retrieval_examples, batch_size)
  if "labels" in needs and oracle_labels is not None:
    inputs["label_to_expert"] = oracle_labels
  return inputs


@gin.configurable
def routing(top_k: int = 2, impl: str = "auto") -> dict:
  """Per-token routing settings: experts per token and the mixing implementation (algorithm.md §4)."""
  return {"top_k": top_k, "impl": impl}


def load(base: str, library: Optional[str] = None, router: str = "phatgoose", names: Optional[Sequence[str]] = None,
         held_out: data.HeldOut = data.NOTHING_HELD_OUT, router_options: Optional[Mapping] = None) -> LoadedModel:
  """The configured model (`utils.model_config`, checked against the checkpoint; the checkpoint's own
  architecture without a model file) of `base` (any format), routed over `library`'s experts when one is
  given, with the configured `routing` and the router inputs it declares it needs (`router_options`
  override `router_inputs`' settings, e.g. the oracle's `oracle_labels`)."""
  config = utils.model_config()
  if library is None:
    return load_model(base, config=config, **routing())
  library_ = lib.ExpertLibrary(library)
  names = list(names or library_.names())
  if routers.spec(router).reads_texts:
    for task in {library_.manifest(n)["dataset"] for n in names} - {None}:
      data.check_vocabulary(data.vocabulary(task), base)
  return load_model(base, library, router, names=names, config=config,
                    router_inputs=router_inputs(library_, names, router, held_out, **(router_options or {})),
                    **routing())


@gin.configurable
def assemble(base: str = gin.REQUIRED, library: str = gin.REQUIRED, output: str = gin.REQUIRED,
             router: str = "phatgoose", names: Optional[Sequence[str]] = None,
             held_out: data.HeldOut = data.NOTHING_HELD_OUT) -> str:
  """Base + library experts + router -> one native checkpoint (`params` and the `experts` collection, or
  the merged `lora`) with its ExpertConfig. Per-example routers cannot be stored: their mixture depends
  on each input, so they are evaluated from the library."""
  if not routers.spec(router).per_token and router not in ("merged", "merged_products"):
    raise ValueError(f"router {router!r} picks one mixture per example from the example itself and cannot be "
                     f"assembled into a checkpoint; evaluate it with --library instead")
  loaded = load(base, library, router, names, held_out)
  native.save_native(output, loaded.variables, loaded.model.config, loaded.model.experts, overwrite=True)
  return output

