"""Which run a training workdir belongs to, so that reusing it for another run is refused, not resumed.

The first run in a workdir writes `owner.json`: its identity (stage, task, expert name, base-model
fingerprint, training configuration). Every later run there must present the same identity: it then
resumes from the workdir's latest checkpoint (`checkpoints/<step>/`, written by orbax's
CheckpointManager), and says so.
"""
import json
import os
import sys
from typing import Mapping, Optional

from phatgoose_jax import distributed

OWNER = "owner.json"
CHECKPOINTS = "checkpoints"


class WorkdirMismatch(ValueError):
  """A workdir that belongs to another run."""


def _canonical(identity: Mapping) -> dict:
  """`identity` as it reads back from JSON (tuples as lists, keys as strings)."""
  return json.loads(json.dumps(identity, sort_keys=True, default=str))


def _short(value) -> str:
  text = json.dumps(value, sort_keys=True, default=str)
  return text if len(text) <= 60 else text[:57] + "..."


def differences(recorded, wanted, prefix: str = "") -> list:
  """`key: recorded vs wanted` for every leaf where two JSON-like values differ."""
  if isinstance(recorded, dict) and isinstance(wanted, dict):
    found = []
    for key in sorted(set(recorded) | set(wanted)):
      found += differences(recorded.get(key), wanted.get(key), f"{prefix}{key}.")
    return found
  return [] if recorded == wanted else [f"{prefix[:-1]}: {_short(recorded)} vs {_short(wanted)}"]


def latest_step(workdir: str) -> Optional[int]:
  """The step of the newest finished checkpoint under `workdir/checkpoints` (orbax names each finished one by
  its step; unfinished ones carry a temporary suffix), or None."""
  folder = os.path.join(workdir, CHECKPOINTS)
  steps = [int(n) for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(folder) else []
  return max(steps, default=None)


def _write_owner(path: str, identity: dict) -> None:
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(identity, f, indent=2, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def claim(workdir: str, identity: Mapping) -> Optional[int]:
  """Make `workdir` the workdir of the run `identity` (a JSON-able dict: stage, task, name, base, config).

  A new or empty workdir records `identity` in `owner.json` (written by process 0 alone). A workdir recorded with another identity is
  refused (`WorkdirMismatch` naming both); one holding checkpoints but no `owner.json` (older runs) is
  claimed. Returns the step the run resumes from (None for a fresh start), after printing
  `resuming <workdir> from step N` to standard error.
  """
  wanted = _canonical(identity)
  path = os.path.join(workdir, OWNER)
  if os.path.isfile(path):
    with open(path) as f:
      recorded = json.load(f)
    found = differences(recorded, wanted)
    if found:
      raise WorkdirMismatch(f"workdir {workdir} belongs to another run ({'; '.join(found)}, recorded vs this run's): "
                            f"give this run its own workdir, or delete {workdir} to start that one over")
  elif distributed.is_writer():
    os.makedirs(workdir, exist_ok=True)
    _write_owner(path, wanted)
  step = latest_step(workdir)
  if step is not None:
    print(f"resuming {workdir} from step {step}", file=sys.stderr)
  return step
