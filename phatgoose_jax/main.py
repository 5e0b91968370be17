"""The gin entry point, t5x style: every stage of the pipeline runs from gin files plus overrides.

  python -m phatgoose_jax.main --gin_file=models/t5_1_1_tiny.gin --gin_file=runs/train_expert.gin \\
      --gin.BASE="'/ckpt/base'" --gin.TASK="'demo_reverse'" --gin.LIBRARY="'/lib'" --gin.WORKDIR="'/tmp/w'"

A run file binds `run.stage` to a stage (`@train.train_expert`, `@evaluate.evaluate`, ...); `run()` calls it.
A `--gin_file` is a path, or the name of one of the package's gin files (`runs/...`, `models/...`), which are
found by absolute path inside the installed package (never through the working directory). Every binding and
file is parsed before any work starts; a malformed or unknown binding raises `UsageError` naming it.
"""
import argparse
import contextlib
import logging
import os
import sys
from typing import Optional, Sequence

import gin

import phatgoose_jax
from phatgoose_jax import assembly, evaluate, train  # noqa: F401 (their gin configurables)
from phatgoose_jax import aot, distributed, library, partitioning, stage_programs, utils
from phatgoose_jax.cli import UsageError

GIN_DIR = phatgoose_jax.GIN_DIR


def resolve(path: str) -> str:
  """A gin file's absolute path: the package's gin file of that name if there is one, else `path`."""
  packaged = GIN_DIR / path
  return str(packaged) if packaged.is_file() else os.path.abspath(path)


@gin.configurable
def run(stage=gin.REQUIRED, setup=()):
  """Call the configured stage (a gin reference to a stage function) after the `setup` callables (e.g. a
  registration of extra seqio tasks)."""
  for fn in setup:
    fn()
  return stage()


def _binding_error(binding: str, error: Exception) -> UsageError:
  return UsageError(f"bad gin binding {binding!r}: {type(error).__name__}: {error}")


class _QuietSearch(logging.Filter):
  """Drops gin's log line for each search-path entry that does not hold a file (the next one may)."""

  def filter(self, record) -> bool:
    return not str(record.msg).startswith("Path not found")


@contextlib.contextmanager
def _quiet_search():
  quiet = _QuietSearch()
  logging.getLogger().addFilter(quiet)
  try:
    yield
  finally:
    logging.getLogger().removeFilter(quiet)


def parse(gin_files: Sequence[str], bindings: Sequence[str], require: bool = True) -> None:
  """Parse gin files, then each binding on its own, so a failure names the file or binding at fault.
  With `require`, macros left at `%gin.REQUIRED` are refused too. A refused configuration is cleared, so no
  binding of it outlives the error."""
  gin.clear_config()
  try:
    _parse(gin_files, bindings, require)
  except UsageError:
    gin.clear_config()
    raise


def _parse(gin_files: Sequence[str], bindings: Sequence[str], require: bool) -> None:
  prefixes = gin.config._LOCATION_PREFIXES  # pylint: disable=protected-access
  if prefixes[:1] != [str(GIN_DIR)]:  # the package's files first: a same-named file in the cwd never shadows them
    prefixes.insert(0, str(GIN_DIR))
  with _quiet_search():
    for path in gin_files:
      try:
        gin.parse_config_file(resolve(path))
      except Exception as e:  # gin surfaces parse errors as many types (tokenize, syntax, value, import)
        raise UsageError(f"bad gin file {path!r}: {type(e).__name__}: {e}") from e
  for binding in bindings:
    try:
      gin.parse_config(binding)
    except Exception as e:  # as above
      raise _binding_error(binding, e) from e
  if require:
    check_required()
  check_configs()


def _is_required(value) -> bool:
  return value is gin.REQUIRED or getattr(value, "scoped_selector", None) == "gin.REQUIRED/gin.constant"


def check_required() -> None:
  """Refuse macros still bound to `%gin.REQUIRED` (gin would pass its sentinel on silently)."""
  missing = sorted(name for (name, selector), params in gin.config._CONFIG.items()  # pylint: disable=protected-access
                   if selector == "gin.macro" and _is_required(params.get("value")))
  if missing:
    raise UsageError(f"required gin macros not set: {', '.join(missing)} (e.g. --gin.{missing[0]}=\"'...'\")")


def check_configs() -> None:
  """Build the configured model and LoRA configs now, so a bad value fails before any work."""
  try:
    utils.model_config()
    utils.lora_config()
  except (ValueError, TypeError) as e:
    raise UsageError(f"bad model configuration: {str(e).splitlines()[0]}") from e  # gin appends its call chain


def run_configured(gin_files: Sequence[str], bindings: Sequence[str]):
  """Parse, then run the configured stage; missing required values become usage errors."""
  parse(gin_files, bindings)
  try:
    gin.get_bindings("phatgoose_jax.main.run")["stage"]
  except (KeyError, ValueError) as e:
    raise UsageError("no stage to run: bind run.stage (e.g. include a gin/runs/*.gin file)") from e
  try:
    return run()
  except RuntimeError as e:
    if "Required bindings" in str(e) or "gin.REQUIRED" in str(e):
      raise UsageError(str(e).splitlines()[0]) from e
    raise
  except (ValueError, KeyError, OSError) as e:  # what a stage refuses: bad data, configuration or checkpoint
    raise UsageError(str(e).splitlines()[0] if str(e) else type(e).__name__) from e


def multihost_flags(argv: Sequence[str]) -> argparse.Namespace:
  """The multi-host flags (`distributed.add_flags`) among `argv`; anything else is a usage error."""
  parser = argparse.ArgumentParser(prog="phatgoose", add_help=False)
  distributed.add_flags(parser)
  args, unknown = parser.parse_known_args(list(argv))
  if unknown:
    raise UsageError(f"unrecognized arguments: {' '.join(unknown)}")
  return args


@gin.configurable
def dry_run(num_experts: Optional[int] = None, top_k: int = 2, topology: Optional[str] = None) -> str:
  """What the configured run would hold and compile, from shapes only: the mesh, the rules and the parameter
  bytes per device (`partitioning.describe`), then the stage's programs compiled for `topology` (a TPU slice,
  e.g. 'v5e:4x4'; None: the local devices) with their per-chip memory, FLOPs and roofline time
  (`stage_programs`, `aot`). Routed programs use `num_experts` experts (default: the configured library's
  count), `--gin main.dry_run.num_experts=36`. A program that does not fit a chip is a `UsageError` naming it."""
  config = utils.model_config()
  if config is None:
    raise UsageError("--dry_run needs the model's architecture: add a model file (--model SIZE or "
                     "--gin_file=models/t5_1_1_<size>.gin)")
  num_experts = _library_size() if num_experts is None else num_experts
  return compile_and_report(config, num_experts, top_k, topology,
                            lambda mesh, rules: stage_programs.programs(config, mesh, rules, num_experts, top_k))


def compile_and_report(config, num_experts: int, top_k: int, topology: Optional[str], build) -> str:
  """Print the mesh, rules and parameter bytes of `config` with `num_experts` routed experts (one LoRA expert
  without), then compile the programs `build(mesh, rules)` makes for `topology` and print their per-chip
  table; a program that would not fit a chip raises a `UsageError` naming it. Returns the text."""
  lora = utils.lora_config()
  experts = lora.replace(mode="routed", num_experts=num_experts, top_k=top_k) if num_experts else lora
  try:
    devices = aot.target_devices(topology)
    mesh, rules = utils.sharding(mesh=partitioning.make_mesh(devices=devices))
    text = partitioning.describe(config, experts, mesh, rules)
    reports = [aot.compile_program(p, devices) for p in build(mesh, rules)]
  except ValueError as e:
    raise UsageError(str(e).splitlines()[0]) from e
  text += "\n" + aot.format_reports(reports, devices, topology)
  print(text)
  too_big = aot.shortfall(reports)
  if too_big:
    raise UsageError(too_big)
  return text


def check_topology_flag(args) -> None:
  """Refuse --topology without --dry_run: a run uses the devices it is started on."""
  if args.topology and not args.dry_run:
    raise UsageError("--topology only applies to --dry_run (a run uses the devices it is started on)")


def _library_size() -> int:
  """The number of experts in the configured `LIBRARY` (0 without one)."""
  path = stage_programs.bound("LIBRARY/macro.value", None)
  if not path or not os.path.isdir(path):
    return 0
  return len(library.ExpertLibrary(path).names())


def split_args(argv: Sequence[str]) -> tuple:
  """(gin files, bindings, other args) from `--gin_file=F`, `--gin.KEY=VALUE` / `--gin KEY=VALUE`."""
  files, bindings, rest = [], [], []
  argv = list(argv)
  while argv:
    arg = argv.pop(0)
    if arg.startswith("--gin."):
      key, sep, value = arg[len("--gin."):].partition("=")
      if not sep:
        raise UsageError(f"bad gin binding {arg!r}: expected --gin.KEY=VALUE")
      bindings.append(f"{key} = {value}")
    elif arg in ("--gin", "--gin_file") and argv:
      (bindings if arg == "--gin" else files).append(argv.pop(0))
    elif arg.startswith(("--gin=", "--gin_file=")):
      key, _, value = arg.partition("=")
      (bindings if key == "--gin" else files).append(value)
    else:
      rest.append(arg)
  return files, bindings, rest


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m phatgoose_jax.main", description=__doc__.splitlines()[0])
  parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
  parser.add_argument("--gin.KEY=VALUE", dest="unused", help="one gin binding (repeatable)")
  parser.add_argument("--dry_run", action="store_true", help="print the mesh, rules, per-device parameter "
                      "bytes and the stage's compiled programs' per-chip memory and cost, then stop")
  parser.add_argument("--topology", help="with --dry_run: compile for this TPU slice (v5e:4x4, v4:2x2x4, "
                      "v5p:2x2x4; needs libtpu) instead of the local devices")
  distributed.add_flags(parser)
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    files, bindings, rest = split_args(argv)
    args = parser.parse_args(rest)
    distributed.initialize_from_args(args)
    check_topology_flag(args)
    if args.dry_run:
      parse(files, bindings, require=False)
      dry_run(topology=args.topology)
    else:
      run_configured(files, bindings)
  except UsageError as e:
    print(f"{parser.prog}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.exit(main())
