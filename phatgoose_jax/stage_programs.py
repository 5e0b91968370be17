"""Each stage's device programs, built from its configuration and shapes only, for `--dry_run` (aot.py).

  train-expert / train-gate / train-multitask   the `Trainer`'s own step (optimizer state, the stage's global
                                                 batch and accumulation), and the validation `score_batch`
  evaluate / route-stats / score                 the (routed) `score_batch` at the evaluation batch
  evaluate / generate                            the encoder pass and one cached decoding step

Variables are `jax.eval_shape` of the model's initialisation, laid out by the logical rules on the mesh of the
target devices; the frozen base is in `utils.frozen_base_dtype`, and an evaluation's variables all in its compute
dtype (`utils.in_compute_dtype`, as assembly holds them). Batches have the stage's feature lengths
(`data.feature_lengths`). Nothing here reads a checkpoint or allocates an array.

FLOPs and bytes are the compiler's counts of loop-free twins (`loop_free_costs`): for layers under `nn.scan`
the unrolled program at depths 1 and 2, cost(L) = cost(1) + (L - 1) (cost(2) - cost(1)) per stack; for A
accumulated micro-batches A times the step on one micro-batch (its optimizer update, a few elementwise passes
over the trainable collection, counted A times).
"""
import dataclasses
import functools
from typing import Callable, List, Optional

import gin
import jax
import jax.numpy as jnp

from phatgoose_jax import aot, data, partitioning, utils
from phatgoose_jax.experts import sharded
from phatgoose_jax.experts.config import ExpertConfig
from phatgoose_jax.models import EncoderDecoderModel
from phatgoose_jax.t5 import layers
from phatgoose_jax.training import optimizers
from phatgoose_jax.training.trainer import Trainer

TRAIN_STAGES = {"train_expert": ("lora", ["lora/.*"]), "train_gate": ("gated", ["gates/.*"]),
                "train_multitask": ("lora", ["lora/.*"])}
EVAL_STAGES = ("evaluate", "route_stats")


def bound(selector: str, default):
  """The value gin binds to `selector` (`'train.fit.batch_size'`), or `default` when none is bound."""
  try:
    return gin.query_parameter(selector)
  except ValueError:
    return default


def configured_stage() -> str:
  """The configured stage's function name (`train_expert`, `evaluate`, ...), from `main.run.stage`."""
  stage = bound("main.run.stage", None)
  if stage is None:
    raise ValueError("no stage configured: include a run file (gin/runs/<stage>.gin)")
  return stage.selector.rsplit(".", 1)[-1]


def abstract_variables(model: EncoderDecoderModel) -> dict:
  """Boxed `ShapeDtypeStruct`s of the model's variables, the base `params` in `utils.frozen_base_dtype()`."""
  variables = jax.eval_shape(model.get_initial_variables, jax.random.key(0))
  dtype = jnp.dtype(utils.frozen_base_dtype())
  variables["params"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), variables["params"])
  return variables


def batch_shapes(batch_size: int, lengths: dict) -> dict:
  """The t5x features of a batch: <int32>[batch, inputs] and <int32>[batch, targets] (x3)."""
  features = {"encoder_input_tokens": jax.ShapeDtypeStruct((batch_size, lengths["inputs"]), jnp.int32)}
  for name in ("decoder_input_tokens", "decoder_target_tokens"):
    features[name] = jax.ShapeDtypeStruct((batch_size, lengths["targets"]), jnp.int32)
  return features


def _placed(variables: dict, mesh, rules) -> dict:
  shardings = partitioning.variables_shardings(variables, mesh, rules)
  return aot.abstract(partitioning.unbox(variables), shardings)


def _batch(shapes: dict, mesh, rules) -> dict:
  partitioning.check_batch_divisible(next(iter(shapes.values())).shape[0], mesh, rules)
  sharding = partitioning.batch_sharding(mesh, rules)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in shapes.items()}


def loop_free_depths(config) -> list:
  """[(weight, unrolled config)] whose weighted costs sum to `config`'s, each stack's cost linear in its depth."""
  if not config.scan_layers:
    return [(1, config)]
  e, d = config.num_encoder_layers, config.num_decoder_layers
  depth = lambda i, j: config.replace(scan_layers=False, num_encoder_layers=i, num_decoder_layers=j)  # noqa: E731
  if e == d:
    return [(2 - e, depth(1, 1)), (e - 1, depth(2, 2))]
  return [(3 - e - d, depth(1, 1)), (e - 1, depth(2, 1)), (d - 1, depth(1, 2))]


def loop_free_costs(programs: List[aot.Program], config, rebuild: Callable, repeats: Optional[dict] = None):
  """`programs` with the `cost_terms` that count their loops (module docstring): `rebuild(config)` builds the
  same programs loop-free (unrolled, one micro-batch) for `config`; `repeats` {name: times a program runs its
  rebuilt twin} (a training step: its micro-batches)."""
  repeats = repeats or {}
  depths = loop_free_depths(config)
  if depths == [(1, config)] and all(n == 1 for n in repeats.values()):
    return programs
  twins = [(weight, {p.name: p for p in rebuild(unrolled)}) for weight, unrolled in depths]
  return [dataclasses.replace(p, cost_terms=tuple((w * repeats.get(p.name, 1), twin[p.name]) for w, twin in twins))
          for p in programs]


def train_programs(stage: str, config, mesh, rules, accum: Optional[int] = None,
                   batch_size: Optional[int] = None, counted: bool = True) -> List[aot.Program]:
  """The training step of `stage` (its trainable collection, optimizer, batch and accumulation: the configured
  ones unless given) and its validation `score_batch`; `counted`: with `loop_free_costs`."""
  mode, trainable = TRAIN_STAGES[stage]
  if stage == "train_multitask" and bound("train.train_multitask.finetune", "lora") == "full":
    mode, trainable = "none", ["params/.*"]
  experts = ExpertConfig() if mode == "none" else utils.lora_config().replace(mode=mode)
  model = utils.get_model(config, experts)
  variables = abstract_variables(model)
  num_steps = bound(f"train.{stage}.num_steps", 1000 if stage != "train_gate" else 100)
  batch_size = batch_size or bound("train.fit.batch_size", 32)
  accum = accum or bound("train.fit.accum_steps", 1)
  trainer = Trainer(model.loss_fn, variables, trainable=trainable, mesh=mesh, rules=rules,
                    optimizer=optimizers.make_optimizer(num_steps=num_steps), accum_steps=accum)
  lengths = data.feature_lengths()
  partitioning.check_batch_divisible(batch_size // accum, mesh, rules)
  programs = [trainer.step_program(batch_shapes(batch_size, lengths))]
  if stage != "train_gate":
    programs.append(score_program(model, _placed(variables, mesh, rules),
                                  bound("train.selection.batch_size", 64), lengths, mesh, rules, "validation_score"))
  if not counted:
    return programs

  def micro_batch(unrolled):
    return train_programs(stage, unrolled, mesh, rules, 1, batch_size // accum, False)
  return loop_free_costs(programs, config, micro_batch, {"train_step": accum})


def score_program(model, variables, batch_size: int, lengths: dict, mesh, rules,
                  name: str = "score_batch") -> aot.Program:
  """`score_batch` (the routed model's rank classification) on a batch of `batch_size` rows."""
  return aot.Program(name, sharded.mesh_jit(model.score_batch),
                     (variables, _batch(batch_shapes(batch_size, lengths), mesh, rules)))


def decode_programs(model, variables, batch_size: int, lengths: dict, mesh, rules) -> List[aot.Program]:
  """The encoder pass and one cached decoding step (the cache `lengths['targets']` long) of greedy decoding."""
  batch = _batch(batch_shapes(batch_size, lengths), mesh, rules)
  tokens = batch["encoder_input_tokens"]
  encoded = jax.eval_shape(model.encode, variables, tokens)
  encoded = jax.ShapeDtypeStruct(encoded.shape, encoded.dtype, sharding=tokens.sharding)
  cache = jax.eval_shape(lambda v, e, t: model.init_cache(v, e, t, lengths["targets"]), variables, encoded, tokens)
  cache = jax.tree_util.tree_map_with_path(lambda path, x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=cache_sharding(path, x, mesh, rules)), cache)
  step = jax.ShapeDtypeStruct((batch_size, 1), jnp.int32, sharding=tokens.sharding)
  # The cache is updated in place, as in the decoding loop's carry and the server's donated state.
  return [aot.Program("encode", sharded.mesh_jit(model.encode), (variables, tokens)),
          aot.Program("decode_step", sharded.mesh_jit(model.decode_step, donate_argnums=1),
                      (variables, cache, encoded, tokens, step))]


def cache_sharding(path, leaf, mesh, rules) -> jax.sharding.NamedSharding:
  """A decoding cache variable's sharding from its logical axes (`layers.CACHE_AXES`): rows as the batch's,
  heads over 'model', a scanned stack's layers whole."""
  names = layers.CACHE_AXES[path[-1].key]
  names = ("layers",) * (leaf.ndim - len(names)) + names
  return jax.sharding.NamedSharding(mesh, partitioning.logical_to_mesh_spec(
      names, leaf.shape, mesh, rules, what=jax.tree_util.keystr(path)))


def routed_experts(num_experts: int, top_k: int) -> ExpertConfig:
  """The routed experts of an evaluation: `num_experts` LoRA experts (none: the base alone), `top_k` per token."""
  if not num_experts:
    return ExpertConfig()
  return utils.lora_config().replace(mode="routed", num_experts=num_experts, top_k=top_k,
                                     impl=bound("assembly.routing.impl", "auto"))


def eval_programs(config, mesh, rules, num_experts: int, top_k: int, generate: bool = True,
                  batch_size: Optional[int] = None, lengths: Optional[dict] = None,
                  counted: bool = True) -> List[aot.Program]:
  """The routed model's `score_batch` and, with `generate`, its encoder pass and one decoding step;
  `counted`: with `loop_free_costs`."""
  model = utils.get_model(config, routed_experts(num_experts, top_k))
  held = jax.eval_shape(functools.partial(utils.in_compute_dtype, dtype=config.dtype), abstract_variables(model))
  variables = _placed(held, mesh, rules)  # as an evaluation holds them: in the compute dtype
  batch_size = batch_size or bound("evaluate.runner.batch_size", 64)
  lengths = lengths or data.feature_lengths()
  programs = [score_program(model, variables, batch_size, lengths, mesh, rules)]
  programs += decode_programs(model, variables, batch_size, lengths, mesh, rules) if generate else []
  if not counted:
    return programs
  return loop_free_costs(programs, config, lambda unrolled: eval_programs(
      unrolled, mesh, rules, num_experts, top_k, generate, batch_size, lengths, counted=False))


def programs(config, mesh, rules, num_experts: int = 0, top_k: int = 2) -> List[aot.Program]:
  """The configured stage's programs (module docstring)."""
  stage = configured_stage()
  if stage in TRAIN_STAGES:
    return train_programs(stage, config, mesh, rules)
  if stage in EVAL_STAGES:
    return eval_programs(config, mesh, rules, num_experts, top_k, generate=stage == "evaluate")
  raise ValueError(f"stage {stage!r} runs no device program of its own (it reads and writes checkpoints)")
