"""Multi-host training: 2 processes x 2 CPU devices on 127.0.0.1 equal 1 process x 4 devices; start-up flags.

The workers (tests/multihost_worker.py) run as subprocesses: the two halves of a `jax.distributed` job on a
free port chosen here, and the one-process reference, all at once. They are killed if still running.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys

import argparse
import numpy as np
import pytest

from phatgoose_jax import distributed
from phatgoose_jax.cli import UsageError

WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")
TIMEOUT_S = 600  # per process: on a 2-core machine at load 17 the workers took about 5 minutes
# Compilation is most of a worker's CPU time; every worker compiles the same way, so results stay comparable.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(out: pathlib.Path, workdir: pathlib.Path, devices: int, *flags: str) -> subprocess.Popen:
  """A worker whose output goes to `out/log` (a pipe nobody reads could fill and stall the collectives)."""
  out.mkdir()
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", XLA_FLAGS=FAST_COMPILE)
  with open(out / "log", "w") as log:
    return subprocess.Popen([sys.executable, str(WORKER), "--out", str(out), "--workdir", str(workdir),
                             "--devices", str(devices), *flags], env=env, stdout=log, stderr=subprocess.STDOUT)


def test_two_processes_train_like_one(tmp_path):
  address = f"127.0.0.1:{free_port()}"
  procs = []
  try:
    for i in range(2):
      procs.append(start(tmp_path / f"p{i}", tmp_path / "shared_workdir", 2, "--coordinator_address", address,
                         "--process_count", "2", "--process_index", str(i)))
    procs.append(start(tmp_path / "single", tmp_path / "single_workdir", 4))
    for p in procs:
      p.wait(timeout=TIMEOUT_S)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, out in zip(procs, ("p0", "p1", "single")):
    assert p.returncode == 0, (tmp_path / out / "log").read_text()[-3000:]

  multi, single = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("p0", "single"))
  assert not (tmp_path / "p1" / "report.json").exists()  # only process 0 writes results
  datasets = [json.loads((tmp_path / f"p{i}" / f"library_dataset_{i}.json").read_text()) for i in range(2)]
  assert datasets == ["process_0", "process_0"]  # process 0 wrote the library entry, process 1 read it back
  logs = list((tmp_path / "shared_workdir" / "tensorboard").glob("events.out.tfevents.*"))
  assert logs and {log.name.split(".")[-3] for log in logs} == {str(procs[0].pid)}  # TensorBoard logs by process 0
  assert (multi["process_count"], multi["device_count"], single["process_count"]) == (2, 4, 1)
  rows = [json.loads((tmp_path / f"p{i}" / f"rows_{i}.json").read_text()) for i in range(2)]
  assert rows == [[0, 4], [4, 8]]  # each process fed its half of the batch
  assert multi["restored_step"] == single["restored_step"] == 3
  assert multi["restored_equal"] and single["restored_equal"]
  np.testing.assert_allclose(multi["losses"], single["losses"], rtol=1e-5)
  assert len(multi["losses"]) == 3 and multi["losses"][-1] < multi["losses"][0]
  a, b = np.load(tmp_path / "p0" / "params.npz"), np.load(tmp_path / "single" / "params.npz")
  assert sorted(a) == sorted(b) and len(a) > 0
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=k)


def parse(*argv):
  parser = argparse.ArgumentParser()
  distributed.add_flags(parser)
  return parser.parse_args(argv)


def test_flags_parse_and_must_come_together():
  args = parse("--coordinator_address", "10.0.0.2:1234", "--process_count", "4", "--process_index", "3")
  assert (args.coordinator_address, args.process_count, args.process_index) == ("10.0.0.2:1234", 4, 3)
  with pytest.raises(UsageError, match="also pass --process_count and --process_index"):
    distributed.initialize_from_args(parse("--coordinator_address", "h:1"))
  with pytest.raises(UsageError, match=r"--process_index must be in \[0, 1\]"):
    distributed.check_flags("h:1", 2, 2)
  with pytest.raises(UsageError, match="HOST:PORT"):
    distributed.check_flags("localhost", 2, 0)
  with pytest.raises(UsageError, match="--process_count must be >= 1"):
    distributed.check_flags("h:1", 0, 0)


def test_plain_single_process_starts_nothing():
  assert distributed.initialize_from_args(parse()) == "single"
  assert distributed.is_writer()
  info = distributed.shard_info()
  assert (info.index, info.num_shards) == (0, 1)


def test_slurm_is_detected_only_for_a_multi_task_step():
  step = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "16", "SLURM_PROCID": "5",
          "SLURM_LOCALID": "5"}
  assert distributed.under_slurm(step)
  assert not distributed.under_slurm(dict(step, SLURM_NTASKS="1"))
  assert not distributed.under_slurm({k: v for k, v in step.items() if k != "SLURM_PROCID"})
  assert not distributed.under_slurm({})
