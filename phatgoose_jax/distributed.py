"""Multi-host start-up: JAX's distributed runtime from t5x's flags, the writer process, per-process data.

Every process of a multi-host run executes the same program; `jax.distributed.initialize` connects them
before any device is touched, after which `jax.devices()` lists every process's devices and a mesh spans
them all. The flags are t5x's (`t5x/train.py`):

  --coordinator_address HOST:PORT --process_count N --process_index I [--initialization_timeout S]

Without them the runtime starts by itself where the environment describes the job: on a Cloud TPU VM
(libtpu and TPU device files present) and in a SLURM step of more than one task (`srun`), both through
`jax.distributed.initialize()` with no arguments, which reads the cluster's own description. A plain single
process starts nothing. Only process 0 writes logs, results and library entries (`is_writer`); each process
reads its own shard of the data (`shard_info`).
"""
import argparse
import glob
import importlib.util
import logging
import os
from typing import Optional

import jax
import seqio

from phatgoose_jax import partitioning
from phatgoose_jax.cli import UsageError

# SLURM's description of a job step, as jax's own SLURM cluster detection reads it.
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
# TPU chips appear as /dev/accel* (v2-v4) or /dev/vfio/<n> (v5 and later).
TPU_DEVICE_FILES = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def add_flags(parser: argparse.ArgumentParser) -> None:
  """Add t5x's multi-host flags to `parser` (all optional; see the module docstring)."""
  group = parser.add_argument_group("multi-host", "start JAX's distributed runtime (t5x's flag names)")
  group.add_argument("--coordinator_address", default=None, metavar="HOST:PORT",
                     help="address of process 0's coordinator service")
  group.add_argument("--process_count", type=int, default=None, metavar="N", help="number of processes")
  group.add_argument("--process_index", type=int, default=None, metavar="I", help="this process, 0..N-1")
  group.add_argument("--initialization_timeout", type=int, default=None, metavar="SECONDS",
                     help="how long to wait for every process to connect (jax's default when unset)")


def under_slurm(environ=os.environ) -> bool:
  """True inside a SLURM job step of more than one task (`srun`, one process per task)."""
  return all(v in environ for v in SLURM_VARIABLES) and int(environ["SLURM_NTASKS"]) > 1


def on_cloud_tpu_vm() -> bool:
  """True on a Cloud TPU VM: libtpu is installed and TPU chips are attached."""
  has_chips = any(glob.glob(pattern) for pattern in TPU_DEVICE_FILES)
  return has_chips and importlib.util.find_spec("libtpu") is not None


def detected_cluster(environ=os.environ) -> Optional[str]:
  """'tpu' or 'slurm' when the environment describes a multi-process job, else None."""
  if on_cloud_tpu_vm():
    return "tpu"
  if under_slurm(environ):
    return "slurm"
  return None


def check_flags(coordinator_address: Optional[str], process_count: Optional[int],
                process_index: Optional[int]) -> None:
  """Raise `UsageError` unless the three flags are all unset or all set and consistent."""
  given = {"--coordinator_address": coordinator_address, "--process_count": process_count,
           "--process_index": process_index}
  missing = [k for k, v in given.items() if v is None]
  if not missing:
    if process_count < 1:
      raise UsageError(f"--process_count must be >= 1, got {process_count}")
    if not 0 <= process_index < process_count:
      raise UsageError(f"--process_index must be in [0, {process_count - 1}] for --process_count "
                       f"{process_count}, got {process_index}")
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit():
      raise UsageError(f"--coordinator_address must be HOST:PORT (e.g. 10.0.0.2:1234), got "
                       f"{coordinator_address!r}")
  elif len(missing) < len(given):
    raise UsageError(f"multi-host flags go together: also pass {' and '.join(missing)}")


def initialize(coordinator_address: Optional[str] = None, process_count: Optional[int] = None,
               process_index: Optional[int] = None, initialization_timeout: Optional[int] = None) -> str:
  """Start JAX's distributed runtime from the flags, or from the detected cluster; returns what it did.

  Must run before anything touches a device. Returns 'flags', 'tpu', 'slurm', or 'single' (nothing
  started: one process).
  """
  check_flags(coordinator_address, process_count, process_index)
  timeout = {} if initialization_timeout is None else {"initialization_timeout": initialization_timeout}
  if coordinator_address is not None:
    how = "flags"
    jax.distributed.initialize(coordinator_address, process_count, process_index, **timeout)
  else:
    how = detected_cluster() or "single"
    if how != "single":
      jax.distributed.initialize(**timeout)
  logging.info("distributed start-up: %s; process %d of %d, %d local of %d devices", how,
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return how


def initialize_from_args(args: argparse.Namespace) -> str:
  """`initialize` from the flags `add_flags` added to a parser."""
  return initialize(args.coordinator_address, args.process_count, args.process_index,
                    args.initialization_timeout)


def is_writer() -> bool:
  """True in the one process that writes logs, results and library entries: process 0."""
  return jax.process_index() == 0


def shard_info(mesh=None, rules=None):
  """This process's `seqio.ShardInfo` for reading its part of the data.

  Without a mesh: `ShardInfo(index=process_index, num_shards=process_count)`. With a mesh and rules: the
  shard of the batch this process's devices hold (`partitioning.data_shard`), so processes that hold the
  same rows (a model axis spanning hosts) read the same shard, as t5x's data layout does.
  """
  if mesh is None:
    return seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())
  index, num_shards = partitioning.data_shard(mesh, rules)
  return seqio.ShardInfo(index=index, num_shards=num_shards)
