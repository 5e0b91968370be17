"""The one training loop: LoRA experts (algorithm.md §2), gates (algorithm.md §3) and full fine-tuning alike.

A model is any `loss_fn(variables, batch, dropout_rng) -> (loss, metrics)` over a variables dict of
collections (`params`, `lora`, `gates`, `experts`, ...). Which leaves train is a list of regexes over the
flattened paths `collection/path/to/leaf` (`['lora/.*']` trains the expert, `['gates/.*']` the gates);
every other leaf is frozen: it gets no gradient, no optimiser state and is never checkpointed.

One update from the effective batch of step s, split into A = `accum_steps` micro-batches of B/A examples:

  g_i, w_i = grad_theta loss_i, weight_i          (weight_i = metrics[loss_weight_key], or 1)
  g = sum_i w_i g_i / sum_i w_i                   (== the gradient of the whole batch's weighted mean loss)
  theta <- theta + optimizer.update(g)

so a token-weighted mean loss (sum(l * m) / sum(m), with `num_tokens = sum(m)` in its metrics) and a
plain per-example mean both accumulate to exactly the big-batch gradient (to float rounding), and so does the
official loss, the mean of equal groups' token means, with equal weights (`train.training_loss`).
Dropout's rng is `fold_in(fold_in(key(seed), s), i)` and the batch is `batch_fn(s)`: both pure functions of
the step, so a resumed run recomputes the same updates and ends bitwise equal to an uninterrupted one.
Trainable leaves and optimiser state are float32; the compute dtype is the model's business.

Checkpoint selection (algorithm.md §2): the candidates are step 0, every `eval_every`-th step and the last
step; each is validated by `eval_fn` and checkpointed with its metrics, and the kept one maximises

  key(step) = (+-best_fn(metrics), step)        (+ for best_mode 'max', - for 'min')

so ties go to the later step, as the official `>=` does (src/procedures/evaluator.py:122-136). The official
run validates at step 0 (colm/experiments/train.gin:61) and at every step % validation_step_interval == 0
(src/procedures/trainer.py:188-192); the last step is a candidate here too, so a run shorter than the
interval still keeps a trained step (with 1000 steps and an interval of 100 the candidates are the official
ones). The key is stored with each checkpoint, so a resumed run selects as an uninterrupted one.

Multi-host: every process runs the same loop. `batch_fn(s)` returns this process's rows of step s's
batch (`partitioning.process_batch_rows`; the whole batch on one process), from which each step builds the
global batch with `jax.make_array_from_process_local_data`; orbax saves and restores across processes, and
only process 0 writes TensorBoard events and the progress bar. The step is compiled under the mesh its state
is laid out on (`sharded.mesh_jit`) and `eval_fn` runs with the trainer's mesh as the context mesh
(`jax.set_mesh`), so a routed layer there routes on the mesh (experts/sharded.py).
"""
import logging
import os
import re
from typing import Any, Callable, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from orbax.checkpoint import checkpoint_managers

from phatgoose_jax import aot, distributed, host_memory, partitioning
from phatgoose_jax.experts import sharded
from phatgoose_jax.training import optimizers

LossFn = Callable[[Any, dict, jax.Array], tuple]
EvalFn = Callable[[Any], dict]
BatchFn = Callable[[int], dict]


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be restored (corrupt, truncated, or of a different trainable tree)."""


def flatten(tree: Any) -> dict:
  """{'collection/path/to/leaf': leaf} of a nested dict of collections (boxed leaves stay whole)."""
  return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: dict) -> dict:
  return traverse_util.unflatten_dict(flat, sep="/")


def split_trainable(tree: Any, patterns: Sequence[str]) -> tuple:
  """(trainable, frozen): the leaves whose path fully matches any of `patterns`, and the rest."""
  regexes = [re.compile(p) for p in patterns]
  flat = flatten(tree)
  chosen = {k for k in flat if any(r.fullmatch(k) for r in regexes)}
  if not chosen:
    raise ValueError(f"the trainable patterns {list(patterns)} match no variable; paths look like "
                     f"{sorted(flat)[:5]}")
  return (unflatten({k: v for k, v in flat.items() if k in chosen}),
          unflatten({k: v for k, v in flat.items() if k not in chosen}))


def merge(*trees: Any) -> dict:
  """The union of disjoint nested dicts (the inverse of `split_trainable`)."""
  flat = {}
  for t in trees:
    flat.update(flatten(t))
  return unflatten(flat)


def _float32(x):
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return x
  return jax.ShapeDtypeStruct(x.shape, jnp.float32) if isinstance(x, jax.ShapeDtypeStruct) else x.astype(jnp.float32)


def _host(x):
  """A host copy of a process-local array (placed afresh on every process); global arrays stay as they are."""
  return x if isinstance(x, jax.Array) and not x.is_fully_addressable else np.asarray(x)


def _placed(x, sharding):
  """`x` on `sharding`: as it is when already placed there (a base restored into its shardings is never
  copied), else placed from a host copy."""
  if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
    return x
  return jax.device_put(_host(x), sharding)


def is_abstract(tree: Any) -> bool:
  """Whether `tree`'s leaves are shapes only (`jax.ShapeDtypeStruct`s), boxed or not."""
  leaves = jax.tree.leaves(partitioning.unbox(tree))
  return bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def eval_loss(metrics: dict) -> float:
  """The default keep-best criterion: the validation `loss` (minimised)."""
  return metrics["loss"]


SELECTION_STEP = "selection/step"  # the step stored among a candidate checkpoint's metrics


def selection_key(metrics: dict, best_fn: Callable[[dict], float], best_mode: str) -> tuple:
  """(+-best_fn(metrics), step): the kept candidate maximises it, so ties go to the later step (see above)."""
  value = best_fn(metrics)
  return (value if best_mode == "max" else -value, metrics[SELECTION_STEP])


@gin.configurable
class Trainer:
  """Jitted, sharded training of a regex-chosen subset of `variables`, with checkpoints and resume.

  Args:
    loss_fn: `loss_fn(variables, batch, dropout_rng) -> (scalar loss, {name: scalar})`.
    variables: the model's variables (boxed with logical axis names, or plain arrays: then replicated).
    trainable: regexes over `collection/path/to/leaf`; matching leaves train, the rest stay frozen.
    optimizer: an optax transformation; `optimizers.make_optimizer()` (algorithm.md §2) when None.
    mesh, rules: the device mesh and logical axis rules; all devices on 'data' and the standard rules
      when None.
    workdir: where `checkpoints/` and `tensorboard/` go; no checkpoints or event files when None. A
      workdir holding checkpoints resumes from the latest one.
    checkpoint_every: save every this many steps (and at the last step of `train`).
    keep: how many best checkpoints to keep (by `selection_key` over the validation metrics; the latest
      is always kept too, for resume), or the latest `keep` when there is no `eval_fn`.
    eval_fn: `eval_fn(variables) -> {name: scalar}`, run at the candidate steps (step 0, every
      `eval_every` steps, the last step), each of which is checkpointed.
    best_fn, best_mode: the keep-best criterion over eval metrics and whether to 'min'imise or 'max'imise
      it; ties go to the later step.
    accum_steps: micro-batches per update; it must divide the batch size.
    loss_weight_key: the metric giving a micro-batch's weight in accumulation (see module docstring); None: all
      weigh the same (a loss that is a mean over equal parts of the batch, `train.training_loss`).
    seed: dropout rngs are `fold_in(key(seed), step)`.
    strict_sharding: raise, rather than replicate, when a mesh axis does not divide a dimension.
    log_every: write training metrics every this many steps (also kept in `history`).
    tensorboard: write TensorBoard event files under `workdir` (process 0 only).
  """

  def __init__(self, loss_fn: LossFn, variables: Any, trainable: Sequence[str] = ("lora/.*",),
               optimizer: Optional[optax.GradientTransformation] = None, mesh: Optional[Mesh] = None,
               rules: Optional[Sequence[tuple]] = None, workdir: Optional[str] = None,
               checkpoint_every: int = 100, keep: int = 1, eval_fn: Optional[EvalFn] = None,
               eval_every: int = 100, best_fn: Callable[[dict], float] = eval_loss, best_mode: str = "min",
               accum_steps: int = 1, loss_weight_key: Optional[str] = "num_tokens", seed: int = 0,
               strict_sharding: bool = False, log_every: int = 10, tensorboard: bool = True):
    if best_mode not in ("min", "max"):
      raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
    if min(checkpoint_every, eval_every, accum_steps, keep, log_every) < 1:
      raise ValueError("checkpoint_every, eval_every, accum_steps, keep and log_every must all be >= 1")
    self.loss_fn, self.eval_fn = loss_fn, eval_fn
    self.optimizer = optimizer or optimizers.make_optimizer()
    self.mesh = mesh or partitioning.make_mesh()
    self.rules = tuple(rules or partitioning.standard_logical_axis_rules())
    self.checkpoint_every, self.eval_every, self.log_every = checkpoint_every, eval_every, log_every
    self.accum_steps, self.loss_weight_key, self.seed = accum_steps, loss_weight_key, seed
    self.workdir = workdir

    shardings = partitioning.variables_shardings(variables, self.mesh, self.rules, strict_sharding)
    params_sh, frozen_sh = split_trainable(shardings, trainable)
    params, frozen = split_trainable(partitioning.unbox(variables), trainable)
    self._replicated = NamedSharding(self.mesh, PartitionSpec())
    self._batch_sh = partitioning.batch_sharding(self.mesh, self.rules)
    self.abstract = is_abstract(variables)
    if self.abstract:  # shapes only (aot.py): the state is ShapeDtypeStructs with their shardings
      params = aot.abstract(jax.tree.map(_float32, params), params_sh)
      self.frozen = aot.abstract(frozen, frozen_sh)
    else:
      self._data_shard = partitioning.data_shard(self.mesh, self.rules)
      params = jax.device_put(jax.tree.map(lambda x: _float32(_host(x)), params), params_sh, may_alias=False)
      self.frozen = jax.tree.map(_placed, frozen, frozen_sh)
    self._state_sh = {"step": self._replicated, "params": params_sh,
                      "opt_state": self._opt_state_shardings(params, params_sh)}
    init_opt = jax.jit(self.optimizer.init, out_shardings=self._state_sh["opt_state"])
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=self._replicated)
    self.state = {"step": step, "params": params, "opt_state": jax.eval_shape(init_opt, params)} if self.abstract \
        else {"step": jax.device_put(jnp.zeros((), jnp.int32), self._replicated), "params": params,
              "opt_state": init_opt(params)}
    self._train_step = sharded.mesh_jit(self._step, in_shardings=(self._state_sh, frozen_sh, self._batch_sh),
                                        out_shardings=(self._state_sh, self._replicated), donate_argnums=(0,))

    if self.abstract and workdir:
      raise ValueError("a Trainer of abstract variables (shapes only) compiles its step and writes nothing: "
                       "pass workdir=None")
    self.manager = self._checkpoint_manager(keep, best_fn, best_mode) if workdir else None
    self.writer = self._metric_writer() if workdir and tensorboard and distributed.is_writer() else None
    self.history = []
    self._compiled = {}  # batch shapes -> the compiled training step (`_compiled_step`)
    if self.manager is not None and self.manager.latest_step() is not None:
      self.state = self._restore(self.manager.latest_step())

  def _opt_state_shardings(self, params, params_sh):
    """Optimiser-state leaves shaped like their parameter share its sharding; the rest are replicated."""
    abstract = jax.eval_shape(self.optimizer.init, params)
    return optax.tree_map_params(
        self.optimizer, lambda s, sh, p: sh if s.shape == p.shape else self._replicated, abstract, params_sh,
        params, transform_non_params=lambda _: self._replicated,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))

  def _metric_writer(self):
    """TensorBoard event files under `workdir/tensorboard` plus the log."""
    from clu import metric_writers  # imports TensorFlow: only when there is a workdir to write to
    return metric_writers.create_default_writer(os.path.join(self.workdir, "tensorboard"), asynchronous=False)

  def _write(self, step: int, scalars: dict):
    if self.writer is not None:
      self.writer.write_scalars(step, scalars)

  # ---- checkpoints -------------------------------------------------------------------------------------

  def _checkpoint_manager(self, keep: int, best_fn, best_mode: str) -> ocp.CheckpointManager:
    if self.eval_fn is None:
      policy, key = checkpoint_managers.LatestN(n=keep), None
    else:
      key = lambda metrics: selection_key(metrics, best_fn, best_mode)
      policy = checkpoint_managers.AnyPreservationPolicy([
          checkpoint_managers.LatestN(n=1),
          checkpoint_managers.BestN(get_metric_fn=key, n=keep, keep_checkpoints_without_metrics=False)])
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=key, best_mode="max")
    return ocp.CheckpointManager(os.path.join(os.path.abspath(self.workdir), "checkpoints"), options=options)

  def _restore(self, step: int) -> dict:
    """The train state saved at `step`, placed with this trainer's shardings."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, self.state)
    path = os.path.join(str(self.manager.directory), str(step))
    try:
      restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # orbax/tensorstore raise many types for unreadable files
      raise CheckpointError(f"cannot restore the checkpoint at {path}: {type(e).__name__}: {e}") from e
    logging.info("restored step %d from %s", step, path)
    return restored

  def save(self, metrics: Optional[dict] = None):
    """Checkpoint the current state; with its validation `metrics` it is a selection candidate."""
    step = int(self.state["step"])
    metrics = None if metrics is None else {**metrics, SELECTION_STEP: step}
    self.manager.save(step, args=ocp.args.StandardSave(self.state), metrics=metrics, force=True)

  @property
  def best_step(self) -> Optional[int]:
    """The kept candidate of the largest `selection_key` (the latest checkpoint when there is no `eval_fn`)."""
    self.manager.wait_until_finished()
    return self.manager.best_step()

  def best_variables(self) -> dict:
    """All variables, with the trainable ones from the best checkpoint."""
    step = self.best_step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.manager.directory}")
    return merge(self.frozen, self._restore(step)["params"])

  # ---- the update --------------------------------------------------------------------------------------

  def _micro_step(self, params, frozen, batch, rng):
    """(gradient, metrics with `loss`, weight) of one micro-batch."""
    def f(p):
      return self.loss_fn(merge(frozen, p), batch, rng)
    (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in dict(metrics, loss=loss).items()}
    weight = metrics.get(self.loss_weight_key, jnp.ones((), jnp.float32))
    return grads, metrics, weight

  def _accumulated(self, params, frozen, batch, rng):
    """(g, metrics) = weighted means over the micro-batches (see the module docstring)."""
    a = self.accum_steps
    # Micro-batch i takes examples i, i + A, i + 2A, ...: each stays spread over the data axis.
    micro = jax.tree.map(lambda x: x.reshape((-1, a) + x.shape[1:]).swapaxes(0, 1), batch)
    micro = jax.lax.with_sharding_constraint(
        micro, NamedSharding(self.mesh, PartitionSpec(None, *self._batch_sh.spec)))

    def body(carry, xs):
      mb, i = xs
      g, m, w = self._micro_step(params, frozen, mb, jax.random.fold_in(rng, i))
      g_sum, m_sum, w_sum = carry
      add = lambda total, x: total + w * x
      return (jax.tree.map(add, g_sum, g), jax.tree.map(add, m_sum, m), w_sum + w), None

    shapes = jax.eval_shape(self._micro_step, params, frozen, jax.tree.map(lambda x: x[0], micro), rng)
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (g, m, w), _ = jax.lax.scan(body, init, (micro, jnp.arange(a)))
    g, m = jax.tree.map(lambda x: x / w, (g, m))
    if self.loss_weight_key in m:
      m[self.loss_weight_key] = w
    return g, m

  def _step(self, state, frozen, batch):
    rng = jax.random.fold_in(jax.random.key(self.seed), state["step"])
    if self.accum_steps == 1:
      grads, metrics, _ = self._micro_step(state["params"], frozen, batch, rng)
    else:
      grads, metrics = self._accumulated(state["params"], frozen, batch, rng)
    updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  def step_program(self, batch: dict) -> aot.Program:
    """The training step as a program on abstract `batch` arrays (shapes of the global batch), for `aot`."""
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self._batch_sh) for k, v in batch.items()}
    state = aot.abstract(self.state, self._state_sh)
    frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.frozen)
    return aot.Program("train_step", self._train_step, (state, frozen, batch))

  # ---- the loop ----------------------------------------------------------------------------------------

  def variables(self) -> dict:
    """All variables now (plain arrays): the frozen ones and the trained ones."""
    return merge(self.frozen, self.state["params"])

  def evaluate(self) -> dict:
    """Run `eval_fn`, log its metrics under `eval/`, and return them as floats."""
    step = int(self.state["step"])
    with jax.set_mesh(self.mesh):
      metrics = {k: float(v) for k, v in self.eval_fn(self.variables()).items()}
    self._write(step, {f"eval/{k}": v for k, v in metrics.items()})
    if distributed.is_writer():
      tqdm.tqdm.write(f"step {step}: " + ", ".join(f"eval/{k}={v:.6g}" for k, v in metrics.items()))
    return metrics

  def _validate_and_checkpoint(self, step: int, num_steps: int):
    """At a candidate step (0, every `eval_every`, the last) validate and checkpoint with the metrics; at
    other `checkpoint_every` steps checkpoint for resume only."""
    candidate = self.eval_fn is not None and (step % self.eval_every == 0 or step == num_steps)
    metrics = self.evaluate() if candidate else None
    if self.manager is not None and (candidate or (step > 0 and step % self.checkpoint_every == 0)
                                     or step == num_steps):
      self.save(metrics)

  def _check_batch(self, batch: dict):
    sizes = {k: np.shape(v)[0] for k, v in batch.items()}
    if len(set(sizes.values())) != 1:
      raise ValueError(f"batch arrays disagree on the batch size: {sizes}")
    size = next(iter(sizes.values())) * self._data_shard[1]
    if size % self.accum_steps:
      raise ValueError(f"batch size {size} is not divisible by accum_steps={self.accum_steps}")
    partitioning.check_batch_divisible(size // self.accum_steps, self.mesh, self.rules)

  def global_batch(self, local: dict) -> dict:
    """The global batch (sharded `jax.Array`s) of which this process holds the rows `local`."""
    num_shards = self._data_shard[1]
    return {k: jax.make_array_from_process_local_data(
        self._batch_sh, np.asarray(v), (np.shape(v)[0] * num_shards, *np.shape(v)[1:])) for k, v in local.items()}

  def local_rows(self, global_batch_size: int) -> slice:
    """The rows of a global batch that `batch_fn` returns in this process (`partitioning.process_batch_rows`)."""
    return partitioning.process_batch_rows(self.mesh, self.rules, global_batch_size)

  def train(self, batch_fn: BatchFn, num_steps: int) -> dict:
    """Train from the current step up to `num_steps` updates; `batch_fn(step)` gives this process's rows
    of step's batch (the whole batch on one process).

    Returns all variables (plain arrays) after the last update.
    """
    step = int(self.state["step"])
    bar = tqdm.tqdm(total=num_steps, initial=step, desc="train", disable=not distributed.is_writer())
    try:
      self._loop(batch_fn, step, num_steps, bar)
    finally:  # an exception out of the loop still completes the checkpoints already being written
      bar.close()
      if self.writer is not None:
        self.writer.flush()
      if self.manager is not None:
        self.manager.wait_until_finished()
    return self.variables()

  def _compiled_step(self, batch: dict):
    """The training step compiled for `batch`'s shapes (once per shapes), the compiler's freed memory handed
    back before it first runs (`host_memory`): the same program `jax.jit` would compile at the first call."""
    key = tuple((k, v.shape, str(v.dtype)) for k, v in sorted(batch.items()))
    if key not in self._compiled:
      self._compiled[key] = self._train_step.lower(self.state, self.frozen, batch).compile()
      host_memory.release_free_memory()
    return self._compiled[key]

  def _loop(self, batch_fn: BatchFn, step: int, num_steps: int, bar: tqdm.tqdm):
    if step == 0 and (self.manager is None or self.manager.latest_step() is None):
      self._validate_and_checkpoint(step, num_steps)
    first = step
    while step < num_steps:
      batch = batch_fn(step)
      if step == first:
        self._check_batch(batch)
      batch = self.global_batch(batch)
      self.state, metrics = self._compiled_step(batch)(self.state, self.frozen, batch)
      step += 1
      bar.update(1)
      if step % self.log_every == 0 or step == num_steps:
        metrics = {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
        self.history.append({"step": step, **metrics})
        self._write(step, metrics)
        bar.set_postfix(loss=f"{metrics['train/loss']:.4g}")
      self._validate_and_checkpoint(step, num_steps)
