"""The `phatgoose` command: one subcommand family per module of this package.

Each module listed in `_COMMAND_MODULES` exposes `register(subparsers)`, which adds its subcommands and
sets `func` (called with the parsed arguments, returning an exit code) on each of them. Command modules
import the numerical stack (jax, TensorFlow, seqio) only when a command runs, so `--help` is fast. Native
start-up log lines of TensorFlow and XLA (CUDA probes on a CPU machine) are hidden unless `--verbose`.
"""
import argparse
import contextlib
import importlib
import os
import sys

_COMMAND_MODULES = (
    "phatgoose_jax.cli.model",
    "phatgoose_jax.cli.library",
    "phatgoose_jax.cli.tasks",
    "phatgoose_jax.cli.pipeline",
    "phatgoose_jax.cli.serve",
)


class UsageError(Exception):
  """A user-facing error: printed as one line on stderr, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="phatgoose", description=__doc__.splitlines()[0])
  parser.add_argument("--verbose", action="store_true", help="show TensorFlow / XLA start-up log lines")
  subparsers = parser.add_subparsers(dest="command", required=True)
  for name in _COMMAND_MODULES:
    try:
      module = importlib.import_module(name)
    except ModuleNotFoundError as e:
      if e.name != name:
        raise
      continue
    module.register(subparsers)
  return parser


def _describe(error: Exception) -> str:
  """What to print for an error the user can fix: a usage error as it is, a file that cannot be read or
  written, or text that is not UTF-8, as one line."""
  if isinstance(error, UnicodeDecodeError):
    return f"input is not UTF-8 text ({error.reason} at byte {error.start}); re-encode it as UTF-8"
  if isinstance(error, OSError) and error.strerror:
    where = f": {error.filename}" if error.filename else ""
    fix = "check its permissions" if isinstance(error, PermissionError) else "check the path"
    return f"{error.strerror}{where} ({fix})"
  return str(error)


@contextlib.contextmanager
def _native_stderr_hidden():
  """File descriptor 2 sent to /dev/null: native libraries log there before any Python logging exists."""
  sys.stderr.flush()
  saved = os.dup(2)
  with open(os.devnull, "w") as null:
    os.dup2(null.fileno(), 2)
  try:
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def load_numerical_stack(verbose: bool = False) -> None:
  """Import TensorFlow (through seqio) and jax once, their native start-up lines hidden unless `verbose`.
  TensorFlow only reads data: it is kept off accelerators (as t5x's train.py does), which also runs its
  device probe here, under the hidden stderr."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "2")
  with contextlib.nullcontext() if verbose else _native_stderr_hidden():
    importlib.import_module("seqio")
    importlib.import_module("tensorflow").config.set_visible_devices([], "GPU")
    importlib.import_module("jax").devices()


def main(argv=None) -> int:
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  if extra and not getattr(args, "passthrough", False):
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  args.extra = extra
  load_numerical_stack(args.verbose)
  try:
    return int(args.func(args) or 0)
  except (UsageError, OSError, UnicodeDecodeError) as e:
    print(f"phatgoose {args.command}: error: {_describe(e)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
