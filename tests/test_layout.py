"""Dependencies run one way: lower layers never import higher ones (checked in a fresh interpreter)."""
import os
import subprocess
import sys

import pytest


def imported_after(module: str) -> set:
  code = f"import sys, {module}; print(' '.join(m for m in sys.modules if m.startswith('phatgoose_jax')))"
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  return set(run.stdout.split())


@pytest.mark.parametrize("module, forbidden", [
    ("phatgoose_jax.t5.network", ("phatgoose_jax.experts", "phatgoose_jax.models")),  # the dense layer is injected
    ("phatgoose_jax.library", ("phatgoose_jax.routers", "phatgoose_jax.models")),  # the library stores, not routes
    ("phatgoose_jax.models", ("phatgoose_jax.routers", "phatgoose_jax.library", "phatgoose_jax.train")),
    ("phatgoose_jax.checkpoints", ("phatgoose_jax.library", "phatgoose_jax.routers", "phatgoose_jax.models")),
])
def test_lower_layers_do_not_import_higher_ones(module, forbidden):
  loaded = imported_after(module)
  assert not [m for m in loaded if m.startswith(forbidden)]


def test_cli_help_imports_no_numerical_stack():
  """`phatgoose --help` and every subcommand's parser build without jax, TensorFlow or seqio (a fast start)."""
  code = ("import sys; from phatgoose_jax.cli import build_parser; build_parser(); "
          "heavy = [m for m in ('jax', 'tensorflow', 'seqio', 'numpy') if m in sys.modules]; "
          "assert not heavy, heavy")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_data_reading_after_cli_start_up_logs_no_device_probe():
  """After the CLI's start-up (`load_numerical_stack`), TensorFlow reading data prints no CUDA / device-probe
  lines: its probe ran under the hidden start-up stderr and it is kept off accelerators."""
  code = ("from phatgoose_jax.cli import load_numerical_stack; load_numerical_stack(); import tensorflow as tf; "
          "list(tf.data.Dataset.range(3).map(lambda x: x + 1).as_numpy_iterator()); "
          "assert not tf.config.get_visible_devices('GPU')")
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
  assert not [line for line in run.stderr.splitlines() if "cuda" in line.lower() or "cuinit" in line.lower()], run.stderr
