"""The training stages, each a gin-configurable function (model -> experts -> gates; t5x `train.py` style).

  train_expert     base frozen, `lora/.*` trainable (algorithm.md §2); the expert goes into the library
  train_gate       base and expert frozen, `gates/.*` trainable (algorithm.md §3); the entry is replaced by
                   expert + gate
  train_multitask  one model on a task or mixture: full fine-tuning (also base pretraining from scratch,
                   written as a native checkpoint) or one LoRA (written into a library)

Data comes through seqio (`data.examples`: the task's preprocessors and `EncDecFeatureConverter`), each
process reading its shard; the `Trainer` (optax, orbax checkpoints that resume, TensorBoard) runs on the
configured (data, model, expert) mesh. A work directory belongs to one run (`training.workdir.claim`).
Held-out data never reaches these stages: `held_out` (a `data.HeldOut`) refuses it.

Checkpoint selection (algorithm.md §2, `selection`): an expert (and a multitask model) keeps the candidate step
(0, every `fit.eval_every` = 100 steps, the last) of the best validation TASK METRIC, ties to the later step,
validated on `data.validation_task(task)` as the official trainer validates on the dataset's EVAL scope
(colm/experiments/train_single_task_loralinear.gin:6, src/procedures/evaluator.py:122-136). A gate keeps its
last step: the official gate run trains 100 steps with only the step-100 validation (train_gate.sh:74 runs
P/TRAIN alone), so its kept weights are the last step's.

Multi-host: every process trains and validates; only process 0 logs and writes the library (or a native
checkpoint); the others wait at a barrier and return what it wrote, read back (`_written_once`).
"""
import dataclasses
import functools
import logging
import time
from typing import Callable, Dict, Optional, Sequence

import gin
import jax
import numpy as np
from jax.experimental import multihost_utils

from phatgoose_jax import data, distributed
from phatgoose_jax import library as lib
from phatgoose_jax import partitioning, utils
from phatgoose_jax.t5 import layout
from phatgoose_jax.checkpoints import names as ckpt_names
from phatgoose_jax.checkpoints import native
from phatgoose_jax.evaluation import evaluator
from phatgoose_jax.experts.config import ExpertConfig
from phatgoose_jax.models import EncoderDecoderModel
from phatgoose_jax.t5.config import T5Config
from phatgoose_jax.training import optimizers
from phatgoose_jax.training import workdir as workdirs
from phatgoose_jax.training.data import DeterministicBatches
from phatgoose_jax.training.trainer import Trainer


@functools.lru_cache(maxsize=None)
def _jit_metrics(model: EncoderDecoderModel):
  return jax.jit(lambda variables, batch: model.loss_fn(variables, batch)[1])


def _eval_loss_fn(model: EncoderDecoderModel, features: Dict[str, np.ndarray], batch_size: int):
  """variables -> {"loss"}: the token-weighted validation loss over `features`."""
  batches = data.batches(data.model_features(features), batch_size)
  loss = _jit_metrics(model)

  def eval_fn(variables):
    totals = [loss(variables, b) for b in batches]
    tokens = sum(float(t["num_tokens"]) for t in totals)
    return {"loss": sum(float(t["loss"]) * float(t["num_tokens"]) for t in totals) / max(tokens, 1.0)}
  return eval_fn


def _eval_metric_fn(model: EncoderDecoderModel, task: str, vocabulary, max_examples: Optional[int],
                    batch_size: int):
  """variables -> {"score", "<task>/<metric>"...}: `evaluator.evaluate` of evaluation task `task` (its score is
  the mean of its metrics, a mixture's the mean over its tasks: algorithm.md §6)."""
  mesh, rules = utils.sharding()
  lengths = data.feature_lengths()

  def eval_fn(variables):
    runner = evaluator.Runner(model, variables, vocabulary, batch_size=batch_size, input_length=lengths["inputs"],
                              target_length=lengths["targets"],
                              batch_sharding=partitioning.batch_sharding(mesh, rules))
    result = evaluator.evaluate(task, runner, max_examples=max_examples)
    return {"score": result["score"], **{f"{t}/{m}": v for t, r in result["tasks"].items()
                                         for m, v in r["metrics"].items()}}
  return eval_fn


@dataclasses.dataclass(frozen=True)
class Selection:
  """How `fit` chooses the kept step: `eval_fn(variables) -> metrics`, whose `key` is `mode` ('max'/'min')."""
  eval_fn: Callable[[dict], dict]
  key: str
  mode: str


def _warn(message: str, *args) -> None:
  if distributed.is_writer():
    logging.warning(message, *args)


@gin.configurable(allowlist=["batch_size"])
def selection(model: EncoderDecoderModel, task: str, held_out: data.HeldOut, max_examples: Optional[int] = None,
              batch_size: int = 64) -> Optional[Selection]:
  """The checkpoint selection of a run training on `task` (algorithm.md §2).

  With an evaluation task `data.validation_task(task)`: its score (the task metric, e.g. rank-classification
  accuracy), maximised, over at most `max_examples` examples per task (None: the whole validation split, as
  the official EVAL datasets, colm/datasets/p3_t5xl.gin). Without one, a logged warning and the token-weighted
  loss on the task's `validation` split (minimised); without that either, a warning and None (the last step is
  kept). The official trainer has no loss fallback: a dataset without metrics is skipped
  (src/procedures/evaluator.py:79) and the step-0 weights would stay kept.
  """
  eval_task = data.validation_task(task)
  if eval_task is not None:
    held_out.check_tasks(data.task_names(eval_task))
    return Selection(_eval_metric_fn(model, eval_task, data.vocabulary(task), max_examples, batch_size), "score",
                     "max")
  try:  # the whole split in every process, so that all of them compute the same loss and keep the same step
    features = data.examples(task, "validation", data.feature_lengths(), max_examples=max_examples,
                             held_out=held_out)
  except (ValueError, KeyError):
    _warn("%s has no evaluation task (%s_eval) and no validation split: the last step is kept", task, task)
    return None
  _warn("%s has no evaluation task (%s_eval): checkpoints are selected by the validation loss", task, task)
  return Selection(_eval_loss_fn(model, features, batch_size), "loss", "min")


def training_loss(model: EncoderDecoderModel, loss_groups: int, accum_steps: int) -> tuple:
  """(loss_fn of one micro-batch, the metric weighting micro-batches in `Trainer`) for a batch whose loss is the
  mean of `loss_groups` group token means (`model.loss_fn`; the official micro-batches,
  src/procedures/trainer.py:145-151): each of the `accum_steps` micro-batches holds loss_groups / accum_steps
  whole groups and weighs the same. One group: every target token of the batch weighs the same, so micro-batches
  weigh by their token counts."""
  if loss_groups == 1:
    return model.loss_fn, "num_tokens"
  if loss_groups % accum_steps:
    raise ValueError(f"train.fit.loss_groups = {loss_groups} is not a multiple of train.fit.accum_steps = "
                     f"{accum_steps}: bind accum_steps to a divisor of it")
  return functools.partial(model.loss_fn, num_groups=loss_groups // accum_steps), None


@gin.configurable(denylist=["model", "variables", "trainable", "train", "validation", "workdir"])
def fit(model: EncoderDecoderModel, variables: dict, trainable: Sequence[str], train: Dict[str, np.ndarray],
        validation: Optional[Selection], workdir: str, num_steps: int, batch_size: int = 32,
        seed: int = 0, dropout_seed: int = 0, accum_steps: int = 1, loss_groups: int = 1,
        checkpoint_every: Optional[int] = None, eval_every: int = 100) -> dict:
  """Train the `trainable` leaves of `variables` on `train` features; returns the kept variables.

  `batch_size` is the effective (global) batch, split into `accum_steps` micro-batches. Its loss is the mean of
  `loss_groups` group token means (`training_loss`): the expert and gate run files bind 32, the official
  gradient accumulation factor (colm/experiments/train_single_task_loralinear.gin:8); 1 weights every target
  token of the batch equally (the multitask run and the demo). `seed` orders the
  data; `dropout_seed` draws dropout masks (a constant of the compiled step, so runs that share it share
  compiled code). Checkpoints (orbax) and TensorBoard go under `workdir`; an existing checkpoint there
  resumes. The kept variables are those of the best `validation` candidate (step 0, every `eval_every`
  steps, the last step; ties to the later one: `trainer.selection_key`), or of the last step without
  `validation`. `train` holds this process's shard of the data; each process feeds its rows of a batch.
  """
  for name, value in (("num_steps", num_steps), ("batch_size", batch_size), ("accum_steps", accum_steps),
                      ("loss_groups", loss_groups), ("eval_every", eval_every)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__}); bind it as a "
                       f"number, e.g. --gin \"train.fit.{name} = 32\"")
  mesh, rules = utils.sharding()
  select = {} if validation is None else {"eval_fn": validation.eval_fn, "best_mode": validation.mode,
                                          "best_fn": lambda metrics: metrics[validation.key]}
  if batch_size % loss_groups:
    raise ValueError(f"train.fit.batch_size = {batch_size} is not a multiple of train.fit.loss_groups = "
                     f"{loss_groups}: bind loss_groups to a divisor of the batch size")
  loss_fn, weight_key = training_loss(model, loss_groups, accum_steps)
  trainer = Trainer(loss_fn, variables, trainable=trainable, optimizer=optimizers.make_optimizer(num_steps=num_steps), mesh=mesh,
                    rules=rules, workdir=workdir, checkpoint_every=checkpoint_every or num_steps,
                    eval_every=eval_every, seed=dropout_seed, accum_steps=accum_steps, loss_weight_key=weight_key,
                    log_every=max(1, num_steps // 20), **select)
  rows = trainer.local_rows(batch_size)
  trainer.train(DeterministicBatches(data.model_features(train), rows.stop - rows.start, seed), num_steps)
  best = trainer.best_variables()
  return jax.device_get(best) if jax.process_count() == 1 else multihost_utils.process_allgather(best, tiled=True)


def train_examples(task: str, held_out: data.HeldOut, max_train_examples: Optional[int]) -> dict:
  """The training features of `task`, this process's shard."""
  mesh, rules = utils.sharding()
  return data.examples(task, "train", data.feature_lengths(), max_examples=max_train_examples, held_out=held_out,
                       shard_info=distributed.shard_info(mesh, rules))


def _written_once(write: Callable[[], object], read: Callable[[], object], barrier: str):
  """`write()` in process 0 only (`distributed.is_writer`); every process waits at the barrier `barrier`,
  then the others return `read()`: all processes return the same value."""
  written = write() if distributed.is_writer() else None
  multihost_utils.sync_global_devices(barrier)
  return written if distributed.is_writer() else read()


def _library_add(library: str, name: str, config: T5Config, lora, gates=None, **kwargs) -> dict:
  """`ExpertLibrary.add` by process 0 of `lora` and `gates` in the per-layer layout (from a model of `config`);
  every process returns the entry's manifest."""
  stored = layout.unstack_layers({"lora": lora, **({} if gates is None else {"gates": gates})}, config)
  add = lambda: lib.ExpertLibrary(library).add(name, stored["lora"], gates=stored.get("gates"), **kwargs)  # noqa: E731
  return _written_once(add,
                       lambda: lib.ExpertLibrary(library).manifest(name), f"library add {library} {name}")


def _training_record(task: str, num_train: int, started: float, **extra) -> dict:
  return {"task": task, "num_train_examples": num_train, "seconds": round(time.time() - started, 3), **extra,
          "gin": gin.config_str()}


@gin.configurable
def train_expert(base: str = gin.REQUIRED, task: str = gin.REQUIRED, library: str = gin.REQUIRED,
                 workdir: str = gin.REQUIRED, name: Optional[str] = None, num_steps: int = 1000,
                 seed: int = 0, max_train_examples: Optional[int] = None,
                 max_validation_examples: Optional[int] = None,
                 held_out: data.HeldOut = data.NOTHING_HELD_OUT) -> dict:
  """Train one LoRA expert on `task` (base frozen, algorithm.md §2), keep the step of the best validation
  task metric (`selection`), and add it to `library` (process 0); its manifest."""
  started = time.time()
  data.check_vocabulary(data.vocabulary(data.resolve(task)), base)
  train = train_examples(task, held_out, max_train_examples)
  loaded = utils.restore_base(base)
  params = loaded.variables["params"]
  model = utils.get_model(loaded.config, utils.lora_config())
  fingerprint = lib.base_fingerprint(loaded.config, params)
  workdirs.claim(workdir, {"stage": "expert", "task": task, "name": name or task, "base": fingerprint,
                           "config": {"rank": model.experts.rank, "targets": model.experts.targets,
                                      "num_steps": num_steps, "seed": seed}})
  validation = selection(model, task, held_out, max_examples=max_validation_examples)
  trained = fit(model, utils.init_variables(model, seed, params=params), ["lora/.*"], train, validation, workdir,
                num_steps, seed=seed)
  record = _training_record(task, len(train["encoder_input_tokens"]), started, stage="expert",
                            num_steps=num_steps, seed=seed)
  return _library_add(library, name or task, model.config, trained["lora"], base=fingerprint, dataset=task,
                      training={"expert": record})


@gin.configurable
def train_gate(base: str = gin.REQUIRED, library: str = gin.REQUIRED, name: str = gin.REQUIRED,
               workdir: str = gin.REQUIRED, task: Optional[str] = None, num_steps: int = 100, seed: int = 0,
               max_train_examples: Optional[int] = None,
               held_out: data.HeldOut = data.NOTHING_HELD_OUT) -> dict:
  """Train the gates of library expert `name` on its dataset (expert frozen, algorithm.md §3) and keep the last
  step (as the official gate run does: module docstring); process 0 stores expert + gate in place of the
  expert."""
  library_ = lib.ExpertLibrary(library)
  expert = library_.load(name)
  task = task or expert.manifest["dataset"]
  if task is None:
    raise ValueError(f"expert {name!r} records no training dataset (it was imported); name the task its gate "
                     f"trains on (--task TASK)")
  started = time.time()
  data.check_vocabulary(data.vocabulary(data.resolve(task)), base)
  train = train_examples(task, held_out, max_train_examples)
  loaded = utils.restore_base(base)
  params = loaded.variables["params"]
  if lib.base_fingerprint(loaded.config, params) != expert.manifest["base"]:
    raise ValueError(f"expert {name!r} was trained on another base model than {base}")
  model = utils.get_model(loaded.config, lib.expert_config(expert.manifest, mode="gated"))
  workdirs.claim(workdir, {"stage": "gate", "task": task, "name": name, "base": expert.manifest["base"],
                           "config": {"num_steps": num_steps, "seed": seed}})
  variables = utils.init_variables(model, seed, params=params, lora=ckpt_names.unflatten(expert.lora))
  trained = fit(model, variables, ["gates/.*"], train, None, workdir, num_steps, seed=seed)
  record = _training_record(task, len(train["encoder_input_tokens"]), started, stage="gate", num_steps=num_steps,
                            seed=seed)
  return _library_add(library, name, model.config, expert.lora, trained["gates"], base=expert.manifest["base"],
                      dataset=expert.manifest["dataset"], dtype=expert.manifest["dtype"],
                      training=dict(expert.manifest["training"], gate=record), replace=True)


@gin.configurable
def train_multitask(task: str = gin.REQUIRED, output: str = gin.REQUIRED, workdir: str = gin.REQUIRED,
                    base: Optional[str] = None, finetune: str = "lora", name: str = "multitask",
                    num_steps: int = 1000, seed: int = 0, max_train_examples: Optional[int] = None,
                    max_validation_examples: Optional[int] = None,
                    held_out: data.HeldOut = data.NOTHING_HELD_OUT) -> str:
  """One model on the union of `task`'s data (needs all of it at once; a reference, algorithm.md §5).

  finetune='full' trains every parameter (from `base`, or from scratch without one: base pretraining,
  with the configured model) and writes a native checkpoint to `output`; finetune='lora' trains one LoRA
  on `base` and adds it to the library at `output` as expert `name` (process 0 writes either). Kept: the step
  `selection` picks. Returns `output`.
  """
  if finetune not in ("full", "lora"):
    raise ValueError(f"finetune must be 'full' or 'lora', got {finetune!r}")
  if base is None and (finetune == "lora" or utils.model_config() is None):
    raise ValueError("training without a base needs finetune='full' and a configured model (a gin/models file)")
  started = time.time()
  data.check_vocabulary(data.vocabulary(data.resolve(task)), base)
  train = train_examples(task, held_out, max_train_examples)
  if base is None:
    config, params = utils.model_config(), None
  else:
    loaded = utils.restore_base(base, dtype="float32" if finetune == "full" else None)  # trained: float32
    config, params = loaded.config, loaded.variables["params"]
  full = finetune == "full"
  model = utils.get_model(config, ExpertConfig() if full else utils.lora_config())
  variables = utils.init_variables(model, seed, **({} if params is None else {"params": params}))
  workdirs.claim(workdir, {"stage": "multitask", "task": task, "name": name,
                           "base": None if params is None else lib.base_fingerprint(config, params),
                           "config": {"finetune": finetune, "num_steps": num_steps, "seed": seed}})
  validation = selection(model, task, held_out, max_examples=max_validation_examples)
  trained = fit(model, variables, ["params/.*"] if full else ["lora/.*"], train, validation, workdir, num_steps,
                seed=seed)
  if full:
    _written_once(lambda: native.save_native(output, {"params": trained["params"]}, config.replace(dropout_rate=0.0),
                                             overwrite=True), lambda: None, f"native checkpoint {output}")
  else:
    record = _training_record(task, len(train["encoder_input_tokens"]), started, stage="multitask",
                              num_steps=num_steps, seed=seed)
    _library_add(output, name, model.config, trained["lora"], base=lib.base_fingerprint(config, params), dataset=task,
                 training={"multitask": record})
  return output
