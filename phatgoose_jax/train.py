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
"""
import functools
import time
from typing import Dict, Optional, Sequence

import gin
import jax
import numpy as np
from jax.experimental import multihost_utils

from phatgoose_jax import data, distributed
from phatgoose_jax import library as lib
from phatgoose_jax import utils
from phatgoose_jax.checkpoints import names as ckpt_names
from phatgoose_jax.checkpoints import native
from phatgoose_jax.experts.config import ExpertConfig
from phatgoose_jax.models import EncoderDecoderModel
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


@gin.configurable(denylist=["model", "variables", "trainable", "train", "validation", "workdir"])
def fit(model: EncoderDecoderModel, variables: dict, trainable: Sequence[str], train: Dict[str, np.ndarray],
        validation: Optional[Dict[str, np.ndarray]], workdir: str, num_steps: int, batch_size: int = 32,
        seed: int = 0, dropout_seed: int = 0, accum_steps: int = 1, checkpoint_every: Optional[int] = None,
        eval_every: Optional[int] = None) -> dict:
  """Train the `trainable` leaves of `variables` on `train` features; returns the best variables.

  `batch_size` is the effective (global) batch, split into `accum_steps` micro-batches. `seed` orders the
  data; `dropout_seed` draws dropout masks (a constant of the compiled step, so runs that share it share
  compiled code). Checkpoints (orbax) and TensorBoard go under `workdir`; an existing checkpoint there
  resumes. The kept variables are those of the best validation loss (or the last step without
  `validation`). `train` holds this process's shard of the data; each process feeds its rows of a batch.
  """
  for name, value in (("num_steps", num_steps), ("batch_size", batch_size), ("accum_steps", accum_steps)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__}); bind it as a "
                       f"number, e.g. --gin \"train.fit.{name} = 32\"")
  mesh, rules = utils.sharding()
  eval_fn = None if validation is None else _eval_loss_fn(model, validation, batch_size)
  trainer = Trainer(model.loss_fn, variables, trainable=trainable, optimizer=optimizers.make_optimizer(num_steps=num_steps), mesh=mesh,
                    rules=rules, workdir=workdir, checkpoint_every=checkpoint_every or num_steps,
                    eval_fn=eval_fn, eval_every=eval_every or num_steps, seed=dropout_seed, accum_steps=accum_steps,
                    log_every=max(1, num_steps // 20))
  rows = trainer.local_rows(batch_size)
  trainer.train(DeterministicBatches(data.model_features(train), rows.stop - rows.start, seed), num_steps)
  best = trainer.best_variables()
  return jax.device_get(best) if jax.process_count() == 1 else multihost_utils.process_allgather(best, tiled=True)


def datasets(task: str, held_out: data.HeldOut, max_train_examples: Optional[int],
             max_validation_examples: Optional[int]) -> tuple:
  """(train, validation or None) features of `task`, this process's shard of each."""
  mesh, rules = utils.sharding()
  shard = distributed.shard_info(mesh, rules)
  lengths = data.feature_lengths()
  train = data.examples(task, "train", lengths, max_examples=max_train_examples, held_out=held_out,
                        shard_info=shard)
  try:
    validation = data.examples(task, "validation", lengths, max_examples=max_validation_examples,
                               held_out=held_out, shard_info=shard)
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
                 max_validation_examples: Optional[int] = 1000,
                 held_out: data.HeldOut = data.NOTHING_HELD_OUT) -> dict:
  """Train one LoRA expert on `task` (base frozen, algorithm.md §2) and add it to `library`; its manifest."""
  started = time.time()
  train, validation = datasets(task, held_out, max_train_examples, max_validation_examples)
  loaded = utils.restore_base(base)
  params = loaded.variables["params"]
  model = utils.get_model(loaded.config, utils.lora_config())
  fingerprint = lib.base_fingerprint(loaded.config, params)
  workdirs.claim(workdir, {"stage": "expert", "task": task, "name": name or task, "base": fingerprint,
                           "config": {"rank": model.experts.rank, "targets": model.experts.targets,
                                      "num_steps": num_steps, "seed": seed}})
  trained = fit(model, utils.init_variables(model, seed, params=params), ["lora/.*"], train, validation, workdir,
                num_steps, seed=seed)
  record = _training_record(task, len(train["encoder_input_tokens"]), started, stage="expert",
                            num_steps=num_steps, seed=seed)
  return lib.ExpertLibrary(library).add(name or task, trained["lora"], base=fingerprint, dataset=task,
                                        training={"expert": record})


@gin.configurable
def train_gate(base: str = gin.REQUIRED, library: str = gin.REQUIRED, name: str = gin.REQUIRED,
               workdir: str = gin.REQUIRED, task: Optional[str] = None, num_steps: int = 100, seed: int = 0,
               max_train_examples: Optional[int] = None, max_validation_examples: Optional[int] = 1000,
               held_out: data.HeldOut = data.NOTHING_HELD_OUT) -> dict:
  """Train the gates of library expert `name` on its dataset (expert frozen, algorithm.md §3); stores
  expert + gate in place of the expert."""
  library_ = lib.ExpertLibrary(library)
  expert = library_.load(name)
  task = task or expert.manifest["dataset"]
  if task is None:
    raise ValueError(f"expert {name!r} records no training dataset (it was imported); name the task its gate "
                     f"trains on (--task TASK)")
  started = time.time()
  train, validation = datasets(task, held_out, max_train_examples, max_validation_examples)
  loaded = utils.restore_base(base)
  params = loaded.variables["params"]
  if lib.base_fingerprint(loaded.config, params) != expert.manifest["base"]:
    raise ValueError(f"expert {name!r} was trained on another base model than {base}")
  model = utils.get_model(loaded.config, lib.expert_config(expert.manifest, mode="gated"))
  workdirs.claim(workdir, {"stage": "gate", "task": task, "name": name, "base": expert.manifest["base"],
                           "config": {"num_steps": num_steps, "seed": seed}})
  variables = utils.init_variables(model, seed, params=params, lora=ckpt_names.unflatten(expert.lora))
  trained = fit(model, variables, ["gates/.*"], train, validation, workdir, num_steps, seed=seed)
  record = _training_record(task, len(train["encoder_input_tokens"]), started, stage="gate", num_steps=num_steps,
                            seed=seed)
  return library_.add(name, expert.lora, base=expert.manifest["base"], gates=trained["gates"],
                      dataset=expert.manifest["dataset"], dtype=expert.manifest["dtype"],
                      training=dict(expert.manifest["training"], gate=record), replace=True)


@gin.configurable
def train_multitask(task: str = gin.REQUIRED, output: str = gin.REQUIRED, workdir: str = gin.REQUIRED,
                    base: Optional[str] = None, finetune: str = "lora", name: str = "multitask",
                    num_steps: int = 1000, seed: int = 0, max_train_examples: Optional[int] = None,
                    max_validation_examples: Optional[int] = 1000,
                    held_out: data.HeldOut = data.NOTHING_HELD_OUT) -> str:
  """One model on the union of `task`'s data (needs all of it at once; a reference, algorithm.md §5).

  finetune='full' trains every parameter (from `base`, or from scratch without one: base pretraining,
  with the configured model) and writes a native checkpoint to `output`; finetune='lora' trains one LoRA
  on `base` and adds it to the library at `output` as expert `name`. Returns `output`.
  """
  if finetune not in ("full", "lora"):
    raise ValueError(f"finetune must be 'full' or 'lora', got {finetune!r}")
  if base is None and (finetune == "lora" or utils.model_config() is None):
    raise ValueError("training without a base needs finetune='full' and a configured model (a gin/models file)")
  started = time.time()
  train, validation = datasets(task, held_out, max_train_examples, max_validation_examples)
  if base is None:
    config, params = utils.model_config(), None
  else:
    loaded = utils.restore_base(base)
    config, params = loaded.config, loaded.variables["params"]
  full = finetune == "full"
  model = utils.get_model(config, ExpertConfig() if full else utils.lora_config())
  variables = utils.init_variables(model, seed, **({} if params is None else {"params": params}))
  workdirs.claim(workdir, {"stage": "multitask", "task": task, "name": name,
                           "base": None if params is None else lib.base_fingerprint(config, params),
                           "config": {"finetune": finetune, "num_steps": num_steps, "seed": seed}})
  trained = fit(model, variables, ["params/.*"] if full else ["lora/.*"], train, validation, workdir, num_steps,
                seed=seed)
  if full:
    native.save_native(output, {"params": trained["params"]}, config.replace(dropout_rate=0.0), overwrite=True)
  else:
    record = _training_record(task, len(train["encoder_input_tokens"]), started, stage="multitask",
                              num_steps=num_steps, seed=seed)
    lib.ExpertLibrary(output).add(name, trained["lora"], base=lib.base_fingerprint(config, params), dataset=task,
                                  training={"multitask": record})
  return output
