"""The pipeline's stages, each a gin-configurable function (model -> experts -> gates -> library -> routed model).

  train_multitask  one model on a task or mixture: full fine-tuning (also base pretraining from scratch,
                   written as a native checkpoint) or one LoRA (written into a library)
  train_expert     base frozen, `lora/.*` trainable (algorithm.md §2); the expert goes into the library
  train_gate       base and expert frozen, `gates/.*` trainable (algorithm.md §3); the entry is replaced by expert+gate
  assemble         library experts + a router -> a routed native checkpoint
  evaluate         a task or mixture on the base, a checkpoint, or library experts combined by a router
  route_stats      per dataset and layer, the distribution of the experts the router chooses

Training stages run the `Trainer` (optax AdamW, orbax checkpoints that resume, TensorBoard) on a
(data, model, expert) mesh with logical-axis rules (`partitioning.make_mesh`,
`partitioning.standard_logical_axis_rules`, both configurable in gin); evaluation places the variables and
batches with the same shardings. Held-out data never reaches expert, gate, average-activation or
retrieval building: `declare_held_out` names it, and `check_held_in` refuses it (`HeldOutError`).
"""
import functools
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio

from phatgoose_jax import library as lib
from phatgoose_jax import partitioning
from phatgoose_jax import vocab as vocab_lib
from phatgoose_jax.checkpoints import names as ckpt_names
from phatgoose_jax.checkpoints import native
from phatgoose_jax.evaluation import evaluator, route_stats as route_stats_lib
from phatgoose_jax.models import EncoderDecoderModel, pad_tokens, shift_right
from phatgoose_jax.experts import config as expert_config
from phatgoose_jax.t5 import config as t5_config
from phatgoose_jax.training import optimizers
from phatgoose_jax.training import workdir as workdirs
from phatgoose_jax.training.data import DeterministicBatches
from phatgoose_jax.training.trainer import Trainer
from phatgoose_jax.tasks import flan

_HELD_OUT: Dict[str, Any] = {"tasks": set(), "predicates": []}


class HeldOutError(ValueError):
  """Held-out data was passed to a stage that builds experts, gates or routers."""


def declare_held_out(tasks: Sequence[str] = (), predicate: Optional[Callable[[str], bool]] = None) -> None:
  """Mark task names (and, with `predicate(inputs_text)`, individual examples) as held out."""
  _HELD_OUT["tasks"].update(tasks)
  if predicate is not None and predicate not in _HELD_OUT["predicates"]:
    _HELD_OUT["predicates"].append(predicate)


def check_held_in(tasks: Sequence[str], examples: Sequence[dict] = ()) -> None:
  """Raise `HeldOutError` if any task is held out or any example's `inputs` is a held-out example."""
  leaked = sorted(set(tasks) & _HELD_OUT["tasks"])
  if leaked:
    raise HeldOutError(f"held-out tasks {leaked} must not be used to build experts, gates or routers")
  for example in examples:
    if any(p(example["inputs"]) for p in _HELD_OUT["predicates"]):
      raise HeldOutError(f"a held-out example reached expert / router building: {example['inputs']!r}")


@gin.configurable
def run(stage=gin.REQUIRED, register_demo_tasks: bool = True, demo_seed: int = 0):
  """Call the configured stage (a gin reference to a pipeline function); the task registries are loaded with
  this module, and with `register_demo_tasks` the synthetic suite's tasks (`demo_*`, for `demo_seed`) too."""
  if register_demo_tasks:
    from phatgoose_jax.demo import suite  # pylint: disable=import-outside-toplevel
    suite.register(demo_seed)
    declare_held_out(suite.HELD_OUT_TASKS, suite.is_held_out)
  return stage()


# ---- configuration ------------------------------------------------------------------------------------


@gin.configurable
def model_config(size: str = "tiny", overrides: Optional[dict] = None, dropout_rate: float = 0.1,
                 dtype: str = "float32") -> t5_config.T5Config:
  """A T5 v1.1 preset (`tiny`, `small` ... `xxl`) with optional architecture `overrides`."""
  return t5_config.preset(size, **(overrides or {})).replace(dropout_rate=dropout_rate, dtype=dtype)


@gin.configurable
def lora_config(rank: int = 16, targets: Sequence[str] = t5_config.ALL_TARGETS) -> expert_config.ExpertConfig:
  """The single-expert LoRA of algorithm.md §2 (rank 16 on every linear layer)."""
  return expert_config.ExpertConfig(mode="lora", rank=rank, targets=tuple(targets))


@gin.configurable
def optimizer(num_steps: int, learning_rate: float = 5e-3, warmup_fraction: float = 0.06,
              clip_norm: float = 1.0, weight_decay: float = 0.0):
  """AdamW, linear warmup over the first 6% of steps then constant, clipping at 1.0 (algorithm.md §2)."""
  return optimizers.make_optimizer("adamw", learning_rate, num_steps, warmup_fraction, weight_decay, clip_norm)


@gin.configurable
def sharding(mesh=None, rules=None) -> tuple:
  """(Mesh, logical axis rules): `partitioning.make_mesh()` and the standard rules unless given."""
  return mesh or partitioning.make_mesh(), tuple(rules or partitioning.standard_logical_axis_rules())


@functools.lru_cache(maxsize=None)
def get_model(config: t5_config.T5Config, experts: expert_config.ExpertConfig = expert_config.ExpertConfig()):
  """One `EncoderDecoderModel` per (config, experts): its jitted functions compile once per process."""
  return EncoderDecoderModel(config, experts)


# ---- data ---------------------------------------------------------------------------------------------


def task_names(name: str) -> List[str]:
  """The tasks of a registered task or mixture."""
  provider = seqio.get_mixture_or_task(name)
  return [t.name for t in provider.tasks] if isinstance(provider, seqio.Mixture) else [provider.name]


def text_examples(name: str, split: str = "train", max_examples: Optional[int] = None) -> List[dict]:
  """`{inputs, targets, task}` of a training task, or of every task of a mixture (concatenated)."""
  rows = []
  for task_name in task_names(name):
    source = seqio.get_mixture_or_task(task_name).source
    for i, example in enumerate(source.examples(split)):
      if max_examples is not None and i >= max_examples:
        break
      rows.append({"inputs": example["inputs"], "targets": example["targets"], "task": task_name})
  if not rows:
    raise ValueError(f"{name} has no {split!r} examples")
  return rows


def featurize(examples: Sequence[dict], vocabulary: seqio.Vocabulary, input_length: int,
              target_length: int) -> Dict[str, np.ndarray]:
  """t5x features of text examples: inputs and targets encoded (EOS kept), truncated and zero-padded."""
  inputs = [vocab_lib.encode(vocabulary, e["inputs"], input_length) for e in examples]
  targets = pad_tokens([vocab_lib.encode(vocabulary, e["targets"], target_length) for e in examples], target_length)
  return {"encoder_input_tokens": pad_tokens(inputs, input_length), "decoder_input_tokens": shift_right(targets),
          "decoder_target_tokens": targets}


def feature_batches(features: Dict[str, np.ndarray], batch_size: int) -> List[Dict[str, np.ndarray]]:
  """Consecutive batches (the last one shorter) of a features dict."""
  size = len(features["encoder_input_tokens"])
  return [{k: v[i:i + batch_size] for k, v in features.items()} for i in range(0, size, batch_size)]


# ---- models and checkpoints ---------------------------------------------------------------------------


def load_base(path: str) -> tuple:
  """`(T5Config, params)` of a native checkpoint (holding `params`), a Hugging Face directory or a t5x one."""
  from phatgoose_jax.checkpoints import hf, t5x  # pylint: disable=import-outside-toplevel
  config_file = os.path.join(path, native.CONFIG_FILE)
  if os.path.isfile(config_file):
    with open(config_file) as f:
      is_native = json.load(f).get("format") == native.FORMAT
    if is_native:
      restored = native.load_native(path)
      return restored.t5_config, restored.state["params"]
    return hf.load_hf(path)
  return t5x.load_t5x(path)


def _reboxed(boxed: Any, values: Any) -> Any:
  """`values` (plain arrays) carrying the logical axis names of the matching boxed tree."""
  is_box = lambda x: isinstance(x, nn.Partitioned)
  return jax.tree.map(lambda b, v: b.replace_boxed(jnp.asarray(v)) if is_box(b) else jnp.asarray(v),
                      boxed, values, is_leaf=is_box)


def init_variables(model: EncoderDecoderModel, seed: int, **collections) -> dict:
  """Boxed fresh variables of `model`, with the given collections (plain arrays) put in place."""
  variables = model.get_initial_variables(jax.random.key(seed))
  for name, values in collections.items():
    variables[name] = _reboxed(variables[name], values)
  return variables


def _abstract_boxed(model: EncoderDecoderModel) -> dict:
  return jax.eval_shape(lambda: model.get_initial_variables(jax.random.key(0)))


def place(model: EncoderDecoderModel, variables: dict, mesh, rules) -> dict:
  """`variables` placed with the NamedShardings their logical axes give on `mesh`."""
  abstract = _abstract_boxed(model)
  abstract = {k: abstract[k] for k in variables}
  shardings = partitioning.variables_shardings(abstract, mesh, rules)
  return jax.device_put(partitioning.unbox(variables), shardings)


# ---- training -----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _jit_metrics(model: EncoderDecoderModel):
  return jax.jit(lambda variables, batch: model.loss_fn(variables, batch)[1])


def _eval_loss_fn(model: EncoderDecoderModel, features: Dict[str, np.ndarray], batch_size: int):
  """variables -> {"loss"}: the token-weighted validation loss over `features`."""
  batches = feature_batches(features, batch_size)
  loss = _jit_metrics(model)

  def eval_fn(variables):
    totals = [loss(variables, b) for b in batches]
    tokens = sum(float(t["num_tokens"]) for t in totals)
    return {"loss": sum(float(t["loss"]) * float(t["num_tokens"]) for t in totals) / max(tokens, 1.0)}
  return eval_fn


@gin.configurable(denylist=["model", "variables", "trainable", "train", "validation", "workdir"])
def fit(model: EncoderDecoderModel, variables: dict, trainable: Sequence[str], train: Dict[str, np.ndarray],
        validation: Optional[Dict[str, np.ndarray]], workdir: str, num_steps: int, batch_size: int = 32,
        seed: int = 0, dropout_seed: int = 0, accum_steps: int = 1, checkpoint_every: Optional[int] = None,
        eval_every: Optional[int] = None) -> dict:
  """Train the `trainable` leaves of `variables` on `train` features; returns the best variables.

  `batch_size` is the effective batch, split into `accum_steps` micro-batches. `seed` orders the data;
  `dropout_seed` draws dropout masks (a constant of the compiled step, so runs that share it share compiled
  code). Checkpoints (orbax) and TensorBoard go under `workdir`; an existing checkpoint there resumes. The
  kept variables are those of the best validation loss (or the last step without `validation`).
  """
  mesh, rules = sharding()
  eval_fn = None if validation is None else _eval_loss_fn(model, validation, batch_size)
  trainer = Trainer(model.loss_fn, variables, trainable=trainable, optimizer=optimizer(num_steps), mesh=mesh,
                    rules=rules, workdir=workdir, checkpoint_every=checkpoint_every or num_steps,
                    eval_fn=eval_fn, eval_every=eval_every or num_steps, seed=dropout_seed, accum_steps=accum_steps,
                    log_every=max(1, num_steps // 20))
  trainer.train(DeterministicBatches(train, batch_size, seed), num_steps)
  return jax.device_get(trainer.best_variables())


@gin.configurable(denylist=["examples"])
def data_features(examples: Sequence[dict], vocabulary: str = "byte", input_length: int = 64,
                  target_length: int = 64) -> Dict[str, np.ndarray]:
  """Features of text examples with the configured vocabulary and lengths."""
  return featurize(examples, vocab_lib.get_vocabulary(vocabulary), input_length, target_length)


def _datasets(task: str, max_train_examples: Optional[int], max_validation_examples: Optional[int]) -> tuple:
  train = text_examples(task, "train", max_train_examples)
  try:
    validation = text_examples(task, "validation", max_validation_examples)
  except (ValueError, KeyError):
    validation = None
  return train, validation


def _training_record(task: str, num_train: int, started: float, **extra) -> dict:
  return {"task": task, "num_train_examples": num_train, "seconds": round(time.time() - started, 3), **extra,
          "gin": gin.config_str()}


@gin.configurable
def train_expert(base: str = gin.REQUIRED, task: str = gin.REQUIRED, library: str = gin.REQUIRED,
                 workdir: str = gin.REQUIRED, name: Optional[str] = None, num_steps: int = 1000,
                 seed: int = 0, max_train_examples: Optional[int] = None,
                 max_validation_examples: Optional[int] = 1000) -> dict:
  """Train one LoRA expert on `task` (base frozen, algorithm.md §2) and add it to `library`; returns its manifest."""
  check_held_in(task_names(task))
  started = time.time()
  train, validation = _datasets(task, max_train_examples, max_validation_examples)
  check_held_in([], train + (validation or []))
  config, params = load_base(base)
  model = get_model(config, lora_config())
  variables = init_variables(model, seed, params=params)
  fingerprint = lib.base_fingerprint(config, params)
  workdirs.claim(workdir, {"stage": "expert", "task": task, "name": name or task, "base": fingerprint,
                           "config": {"rank": model.experts.rank, "targets": model.experts.targets,
                                      "num_steps": num_steps, "seed": seed}})
  trained = fit(model, variables, ["lora/.*"], data_features(train),
                None if validation is None else data_features(validation), workdir, num_steps, seed=seed)
  record = _training_record(task, len(train), started, stage="expert", num_steps=num_steps, seed=seed)
  return lib.ExpertLibrary(library).add(name or task, trained["lora"], base=fingerprint,
                                        dataset=task, training={"expert": record})


@gin.configurable
def train_gate(base: str = gin.REQUIRED, library: str = gin.REQUIRED, name: str = gin.REQUIRED,
               workdir: str = gin.REQUIRED, task: Optional[str] = None, num_steps: int = 100, seed: int = 0,
               max_train_examples: Optional[int] = None, max_validation_examples: Optional[int] = 1000) -> dict:
  """Train the gates of library expert `name` on its dataset (expert frozen, algorithm.md §3); stores expert + gate."""
  library_ = lib.ExpertLibrary(library)
  expert = library_.load(name)
  task = task or expert.manifest["dataset"]
  check_held_in(task_names(task))
  started = time.time()
  train, validation = _datasets(task, max_train_examples, max_validation_examples)
  check_held_in([], train + (validation or []))
  config, params = load_base(base)
  model = get_model(config, lora_config().replace(mode="gated", rank=expert.manifest["rank"],
                                                  targets=tuple(expert.manifest["targets"])))
  variables = init_variables(model, seed, params=params, lora=ckpt_names.unflatten(expert.lora))
  workdirs.claim(workdir, {"stage": "gate", "task": task, "name": name, "base": expert.manifest["base"],
                           "config": {"num_steps": num_steps, "seed": seed}})
  trained = fit(model, variables, ["gates/.*"], data_features(train),
                None if validation is None else data_features(validation), workdir, num_steps, seed=seed)
  training = dict(expert.manifest["training"],
                  gate=_training_record(task, len(train), started, stage="gate", num_steps=num_steps, seed=seed))
  return library_.add(name, expert.lora, base=expert.manifest["base"], gates=trained["gates"],
                      dataset=expert.manifest["dataset"], dtype=expert.manifest["dtype"], training=training,
                      replace=True)


@gin.configurable
def train_multitask(task: str = gin.REQUIRED, output: str = gin.REQUIRED, workdir: str = gin.REQUIRED,
                    base: Optional[str] = None, finetune: str = "lora", name: str = "multitask",
                    num_steps: int = 1000, seed: int = 0, max_train_examples: Optional[int] = None,
                    max_validation_examples: Optional[int] = 1000) -> str:
  """One model on the union of `task`'s data (needs all of it at once; a reference, algorithm.md §5).

  finetune='full' trains every parameter (from `base`, or from scratch without one: base pretraining) and
  writes a native checkpoint to `output`; finetune='lora' trains one LoRA on `base` and adds it to the
  library at `output` as expert `name`. Returns `output`.
  """
  if finetune not in ("full", "lora"):
    raise ValueError(f"finetune must be 'full' or 'lora', got {finetune!r}")
  started = time.time()
  train, validation = _datasets(task, max_train_examples, max_validation_examples)
  config, params = load_base(base) if base else (model_config(), None)
  full = finetune == "full"
  model = get_model(config, expert_config.ExpertConfig() if full else lora_config())
  variables = init_variables(model, seed) if params is None else init_variables(model, seed, params=params)
  workdirs.claim(workdir, {"stage": "multitask", "task": task, "name": name,
                           "base": None if params is None else lib.base_fingerprint(config, params),
                           "config": {"finetune": finetune, "num_steps": num_steps, "seed": seed}})
  trained = fit(model, variables, ["params/.*"] if full else ["lora/.*"], data_features(train),
                None if validation is None else data_features(validation), workdir, num_steps, seed=seed)
  if full:
    native.save_native(output, {"params": trained["params"]}, config.replace(dropout_rate=0.0), overwrite=True)
  else:
    record = _training_record(task, len(train), started, stage="multitask", num_steps=num_steps, seed=seed)
    lib.ExpertLibrary(output).add(name, trained["lora"], base=lib.base_fingerprint(config, params), dataset=task,
                                  training={"multitask": record})
  return output


# ---- routing ------------------------------------------------------------------------------------------


def _router_data(library_: lib.ExpertLibrary, names: Sequence[str], max_examples: int, batch_size: int) -> dict:
  """{expert: [batches of its training data]} for average-activation and retrieval routers (held-in only)."""
  data = {}
  for name in names:
    task = library_.manifest(name)["dataset"]
    check_held_in(task_names(task))
    examples = text_examples(task, "train", max_examples)
    check_held_in([], examples)
    features = data_features(examples)
    batches = feature_batches(features, batch_size)
    for batch, start in zip(batches, range(0, len(examples), batch_size)):
      batch["inputs"] = [e["inputs"] for e in examples[start:start + batch_size]]
    data[name] = batches
  return data


@gin.configurable(denylist=["library_", "names", "params"])
def routing(library_: lib.ExpertLibrary, names: Sequence[str], params: dict, router: str = "phatgoose",
            top_k: int = 2, impl: str = "auto", router_examples: int = 1000, batch_size: int = 64,
            retrieval_embedder: str = "base", oracle_labels: Optional[dict] = None):
  """The library's `router` over experts `names` (algorithm.md §4-§5); data-driven routers read their experts'
  training data (at most `router_examples` per expert)."""
  kwargs: Dict[str, Any] = {}
  if router in ("phatgoose", "average_activation", "arrow"):
    kwargs.update(top_k=top_k, impl=impl)
  if router in ("uniform", "oracle", "retrieval"):
    kwargs.update(impl=impl)
  if router == "average_activation":
    kwargs.update(params=params, data=_router_data(library_, names, router_examples, batch_size))
  if router == "retrieval":
    kwargs.update(params=params, embedder=retrieval_embedder,
                  examples=_router_data(library_, names, router_examples, batch_size))
  if router == "oracle" and oracle_labels is not None:
    kwargs.update(label_to_expert=oracle_labels)
  return library_.route(list(names), router, **kwargs)


@gin.configurable
def assemble(base: str = gin.REQUIRED, library: str = gin.REQUIRED, output: str = gin.REQUIRED,
             router: str = "phatgoose", names: Optional[Sequence[str]] = None) -> str:
  """Library experts + router -> a native checkpoint holding `params` and the routed `experts` (or merged
  `lora`) collection, with its ExpertConfig. Per-example routers (uniform, oracle, retrieval) also need
  their per-example weights at evaluation time: evaluate those from the library instead."""
  library_ = lib.ExpertLibrary(library)
  config, params = load_base(base)
  routed = routing(library_, list(names or library_.names()), params, router=router)
  native.save_native(output, routed.variables(params), config.replace(dropout_rate=0.0), routed.expert_config,
                     overwrite=True)
  return output


def load_model(base: Optional[str] = None, checkpoint: Optional[str] = None, library: Optional[str] = None,
               router: str = "phatgoose", names: Optional[Sequence[str]] = None,
               router_options: Optional[dict] = None) -> tuple:
  """(model, variables, expert_weights_fn or None) of a base, an assembled checkpoint, or library + router."""
  if checkpoint:
    restored = native.load_native(checkpoint)
    experts = restored.expert_config or expert_config.ExpertConfig()
    return get_model(restored.t5_config.replace(dropout_rate=0.0), experts), restored.state, None
  config, params = load_base(base)
  config = config.replace(dropout_rate=0.0)
  if not library:
    return get_model(config), {"params": params}, None
  library_ = lib.ExpertLibrary(library)
  routed = routing(library_, list(names or library_.names()), params, router=router, **(router_options or {}))
  return get_model(config, routed.expert_config), routed.variables(params), routed.expert_weights


# ---- evaluation ---------------------------------------------------------------------------------------


@gin.configurable(denylist=["model", "variables", "expert_weights"])
def runner(model, variables, expert_weights=None, vocabulary: str = "byte", batch_size: int = 64,
           input_length: int = 64, target_length: int = 64) -> evaluator.Runner:
  """The model as score / generate functions, placed on the configured mesh."""
  mesh, rules = sharding()
  return evaluator.Runner(model, place(model, variables, mesh, rules), vocab_lib.get_vocabulary(vocabulary),
                          expert_weights, batch_size, input_length, target_length,
                          partitioning.batch_sharding(mesh, rules))


@gin.configurable
def evaluate(task: str = gin.REQUIRED, output_dir: str = gin.REQUIRED, base: Optional[str] = None,
             checkpoint: Optional[str] = None, library: Optional[str] = None, router: str = "phatgoose",
             names: Optional[Sequence[str]] = None, router_options: Optional[dict] = None,
             method: Optional[str] = None,
             max_examples: Optional[int] = None, expert_pool: Optional[str] = None,
             data_dirs: Optional[dict] = None) -> dict:
  """Score a task or mixture (rank classification / greedy generation, algorithm.md §6); writes
  `output_dir/results.json` and `output_dir/results.md`, returns the results."""
  if library:  # the FLAN guard follows the experts' own datasets, whatever the caller says (algorithm.md §6)
    manifests = lib.ExpertLibrary(library).list()
    expert_pool = flan.pool_of(m.get("dataset") or m["name"] for m in manifests) or expert_pool
  flan.check_evaluation(expert_pool, task)  # before any model is loaded
  model, variables, weights = load_model(base, checkpoint, library, router, names, router_options)
  results = evaluator.evaluate(task, runner(model, variables, weights), max_examples=max_examples,
                               expert_pool=expert_pool, **(data_dirs or {}))
  label = method or (router if library else "checkpoint" if checkpoint else "base")
  evaluator.write_results({label: results}, output_dir)
  return results


@gin.configurable
def route_stats(task: str = gin.REQUIRED, output_dir: str = gin.REQUIRED, base: Optional[str] = None,
                checkpoint: Optional[str] = None, library: Optional[str] = None, router: str = "phatgoose",
                names: Optional[Sequence[str]] = None, router_options: Optional[dict] = None,
                max_examples: Optional[int] = 200,
                data_dirs: Optional[dict] = None) -> dict:
  """Per dataset and layer, the fraction of top-k choices each expert gets; JSON + one heatmap per dataset."""
  model, variables, _ = load_model(base, checkpoint, library, router, names, router_options)
  if model.experts.mode != "routed":
    raise ValueError("route statistics need a per-token routed model (a routed checkpoint, or a library with a "
                     "per-token router: phatgoose, average_activation, arrow)")
  run = runner(model, variables)
  expert_names = list(names or lib.ExpertLibrary(library).names()) if library else None
  stats = route_stats_lib.collect(task, run, max_examples=max_examples, **(data_dirs or {}))
  route_stats_lib.write(stats, output_dir, expert_names)
  return stats
