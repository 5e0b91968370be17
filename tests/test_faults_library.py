"""Fault injection on the expert library: kills at every filesystem step, concurrent writers, mixed,
non-finite, corrupt and read-only libraries, and the permissions of new entries."""
import contextlib
import json
import os
import shutil
import time
import warnings

import numpy as np
import pytest

from phatgoose_jax import routers
from phatgoose_jax import library as lib
from phatgoose_jax.t5.config import preset

from random_trees import random_expert, random_params

CFG = preset("tiny")
CRASH = 17
# Every os call by which the library changes the disk; a kill lands just before one of them.
STEPS = ("mkdir", "rename", "replace", "rmdir", "unlink", "remove", "fsync", "chmod")


@pytest.fixture(scope="module")
def base():
  return lib.base_fingerprint(CFG, random_params())


@pytest.fixture
def pristine(tmp_path, base):
  """A library of e0 and e1 (gated), to be copied before each fault."""
  library = lib.ExpertLibrary(str(tmp_path / "pristine"))
  for i in range(2):
    library.add(f"e{i}", *random_expert(i)[:1], base=base, gates=random_expert(i)[1])
  return library.path


@contextlib.contextmanager
def counted_steps(crash_at=None):
  """Patch the `STEPS` os calls to count themselves; the call numbered `crash_at` kills the process
  (os._exit, no cleanup runs) instead of happening. Yields the running count."""
  count = [0]
  originals = {name: getattr(os, name) for name in STEPS}

  def wrap(name):
    def step(*args, **kwargs):
      count[0] += 1
      if count[0] == crash_at:
        os._exit(CRASH)
      return originals[name](*args, **kwargs)
    return step

  for name in STEPS:
    setattr(os, name, wrap(name))
  try:
    yield count
  finally:
    for name, function in originals.items():
      setattr(os, name, function)


def fork(function) -> int:
  """Start `function()` in a forked process, which exits 0 when it returns, 1 when it raises; its pid."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # JAX warns that fork and threads do not mix; the child runs no JAX
    pid = os.fork()
  if pid == 0:
    code = 1
    try:
      function()
      code = 0
    finally:
      os._exit(code)
  return pid


def wait(pid: int) -> int:
  """The exit status of child `pid`, which must end within a minute."""
  deadline = time.time() + 60
  while time.time() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
      return os.waitstatus_to_exitcode(status)
    time.sleep(0.01)
  os.kill(pid, 9)
  raise AssertionError("the child process hung")


def weights_of(library, name):
  expert = library.load(name)
  return {**expert.lora, **{f"gate/{k}": v for k, v in expert.gates.items()}}


def same(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


OPERATIONS = {
    "add": lambda library, base: library.add("new", random_expert(5)[0], base=base, gates=random_expert(5)[1]),
    "replace": lambda library, base: library.add("e1", random_expert(6)[0], base=base, gates=random_expert(6)[1],
                                                 replace=True),
    "remove": lambda library, base: library.remove("e1"),
}


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_a_kill_at_every_step_leaves_every_expert_complete(tmp_path, pristine, base, operation):
  """Kill the writer before each of its filesystem steps in turn; reopening the library must show each
  expert whole, old or new version, switching exactly once from before to after as the kill moves later."""
  run = lambda path: OPERATIONS[operation](lib.ExpertLibrary(path), base)
  before = {n: weights_of(lib.ExpertLibrary(pristine), n) for n in ("e0", "e1")}
  done = str(tmp_path / "done")
  shutil.copytree(pristine, done)
  with counted_steps() as count:
    run(done)
  after = {n: weights_of(lib.ExpertLibrary(done), n) for n in lib.ExpertLibrary(done).names()}
  assert count[0] >= 5
  outcomes = []
  for step in range(1, count[0] + 1):
    path = str(tmp_path / f"crash{step}")
    shutil.copytree(pristine, path)

    def crash(path=path, step=step):
      with counted_steps(crash_at=step):
        run(path)

    assert wait(fork(crash)) == CRASH
    library = lib.ExpertLibrary(path)  # opening recovers
    found = {n: weights_of(library, n) for n in library.names()}
    is_before = found.keys() == before.keys() and all(same(found[n], before[n]) for n in found)
    is_after = found.keys() == after.keys() and all(same(found[n], after[n]) for n in found)
    assert is_before or is_after, f"a kill at step {step} of {operation} left {sorted(found)}"
    assert sorted(os.listdir(path)) == library.names(), f"leftovers after a kill at step {step}"
    assert library.verify() == []
    outcomes.append(is_after)
  assert outcomes == sorted(outcomes) and not outcomes[0], outcomes


def test_verify_never_calls_the_only_copy_safe_to_delete_and_repair_restores_it(pristine):
  """The state an earlier version left when killed between the two renames of a replace: the old entry
  inside `.trash-e1-*/e1`, the new one complete in `.tmp-e1-*`, no `e1`."""
  old = weights_of(lib.ExpertLibrary(pristine), "e1")
  trash = os.path.join(pristine, ".trash-e1-k2j4")
  os.makedirs(trash)
  shutil.copytree(os.path.join(pristine, "e1"), os.path.join(pristine, ".tmp-e1-x9"))
  os.rename(os.path.join(pristine, "e1"), os.path.join(trash, "e1"))
  with lib._locked(pristine):  # a writer holds the lock: opening cannot recover
    library = lib.ExpertLibrary(pristine)
    assert library.names() == ["e0"]
    problems = {p.entry: p for p in library.verify()}
  assert problems[".trash-e1-k2j4"].level == "error" and "only copy of ['e1']" in problems[".trash-e1-k2j4"].message
  assert all("safe to delete" not in p.message for p in problems.values())
  repaired = library.verify(repair=True)
  assert [(p.entry, p.level) for p in repaired] == [("e1", "warning")]
  assert library.names() == ["e0", "e1"] and sorted(os.listdir(pristine)) == ["e0", "e1"]
  assert same(weights_of(library, "e1"), old)


def test_an_interrupted_replace_is_finished_when_the_library_is_opened(pristine, base):
  """A kill after the new version was committed (`.new-e1`) and the old one set aside (`.old-e1`)."""
  library = lib.ExpertLibrary(pristine)
  library.add("e1", random_expert(8)[0], base=base, gates=random_expert(8)[1], replace=True)
  new = weights_of(library, "e1")
  os.rename(os.path.join(pristine, "e1"), os.path.join(pristine, ".new-e1"))
  shutil.copytree(os.path.join(pristine, "e0"), os.path.join(pristine, ".old-e1"))
  with lib._locked(pristine):
    problems = lib.ExpertLibrary(pristine).verify()
  assert {(p.entry, p.level) for p in problems} == {(".new-e1", "error"), (".old-e1", "warning")}
  reopened = lib.ExpertLibrary(pristine)
  assert sorted(os.listdir(pristine)) == ["e0", "e1"] and same(weights_of(reopened, "e1"), new)


def _slow_writes(monkeypatch, log):
  """Each entry write logs its start and end around a pause, so overlapping writers would interleave."""
  save = lib._save_safetensors

  def slow(path, *args, **kwargs):
    with open(log, "a") as f:
      f.write(f"start {os.getpid()}\n")
    time.sleep(0.5)
    save(path, *args, **kwargs)
    with open(log, "a") as f:
      f.write(f"end {os.getpid()}\n")
  monkeypatch.setattr(lib, "_save_safetensors", slow)


@pytest.mark.parametrize("case", ["two names", "same name", "two bases"])
def test_concurrent_adds_take_turns(tmp_path, base, monkeypatch, case):
  path, log = str(tmp_path / "lib"), str(tmp_path / "log")
  _slow_writes(monkeypatch, log)
  other = lib.base_fingerprint(CFG, random_params(seed=3))
  errors = [str(tmp_path / f"error{i}") for i in range(2)]

  def writer(i):
    def add():
      name = "same" if case == "same name" else f"w{i}"
      try:
        lib.ExpertLibrary(path).add(name, random_expert(i)[0], base=other if case == "two bases" and i else base)
      except lib.LibraryError as e:
        with open(errors[i], "w") as f:
          f.write(str(e))
        raise
    return add

  pids = [fork(writer(i)) for i in range(2)]
  codes = sorted(wait(pid) for pid in pids)
  lines = open(log).read().splitlines()
  assert [(a.split()[0], b.split()[0], a.split()[1] == b.split()[1]) for a, b in zip(lines[::2], lines[1::2])] \
      == [("start", "end", True)] * (2 if case == "two names" else 1), lines
  library = lib.ExpertLibrary(path)
  if case == "two names":  # in the order the writers took the lock, whichever came first
    turns = [f"w{pids.index(int(line.split()[1]))}" for line in lines[::2]]
    assert codes == [0, 0] and sorted(turns) == ["w0", "w1"] and library.names() == turns
    return
  assert codes == [0, 1] and len(library.names()) == 1 and library.verify() == []
  message = next(open(e).read() for e in errors if os.path.exists(e))
  expected = "already has an expert named 'same'" if case == "same name" else "another base model"
  assert expected in message


@pytest.fixture
def mixed(pristine):
  """The pristine library plus a hand-copied entry of rank 2 from another library."""
  other = lib.ExpertLibrary(os.path.join(os.path.dirname(pristine), "other"))
  other.add("odd", random_expert(3, rank=2)[0], base=lib.ExpertLibrary(pristine).manifest("e0")["base"])
  shutil.copytree(os.path.join(other.path, "odd"), os.path.join(pristine, "odd"))
  return lib.ExpertLibrary(pristine)


def test_verify_and_routing_refuse_a_mixed_library(mixed):
  problems = mixed.verify()
  assert [(p.entry, p.level) for p in problems] == [("odd", "error")]
  assert "its LoRA rank is 2" in problems[0].message and "have rank 4" in problems[0].message
  with pytest.raises(lib.LibraryError, match=r"mixes experts.*'odd' \(its LoRA rank is 2"):
    mixed.check_consistent(["e0", "odd"])
  with pytest.raises(lib.LibraryError, match="'odd'"):
    routers.build("phatgoose", mixed, ["e0", "e1", "odd"])
  mixed.check_consistent(["e0", "e1"])
  assert routers.build("phatgoose", mixed, ["e0", "e1"]).expert_config.num_experts == 2


def test_nonfinite_weights_are_refused_on_add_and_reported_by_verify(pristine, base):
  library = lib.ExpertLibrary(pristine)
  lora, gates = random_expert(4)
  bad_gate = dict(gates)
  bad_gate["decoder/layers_0/mlp/wo/gate"] = np.full_like(gates["decoder/layers_0/mlp/wo/gate"], np.inf)
  with pytest.raises(lib.LibraryError, match=r"non-finite values.*decoder/layers_0/mlp/wo/gate"):
    library.add("inf", lora, base=base, gates=bad_gate)
  bad_lora = dict(lora)
  bad_lora["encoder/layers_0/attention/query/lora_a"] = lora["encoder/layers_0/attention/query/lora_a"] * np.nan
  with pytest.raises(lib.LibraryError, match="NaN or Inf"):
    library.add("nan", bad_lora, base=base)
  assert library.names() == ["e0", "e1"]
  # weights made non-finite on disk, with a manifest whose sha256 matches (no checksum can tell)
  entry = os.path.join(pristine, "e1")
  weights = {f"lora/{k}": v for k, v in bad_lora.items()}
  weights.update({f"gates/{k}": v for k, v in gates.items()})
  lib._save_safetensors(os.path.join(entry, lib.WEIGHTS), weights)
  manifest = json.load(open(os.path.join(entry, lib.MANIFEST)))
  manifest["weights"]["sha256"] = lib.file_sha256(os.path.join(entry, lib.WEIGHTS))
  lib._write_json(os.path.join(entry, lib.MANIFEST), manifest)
  problems = library.verify()
  assert [(p.entry, p.level) for p in problems] == [("e1", "error")] and "NaN or Inf" in problems[0].message


def test_a_corrupt_manifest_is_listed_as_such_and_spares_the_others(pristine, base):
  library = lib.ExpertLibrary(pristine)
  with open(os.path.join(pristine, "e1", lib.MANIFEST), "w") as f:
    f.write('{"format": "phatgoose-jax-expert", "name": "e1", "ra')
  assert [m["name"] for m in library.list()] == ["e0"]
  assert list(library.unreadable()) == ["e1"] and "corrupt manifest" in library.unreadable()["e1"]
  assert library.t5_config() == CFG
  assert routers.build("phatgoose", library, ["e0"], top_k=1).expert_config.num_experts == 1
  library.add("e2", random_expert(2)[0], base=base)
  assert [(p.entry, p.level) for p in library.verify()] == [("e1", "error")]
  library.remove("e1")
  assert library.names() == ["e0", "e2"] and library.verify() == []


def test_a_library_that_cannot_be_written_computes_caches_in_memory(pristine, monkeypatch):
  library = lib.ExpertLibrary(pristine)
  expected = routers.build("arrow", library, ["e0", "e1"], top_k=1).collection
  for name in ("e0", "e1"):
    shutil.rmtree(os.path.join(pristine, name, lib.DERIVED))

  def denied(path, *args, **kwargs):
    raise PermissionError(13, "Permission denied", path)
  monkeypatch.setattr(lib.os, "makedirs", denied)
  monkeypatch.setattr(lib, "_save_safetensors", denied)
  routing = routers.build("arrow", lib.ExpertLibrary(pristine), ["e0", "e1"], top_k=1)
  assert library.derived_kinds("e0") == [] and library.derived_kinds("e1") == []
  np.testing.assert_array_equal(routing.collection["encoder"]["layers_0"]["mlp"]["wo"]["router"],
                                expected["encoder"]["layers_0"]["mlp"]["wo"]["router"])


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_new_entries_respect_the_umask(tmp_path, base, umask):
  old = os.umask(umask)
  try:
    library = lib.ExpertLibrary(str(tmp_path / "lib"))
    library.add("e", *random_expert(0)[:1], base=base)
    library.add("e", *random_expert(1)[:1], base=base, replace=True)
  finally:
    os.umask(old)
  entry = os.path.join(library.path, "e")
  assert os.stat(entry).st_mode & 0o777 == 0o777 & ~umask
  for f in (lib.MANIFEST, lib.WEIGHTS):
    assert os.stat(os.path.join(entry, f)).st_mode & 0o777 == 0o666 & ~umask
