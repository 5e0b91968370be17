"""`--dry_run [--topology]` for t5x's own entry points: the programs `python -m t5x.train` / `t5x.eval` would
run on the same gin files, compiled ahead of time for a TPU slice or the local devices (aot.py), from shapes only.

  JAX_PLATFORMS=cpu python -m phatgoose_jax.t5x_dry_run --gin_file=gin/t5x/models/t5_1_1_xl.gin \\
      --gin_file=gin/t5x/lora_expert.gin --gin.BATCH_SIZE=1024 --gin.trainer.Trainer.num_microbatches=32 \\
      --gin.partitioning.PjitPartitioner.num_partitions=4 --topology v4:2x2x4

The gin files are parsed as t5x's scripts parse them (`gin_utils.parse_gin_flags` over `--gin_search_paths`
and t5x's own configs, t5x/train.py:954-958), with t5x's `train` and `evaluate` as the `__main__` functions the
run files configure. A train run compiles t5x's `Trainer` train step (`train_with_lr`, t5x/trainer.py:1019-1041)
on the `jax.eval_shape` of t5x's train state (`utils.TrainStateInitializer`: params and `optimizer.init`
state) at the train `DatasetConfig`'s batch and feature lengths with the configured `num_microbatches`; an eval
run compiles `model.score_batch` and `model.predict_batch` as t5x's evaluator partitions them
(t5x/utils.py:1605-1615) at its `DatasetConfig`. The mesh is the `PjitPartitioner`'s own (data, model) mesh
(`num_partitions` / `model_parallel_submesh`, t5x/partitioning.py:294-414) over the target's devices, and
the train state is laid out by the partitioner's logical axis rules applied to the model's `params_axes`.
Nothing reads the data or a checkpoint of the run, and nothing is allocated on the target; a routed model
(gin/t5x/routed.gin) is built as t5x builds it, reading its library and the base it checks the library against.
"""
import argparse
import contextlib
import copy
import dataclasses
import os
import sys
import types
from typing import Optional, Sequence
from unittest import mock

import gin
import jax
import jax.numpy as jnp
import t5x.eval
import t5x.train
from t5x import gin_utils
from t5x import utils as t5x_utils

from phatgoose_jax import aot
from phatgoose_jax.cli import UsageError

RUNS = {"train": t5x.train.train, "evaluate": t5x.eval.evaluate}  # what `import __main__` names in t5x's gin


@contextlib.contextmanager
def _t5x_main():
  """`__main__` as t5x's scripts have it while they parse: a module holding `train` and `evaluate`."""
  saved = sys.modules["__main__"]
  sys.modules["__main__"] = types.ModuleType("__main__")
  vars(sys.modules["__main__"]).update(RUNS)
  try:
    yield
  finally:
    sys.modules["__main__"] = saved


def parse(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = (".",)) -> None:
  """Parse like `t5x.train` (t5x/train.py:954-958): `search_paths`, then t5x's own directory (t5x/configs)."""
  gin.clear_config()
  paths = list(search_paths) + t5x.train._DEFAULT_GIN_SEARCH_PATHS  # pylint: disable=protected-access
  try:
    with _t5x_main():
      gin_utils.parse_gin_flags(paths, gin_files, bindings, finalize_config=False)
  except Exception as e:  # gin surfaces parse errors as many types (io, syntax, value, import)
    gin.clear_config()
    raise UsageError(f"bad gin configuration: {type(e).__name__}: {str(e).strip().splitlines()[0]}") from e


def configured_run() -> tuple:
  """('train' or 'evaluate', the gin bindings of that t5x function, references unresolved)."""
  for name, fn in RUNS.items():
    try:
      bindings = gin.get_bindings(fn, resolve_references=False)
    except ValueError:  # never configured in this process
      continue
    if bindings:
      return name, bindings
  raise UsageError("the gin files configure neither t5x's train nor its evaluate: include a run file such as "
                   "gin/t5x/lora_expert.gin or gin/t5x/routed.gin")


def built(bindings: dict, name: str):
  """The configured value of `name`, its gin references called (t5x's train/evaluate get the same)."""
  try:
    return copy.deepcopy(bindings[name])
  except (ValueError, TypeError, RuntimeError) as e:  # a configurable refusing its bound values
    raise UsageError(f"bad gin configuration: {name}: {str(e).strip().splitlines()[0]}") from e


def dataset_field(bindings: dict, config: str, field: str):
  """One field of the run's `DatasetConfig` `config` as gin binds it in its scope, else its default (the rest,
  e.g. the task name, is never built: a dry run reads no data)."""
  bound = gin.get_bindings(bindings[config].scoped_selector, resolve_references=False)
  if field in bound:
    return copy.deepcopy(bound[field])
  default = {f.name: f.default for f in dataclasses.fields(t5x_utils.DatasetConfig)}[field]
  return None if default is dataclasses.MISSING else default


def input_shapes(model, bindings: dict, config: str, pack: bool) -> dict:
  """The model's features at the `DatasetConfig`'s batch and lengths, as its feature converter makes them."""
  lengths = dataset_field(bindings, config, "task_feature_lengths")
  if not lengths:
    raise UsageError(f"a dry run needs the feature lengths of the run's {config} (t5x finds None in the data): "
                     f"bind --gin.TASK_FEATURE_LENGTHS=\"{{'inputs': 512, 'targets': 8}}\"")
  batch_size = dataset_field(bindings, config, "batch_size")
  model_lengths = model.FEATURE_CONVERTER_CLS(pack=pack).get_model_feature_lengths(lengths)
  return {k: (batch_size, n) for k, n in model_lengths.items()}


def _abstract_batch(shapes: dict) -> dict:
  return {k: jax.ShapeDtypeStruct(s, jnp.int32) for k, s in shapes.items()}


@contextlib.contextmanager
def _devices_seen_as(devices: Sequence[jax.Device]):
  """t5x's mesh builders read `jax.devices()` and `jax.local_devices()`: within this, `devices` (the first
  process's as the local ones)."""
  local = [d for d in devices if d.process_index == devices[0].process_index]
  with mock.patch.object(jax, "devices", lambda backend=None: list(devices)), \
      mock.patch.object(jax, "local_devices", lambda process_index=None, backend=None, host_id=None: local):
    yield


def place(partitioner, devices: Sequence[jax.Device]) -> None:
  """Fix the partitioner's (data, model) mesh (a cached property) as t5x builds it on `devices`."""
  try:
    with _devices_seen_as(devices):
      mesh = partitioner.mesh
  except (ValueError, AssertionError) as e:
    raise UsageError(f"t5x's PjitPartitioner finds no mesh for {len(devices)} x {devices[0].device_kind}: "
                     f"{str(e).strip().splitlines()[0].strip() or 'a submesh that does not divide the slice'} (bind "
                     f"partitioning.PjitPartitioner.model_parallel_submesh, e.g. (2, 1, 1, 1))") from e
  print(f"t5x mesh: data={mesh.shape['data']} x model={mesh.shape['model']}")


@contextlib.contextmanager
def train_programs(bindings: dict, model, partitioner):
  """t5x's train step on the abstract train state and the train batch (trainer closed on exit)."""
  pack = dataset_field(bindings, "train_dataset_cfg", "pack")
  shapes = input_shapes(model, bindings, "train_dataset_cfg", pack)
  initializer = t5x_utils.TrainStateInitializer(model.optimizer_def, model.get_initial_variables, shapes,
                                                partitioner, {k: jnp.int32 for k in shapes})
  trainer_cls = built(bindings, "trainer_cls")
  with trainer_cls(model=model, train_state=initializer.global_train_state_shape, partitioner=partitioner,
                   eval_names=[], summary_dir=None, train_state_axes=initializer.train_state_axes,
                   rng=jax.random.PRNGKey(0)) as trainer:
    yield [aot.Program("train_step", trainer._partitioned_train_step,  # pylint: disable=protected-access
                       (initializer.global_train_state_shape, _abstract_batch(shapes)))]


@contextlib.contextmanager
def eval_programs(bindings: dict, model, partitioner):
  """`score_batch` and `predict_batch` on the abstract inference state (no optimizer) and the eval batch."""
  shapes = input_shapes(model, bindings, "dataset_cfg", pack=False)  # t5x/eval.py:107
  initializer = t5x_utils.TrainStateInitializer(None, model.get_initial_variables, shapes, partitioner)
  axes, params = initializer.train_state_axes.params, initializer.global_train_state_shape.params
  batch, data = _abstract_batch(shapes), partitioner.data_partition_spec
  score = partitioner.partition(model.score_batch, in_axis_resources=(axes, data), out_axis_resources=None)
  predict = partitioner.partition(lambda p, b: model.predict_batch(p, b, jax.random.PRNGKey(0)),
                                  in_axis_resources=(axes, data), out_axis_resources=None)
  yield [aot.Program("score_batch", score, (params, batch)), aot.Program("predict_batch", predict, (params, batch))]


def dry_run(topology: Optional[str] = None) -> str:
  """Compile the parsed configuration's programs for `topology` (None: the local devices) and print their
  per-chip table; a program that does not fit a chip raises a `UsageError` naming it. Returns the table."""
  run, bindings = configured_run()
  model, partitioner = built(bindings, "model"), built(bindings, "partitioner")
  try:
    devices = aot.target_devices(topology)
    place(partitioner, devices)
    with (train_programs if run == "train" else eval_programs)(bindings, model, partitioner) as programs:
      reports = [aot.compile_program(p, devices) for p in programs]
  except ValueError as e:  # an unknown topology, a program that does not fit, a configuration the model refuses
    raise UsageError(str(e).strip().splitlines()[0]) from e
  text = aot.format_reports(reports, devices, topology)
  print(text)
  too_big = aot.shortfall(reports)
  if too_big:
    raise UsageError(too_big)
  return text


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m phatgoose_jax.t5x_dry_run", description=__doc__.splitlines()[0])
  parser.add_argument("--gin_file", action="append", default=[], help="gin file, as t5x's (repeatable)")
  parser.add_argument("--gin_bindings", action="append", default=[], help="one gin binding; --gin.KEY=VALUE "
                      "is the same as --gin_bindings='KEY = VALUE' (repeatable)")
  parser.add_argument("--gin_search_paths", default=".", help="comma-separated gin search paths (t5x's flag)")
  parser.add_argument("--topology", help="compile for this TPU slice (v5e:4x4, v4:2x2x4; needs libtpu) instead "
                      "of the local devices")
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    try:
      args = parser.parse_args(gin_utils.rewrite_gin_args(argv))  # t5x's own --gin.KEY=VALUE rewriting
    except ValueError as e:
      raise UsageError(str(e)) from e
    parse(args.gin_file, args.gin_bindings, args.gin_search_paths.split(","))
    dry_run(args.topology)
  except UsageError as e:
    print(f"{parser.prog}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.exit(main())
