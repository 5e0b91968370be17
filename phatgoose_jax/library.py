"""The expert library on disk: one directory per expert, each written whole or not at all.

Layout of a library directory:
  <name>/manifest.json           name, source dataset, base-model fingerprint (T5 architecture + sha256 of
                                 the base weights), rank, target modules, stored dtype, whether a gate is
                                 present, training metadata, the sha256 of the weights file, and the
                                 entry's place in the library's order (`order`)
  <name>/weights.safetensors     flat '/'-joined keys `lora/<module>/lora_a` <[d_in, r]>,
                                 `lora/<module>/lora_b` <[r, d_out]>, `gates/<module>/gate` <[d_in]>
  <name>/derived/<kind>.safetensors   cached artifacts computed from the expert (average activations,
                                 Arrow vectors, retrieval embeddings), each tagged with the key of its inputs;
                                 optional: a library that cannot be written computes them in memory
Every write holds an exclusive `flock` on the library directory itself, so concurrent writers take turns
and see each other's entries. Adding writes `.tmp-<name>-<random>/` and renames it to `<name>`. Replacing
renames the complete new version to `.new-<name>`, the old entry to `.old-<name>`, then `.new-<name>` to
`<name>`, and deletes `.old-<name>`. Removing renames `<name>` to `.trash-<name>` and deletes that. Whatever
step a crash interrupts, recovery (run by every writer first, on opening a library when no writer holds
the lock, and by `verify(repair=True)`) finishes a committed replace, restores a set-aside entry that has
no successor and deletes what is not an entry, so the library holds each expert complete, in its old or
its new version; dot-directories are never listed. Entries are created with the permissions the umask
gives. Every expert of one library shares the base model, the rank and the target modules, which is what
stacking them into one routed model needs; `verify` and `route` check that (`check_consistent`).

The library lists its experts, and routers stack them, in one order (`names`): the experts of a preset pool
(P3, FLAN) in the pool's official order, whatever order they were added in (`tasks.pool_position`: the order
the official code concatenates them in, so that top-k ties and per-expert tables follow it), then the other
experts in the order they were added. Each manifest records its place (`order`, kept by a replace), so the
order needs no file besides the entries; entries written before it was recorded list first, by name.
"""
import collections
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence

import flax.linen as nn
import numpy as np

from phatgoose_jax.t5 import layout
from phatgoose_jax.checkpoints import names as ckpt_names
from phatgoose_jax.t5.config import ALL_TARGETS, T5Config
from phatgoose_jax.experts.config import ExpertConfig

FORMAT = "phatgoose-jax-expert"
VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
DERIVED = "derived"
DTYPES = ("float32", "bfloat16")
_TMP = ".tmp-"  # an entry being written, never committed
_NEW = ".new-"  # the complete new version of an interrupted replace
_OLD = ".old-"  # the entry a replace sets aside
_TRASH = ".trash-"  # an entry being removed
ADDED = 2  # the `order` group of experts outside the preset pools (tasks.pool_position: P3 0, FLAN 1)
_REQUIRED = ("name", "base", "rank", "targets", "dtype", "gate", "weights")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")


class LibraryError(ValueError):
  """An expert that cannot join the library, or an entry that cannot be read."""


class UntrainedGateWarning(UserWarning):
  """An expert whose gate vectors are all zero: PHATGOOSE routing cannot tell it apart."""


class Expert(NamedTuple):
  """One stored expert: its manifest and flat float32 `lora` (`<module>/lora_a|lora_b`) and `gates`."""
  manifest: dict
  lora: Dict[str, np.ndarray]
  gates: Dict[str, np.ndarray]


class Problem(NamedTuple):
  """A finding of `verify`: `level` is 'error' (the entry is unusable) or 'warning'."""
  entry: str
  level: str
  message: str


def _flat_float32(tree: Mapping) -> Dict[str, np.ndarray]:
  """A nested or flat, possibly boxed, tree as `{'a/b/leaf': float32 array}`."""
  return {k: np.asarray(v, np.float32) for k, v in ckpt_names.flatten(nn.meta.unbox(dict(tree))).items()}


def params_sha256(params: Mapping, config: T5Config) -> str:
  """sha256 over the base parameters: each leaf's per-layer path, shape and float32 bytes, in sorted path order
  (the same for a model under `scan_layers`: checkpoints/layout.py)."""
  digest = hashlib.sha256()
  flat = layout.per_layer_flat(nn.meta.unbox(dict(params)), config)
  for key in sorted(flat):  # one leaf on the host at a time
    value = np.ascontiguousarray(flat[key](), np.float32)
    digest.update(f"{key}:{value.shape};".encode())
    digest.update(value)  # the buffer itself: no bytes copy
  return digest.hexdigest()


def base_fingerprint(config: T5Config, params: Mapping) -> dict:
  """What identifies a base model: `{"config": T5Config.fingerprint() as a dict, "params_sha256": ...}`."""
  return {"config": json.loads(config.fingerprint()), "params_sha256": params_sha256(params, config)}


def fingerprint_config(fingerprint: Mapping) -> T5Config:
  """The T5Config recorded in a base fingerprint."""
  return T5Config.from_dict(fingerprint["config"])


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def data_key(batches: Sequence) -> str:
  """sha256 of a list of batches (dicts of arrays, or of lists: texts, answer-choice lists): the cache key of
  derived artifacts."""
  digest = hashlib.sha256()
  for batch in batches:
    for key in sorted(batch):
      value = batch[key]
      digest.update(key.encode())
      value = np.asarray(value, dtype=object if isinstance(value, list) else None)
      if value.dtype.kind in "OSU":  # texts: their characters (an object array's bytes are pointers)
        digest.update(f"text{value.shape}".encode() + "\0".join(map(str, value.reshape(-1))).encode())
      else:
        digest.update(f"{value.dtype}{value.shape}".encode() + np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()


def _split_modules(lora: Mapping[str, np.ndarray]) -> List[str]:
  """The module paths of a flat lora dict; refuses leaves other than lora_a / lora_b."""
  odd = sorted(k for k in lora if k.rsplit("/", 1)[-1] not in ("lora_a", "lora_b"))
  if odd:
    raise LibraryError(f"LoRA weights may only hold `<module>/lora_a` and `<module>/lora_b`, found {odd[:5]}")
  return sorted({k.rsplit("/", 1)[0] for k in lora})


def describe_expert(config: T5Config, lora: Mapping[str, np.ndarray],
                    gates: Optional[Mapping[str, np.ndarray]] = None) -> tuple:
  """`(rank, targets)` of a flat lora dict, checked against the model: every layer of each target kind,
  A <[d_in, r]>, B <[r, d_out]>, one rank, and a gate <[d_in]> for every module or none."""
  modules = _split_modules(lora)
  if not modules:
    raise LibraryError("the expert holds no LoRA weights")
  kinds = {ckpt_names.module_kind(m) for m in modules}
  targets = tuple(t for t in ALL_TARGETS if t in kinds)
  ranks = {np.shape(v)[-1] for k, v in lora.items() if k.endswith("/lora_a")}
  if len(ranks) > 1:
    raise LibraryError(f"the expert's modules have several LoRA ranks {sorted(ranks)}")
  rank = ranks.pop() if ranks else 0
  expected = {}
  for m in ckpt_names.module_paths(config, targets):
    d_in, d_out = ckpt_names.linear_shape(config, m)
    expected.update({f"{m}/lora_a": (d_in, rank), f"{m}/lora_b": (rank, d_out)})
    if gates:
      expected[f"{m}/gate"] = (d_in,)
  found = {k: np.shape(v) for k, v in {**lora, **(gates or {})}.items()}
  report = ckpt_names.shape_mismatch_report(expected, found)
  if report:
    raise LibraryError(f"the expert does not fit the base model (LoRA on every layer of {list(targets)}, "
                       f"rank {rank}):\n{report}")
  return rank, targets


def gates_all_zero(gates: Mapping[str, np.ndarray]) -> bool:
  return bool(gates) and all(not np.any(v) for v in gates.values())


def nonfinite_report(arrays: Mapping[str, np.ndarray]) -> Optional[str]:
  """None when every value is finite, else how many NaN / Inf values which arrays hold."""
  bad = {k: int(np.size(v) - np.count_nonzero(np.isfinite(v))) for k, v in sorted(arrays.items())}
  bad = {k: n for k, n in bad.items() if n}
  if not bad:
    return None
  shown = ", ".join(f"{k} ({n})" for k, n in list(bad.items())[:3])
  return f"{sum(bad.values())} non-finite values (NaN or Inf) in {len(bad)} arrays, e.g. {shown}"


def _mismatch(ref: Mapping, manifest: Mapping) -> Optional[tuple]:
  """None when `manifest` shares `ref`'s base model, rank and targets, else `(what ref's experts have,
  what this one has)` as phrases."""
  if ref["base"]["config"] != manifest["base"]["config"]:
    diffs = [f"{k}: {manifest['base']['config'].get(k)!r} vs {v!r}" for k, v in ref["base"]["config"].items()
             if manifest["base"]["config"].get(k) != v]
    return "use another base model", f"architecture differs in {'; '.join(diffs)}"
  if ref["base"]["params_sha256"] != manifest["base"]["params_sha256"]:
    return "use another base model", (f"base weights differ (sha256 {manifest['base']['params_sha256'][:12]}... "
                                      f"vs {ref['base']['params_sha256'][:12]}...)")
  if ref["rank"] != manifest["rank"]:
    return f"have rank {ref['rank']}", f"its LoRA rank is {manifest['rank']}"
  if ref["targets"] != manifest["targets"]:
    return f"target {ref['targets']}", f"it targets {manifest['targets']}"
  return None


def _signature(manifest: Mapping) -> str:
  """What experts routed together must share: base architecture and weights, rank, targets."""
  return json.dumps([manifest["base"]["config"], manifest["base"]["params_sha256"], manifest["rank"],
                     manifest["targets"]], sort_keys=True)


def _reference_of(manifests: Sequence[dict]) -> Optional[dict]:
  """Of the manifests sharing the most common base model, rank and targets, the earliest-created one."""
  if not manifests:
    return None
  counts = collections.Counter(map(_signature, manifests))
  return min(manifests, key=lambda m: (-counts[_signature(m)], m.get("created", 0.0), m["name"]))


def _order_key(manifest: Optional[dict], name: str) -> tuple:
  """Sort key of an entry in the library's order: entries without a recorded `order` first, by name; then by
  `order`; unreadable entries last."""
  if manifest is None:
    return (2, [], name)
  return (0, [], name) if "order" not in manifest else (1, manifest["order"], name)


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def _fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _rename(src: str, dst: str) -> None:
  """Rename and make the rename durable."""
  os.rename(src, dst)
  _fsync_dir(os.path.dirname(dst))


def _write_json(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())


def _save_safetensors(path: str, arrays: Mapping[str, np.ndarray], dtype: str = "float32",
                      metadata: Optional[dict] = None) -> None:
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
  save_file({k: np.ascontiguousarray(np.asarray(v, np.float32).astype(np_dtype)) for k, v in arrays.items()},
            path, metadata=metadata)
  os.chmod(path, 0o666 & ~_umask())  # safetensors creates 0600
  with open(path, "rb+") as f:
    os.fsync(f.fileno())


def _load_safetensors(path: str) -> tuple:
  """(float32 arrays, metadata) of a safetensors file."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  with safe_open(path, framework="numpy") as f:
    metadata = f.metadata() or {}
    return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}, metadata


@contextlib.contextmanager
def _locked(path: str, blocking: bool = True):
  """Hold an exclusive flock on directory `path` (no lock file joins the listing); yields whether it was
  taken (always, when `blocking`)."""
  fd = os.open(path, os.O_RDONLY)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
      yield False
      return
    yield True
  finally:
    os.close(fd)


def _legacy_trash_entries(trash: str) -> List[str]:
  """The complete entries inside a `.trash-<name>-<random>/` directory of the earlier layout, where a
  replace or removal moved `<name>` to `.trash-<name>-<random>/<name>`."""
  return [n for n in os.listdir(trash) if os.path.isfile(os.path.join(trash, n, MANIFEST))]


class ExpertLibrary:
  """A directory of experts: add, list, remove, verify, load, and assemble E of them into a routed model."""

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    if self._leftovers():
      self._recover_if_free()

  def _entry(self, name: str) -> str:
    return os.path.join(self.path, name)

  def names(self) -> List[str]:
    """The entries in the library's order (module docstring); unreadable ones last, by name (temporary,
    set-aside and half-removed directories are not entries)."""
    if not os.path.isdir(self.path):
      return []
    entries = [n for n in os.listdir(self.path)
               if not n.startswith(".") and os.path.isfile(os.path.join(self.path, n, MANIFEST))]
    return sorted(entries, key=lambda n: _order_key(self._manifest_or_none(n), n))

  def manifest(self, name: str) -> dict:
    path = os.path.join(self._entry(name), MANIFEST)
    if not os.path.isfile(path):
      raise LibraryError(f"library {self.path} has no expert named {name!r}; it has {self.names()}")
    fix = f"`phatgoose library remove {name} --library {self.path}` deletes the entry"
    try:
      with open(path, "rb") as f:
        manifest = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as e:
      raise LibraryError(f"corrupt manifest {path}: {e}; {fix}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
      raise LibraryError(f"corrupt manifest {path}: not a {FORMAT} manifest; {fix}")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing or manifest["name"] != name:
      raise LibraryError(f"corrupt manifest {path}: " + (f"no {missing}" if missing else
                         f"it names expert {manifest['name']!r}, not {name!r}") + f"; {fix}")
    return manifest

  def list(self) -> List[dict]:
    """The manifests of all readable entries, in the library's order (see `unreadable` for the others)."""
    return [m for m in map(self._manifest_or_none, self.names()) if m is not None]

  def unreadable(self) -> Dict[str, str]:
    """`{name: why}` for the entries whose manifest cannot be read."""
    found = {}
    for name in self.names():
      try:
        self.manifest(name)
      except LibraryError as e:
        found[name] = str(e)
    return found

  def _manifest_or_none(self, name: str) -> Optional[dict]:
    try:
      return self.manifest(name)
    except LibraryError:
      return None

  def reference(self) -> Optional[dict]:
    """The manifest that stands for the library's base model, rank and targets: among readable entries,
    the earliest-created of those sharing the most common combination (None for an empty library)."""
    return _reference_of(self.list())

  def t5_config(self) -> T5Config:
    """The base model's architecture shared by every entry."""
    ref = self.reference()
    if ref is None:
      raise LibraryError(f"library {self.path} has no readable expert")
    return fingerprint_config(ref["base"])

  def check_consistent(self, names: Sequence[str]) -> None:
    """Refuse to combine experts `names` when any of them differs from the library's base model, rank or
    targets (`reference`); the error names each offending entry."""
    ref = self.reference()
    found = []
    for name in names:
      mismatch = _mismatch(ref, self.manifest(name))
      if mismatch:
        found.append(f"{name!r} ({mismatch[1]}, while the library's experts, e.g. {ref['name']!r}, {mismatch[0]})")
    if found:
      raise LibraryError(f"library {self.path} mixes experts that cannot be combined: {'; '.join(found)}; "
                         f"remove them (`phatgoose library remove NAME --library {self.path}`) or give them "
                         f"their own library")

  def _check_compatible(self, manifest: dict, replace: bool = False) -> None:
    """Refuse an expert whose base model, rank or targets differ from the library's experts."""
    name = manifest["name"]
    if os.path.isdir(self._entry(name)) and not replace:
      raise LibraryError(f"library {self.path} already has an expert named {name!r}; remove it first")
    ref = _reference_of([m for m in self.list() if m["name"] != name])
    mismatch = ref and _mismatch(ref, manifest)
    if mismatch:
      raise LibraryError(f"expert {name!r} does not fit library {self.path} (whose experts, e.g. {ref['name']!r}, "
                         f"{mismatch[0]}): {mismatch[1]}")

  def add(self, name: str, lora: Mapping, *, base: Mapping, gates: Optional[Mapping] = None,
          dataset: Optional[str] = None, dtype: str = "float32", training: Optional[dict] = None,
          replace: bool = False) -> dict:
    """Store one expert (a nested or flat `lora` collection, optional `gates`) and return its manifest.

    `replace=True` swaps an existing entry of that name for the new one (e.g. the expert with its trained
    gate); after a crash the library holds the old version or the new one, never neither. `base` is
    `base_fingerprint(config, params)` of the model it was trained on. Refuses NaN / Inf weights; warns
    (`UntrainedGateWarning`) when every gate vector is zero.
    """
    if not _NAME.fullmatch(name or ""):
      raise LibraryError(f"expert name {name!r} must match {_NAME.pattern} (it names a directory)")
    if dtype not in DTYPES:
      raise LibraryError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    lora, gates = _flat_float32(lora), _flat_float32(gates or {})
    rank, targets = describe_expert(fingerprint_config(base), lora, gates)
    weights = {**{f"lora/{k}": v for k, v in lora.items()}, **{f"gates/{k}": v for k, v in gates.items()}}
    report = nonfinite_report(weights)
    if report:
      raise LibraryError(f"expert {name!r} has {report} (a diverged training run?); it was not added")
    manifest = {"format": FORMAT, "version": VERSION, "name": name, "dataset": dataset,
                "base": {"config": dict(base["config"]), "params_sha256": base["params_sha256"]},
                "rank": rank, "targets": list(targets), "dtype": dtype, "gate": bool(gates),
                "num_modules": len(lora) // 2, "training": training or {}, "created": time.time()}
    if gates_all_zero(gates):
      warnings.warn(f"expert {name!r}: every gate vector is zero (an untrained gate); PHATGOOSE routing "
                    f"will not prefer it for any token", UntrainedGateWarning, stacklevel=2)
    os.makedirs(self.path, exist_ok=True)
    with _locked(self.path):
      self._recover()
      self._check_compatible(manifest, replace)
      manifest["order"] = self._order_of(name, dataset)
      self._write_entry(name, weights, manifest)
    return self.manifest(name)

  def _order_of(self, name: str, dataset: Optional[str]) -> list:
    """Under the lock: the `order` of entry `name`: the one it has (a replace), else its preset pool's
    `[pool, index]`, else `[ADDED, n]` after every entry added so far."""
    current = self._manifest_or_none(name) if os.path.isdir(self._entry(name)) else None
    if current is not None and "order" in current:
      return current["order"]
    if dataset is not None:
      from phatgoose_jax import tasks  # pylint: disable=import-outside-toplevel  # the pools, only when needed
      position = tasks.pool_position(dataset)
      if position is not None:
        return list(position)
    added = [m["order"][1] for m in self.list() if m.get("order", [None])[0] == ADDED]
    return [ADDED, max(added, default=-1) + 1]

  def _write_entry(self, name: str, weights: Dict[str, np.ndarray], manifest: dict) -> None:
    """Under the lock: write weights then manifest into a temporary directory, then rename it into place,
    or, when `name` exists, to `.new-<name>` and swap it in."""
    tmp = tempfile.mkdtemp(prefix=f"{_TMP}{name}-", dir=self.path)
    try:
      os.chmod(tmp, 0o777 & ~_umask())
      _save_safetensors(os.path.join(tmp, WEIGHTS), weights, manifest["dtype"])
      manifest["weights"] = {"file": WEIGHTS, "sha256": file_sha256(os.path.join(tmp, WEIGHTS)),
                             "bytes": os.path.getsize(os.path.join(tmp, WEIGHTS))}
      _write_json(os.path.join(tmp, MANIFEST), manifest)
      replacing = os.path.isdir(self._entry(name))
      _rename(tmp, self._entry(_NEW + name) if replacing else self._entry(name))
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    if replacing:
      self._finish_replace(name)

  def _finish_replace(self, name: str) -> List[Problem]:
    """Bring a replace of `name` to its end from any step: `.new-<name>` (committed) takes the entry's place,
    `.old-<name>` is deleted once an entry exists, else restored. Returns what it restored."""
    entry, new, old = self._entry(name), self._entry(_NEW + name), self._entry(_OLD + name)
    done = []
    if os.path.isdir(new):
      if os.path.isdir(entry):
        if os.path.isdir(old):
          shutil.rmtree(old)
        _rename(entry, old)
      _rename(new, entry)
      done.append(Problem(name, "warning", "repaired: finished an interrupted replace"))
    if os.path.isdir(old):
      if os.path.isdir(entry):
        shutil.rmtree(old)
      else:
        _rename(old, entry)
        done.append(Problem(name, "warning", "repaired: restored the entry an interrupted replace set aside"))
    return done

  def _leftovers(self) -> List[str]:
    if not os.path.isdir(self.path):
      return []
    return sorted(n for n in os.listdir(self.path) if n.startswith((_TMP, _NEW, _OLD, _TRASH)))

  def _recover(self) -> List[Problem]:
    """Under the lock: finish or undo every interrupted write; returns what it restored."""
    done = []
    for leftover in self._leftovers():
      full = self._entry(leftover)
      if leftover.startswith((_NEW, _OLD)):
        done += self._finish_replace(leftover.split("-", 1)[1])
      elif not os.path.isdir(full):
        continue
      elif leftover.startswith(_TRASH):
        for name in _legacy_trash_entries(full):
          if not os.path.isdir(self._entry(name)):
            _rename(os.path.join(full, name), self._entry(name))
            done.append(Problem(name, "warning", f"repaired: restored the entry from {leftover}"))
        shutil.rmtree(full)
      else:
        shutil.rmtree(full)
    return done

  def _recover_if_free(self) -> None:
    """Recover on opening, unless a writer holds the lock or the library cannot be written (then `verify`
    reports what is left)."""
    try:
      with _locked(self.path, blocking=False) as taken:
        for problem in self._recover() if taken else []:
          logging.warning("library %s: %s: %s", self.path, problem.entry, problem.message)
    except OSError as e:
      logging.warning("library %s: cannot recover interrupted writes (%s); run `phatgoose library verify "
                      "--repair` with write access", self.path, e)

  def remove(self, name: str) -> None:
    """Delete an entry, readable or not: renamed out of the listing first, then deleted."""
    if not _NAME.fullmatch(name or "") or not os.path.isdir(self._entry(name)):
      raise LibraryError(f"library {self.path} has no expert named {name!r}; it has {self.names()}")
    with _locked(self.path):
      self._recover()
      trash = self._entry(_TRASH + name)
      _rename(self._entry(name), trash)
      shutil.rmtree(trash)

  def load(self, name: str) -> Expert:
    """An expert's manifest and float32 weights; refuses a weights file whose sha256 is not the manifest's."""
    manifest = self.manifest(name)
    path = os.path.join(self._entry(name), WEIGHTS)
    if not os.path.isfile(path) or file_sha256(path) != manifest["weights"]["sha256"]:
      raise LibraryError(f"expert {name!r}: {path} is missing or corrupt (sha256 differs from the manifest); "
                         f"run `phatgoose library verify`")
    arrays, _ = _load_safetensors(path)
    lora = {k[len("lora/"):]: v for k, v in arrays.items() if k.startswith("lora/")}
    gates = {k[len("gates/"):]: v for k, v in arrays.items() if k.startswith("gates/")}
    return Expert(manifest, lora, gates)

  def _verify_entry(self, name: str, ref: Optional[dict]) -> List[Problem]:
    try:
      expert = self.load(name)
      rank, targets = describe_expert(fingerprint_config(expert.manifest["base"]), expert.lora, expert.gates)
    except (LibraryError, OSError, KeyError, ValueError) as e:
      return [Problem(name, "error", str(e))]
    found = []
    if (rank, list(targets), bool(expert.gates)) != (expert.manifest["rank"], expert.manifest["targets"],
                                                       expert.manifest["gate"]):
      found.append(Problem(name, "error", f"weights (rank {rank}, targets {list(targets)}, gate "
                                          f"{bool(expert.gates)}) disagree with the manifest"))
    mismatch = ref and _mismatch(ref, expert.manifest)
    if mismatch:
      found.append(Problem(name, "error", f"does not fit the library: {mismatch[1]}, while its other experts "
                                          f"(e.g. {ref['name']!r}) {mismatch[0]}"))
    report = nonfinite_report({**expert.lora, **expert.gates})
    if report:
      found.append(Problem(name, "error", f"{report}; remove it and retrain"))
    if gates_all_zero(expert.gates):
      found.append(Problem(name, "warning", "every gate vector is zero (an untrained gate)"))
    for kind in self.derived_kinds(name):
      if self.load_derived(name, kind) is None:
        found.append(Problem(name, "warning", f"derived artifact {kind!r} is unreadable; it will be recomputed"))
    return found

  def _leftover_problem(self, leftover: str) -> Problem:
    """What `verify` says of a directory an interrupted write left (when it could not be recovered)."""
    full, repair = self._entry(leftover), "`phatgoose library verify --repair` (with write access)"
    if leftover.startswith(_NEW):
      return Problem(leftover, "error", f"the complete new version of {leftover.split('-', 1)[1]!r} from an "
                                        f"interrupted replace; {repair} moves it into place")
    if leftover.startswith(_OLD):
      name = leftover.split("-", 1)[1]
      if os.path.isdir(self._entry(name)) or os.path.isdir(self._entry(_NEW + name)):
        return Problem(leftover, "warning", f"the old version of {name!r} set aside by an interrupted replace; "
                                            f"{repair} deletes it")
      return Problem(leftover, "error", f"the only complete copy of {name!r} (an interrupted replace); {repair} "
                                        f"restores it")
    hidden = [n for n in _legacy_trash_entries(full) if not os.path.isdir(self._entry(n))] \
        if leftover.startswith(_TRASH) and os.path.isdir(full) else []
    if hidden:
      return Problem(leftover, "error", f"holds the only copy of {hidden} (an interrupted replace or removal); "
                                        f"{repair} restores it")
    return Problem(leftover, "warning", f"left over by an interrupted write or removal, not an entry; {repair} "
                                        f"deletes it")

  def verify(self, repair: bool = False) -> List[Problem]:
    """Check every entry (manifest, weights sha256, shapes and finiteness, gates, fit with the library's
    base model, rank and targets) and report leftovers of interrupted writes; `repair=True` first recovers
    them (under the lock) and reports each restored entry as a warning."""
    problems = []
    if repair and os.path.isdir(self.path):
      with _locked(self.path):
        problems += self._recover()
    problems += [self._leftover_problem(n) for n in self._leftovers()]
    if os.path.isdir(self.path):
      for n in sorted(os.listdir(self.path)):
        full = os.path.join(self.path, n)
        if not n.startswith(".") and os.path.isdir(full) and not os.path.isfile(os.path.join(full, MANIFEST)):
          problems.append(Problem(n, "error", f"directory without {MANIFEST}: not a library entry"))
    ref = self.reference()
    for name in self.names():
      problems += self._verify_entry(name, ref)
    return problems

  def _derived_path(self, name: str, kind: str) -> str:
    return os.path.join(self._entry(name), DERIVED, f"{kind}.safetensors")

  def derived_kinds(self, name: str) -> List[str]:
    folder = os.path.join(self._entry(name), DERIVED)
    if not os.path.isdir(folder):
      return []
    return sorted(f[:-len(".safetensors")] for f in os.listdir(folder) if f.endswith(".safetensors"))

  def save_derived(self, name: str, kind: str, arrays: Mapping[str, np.ndarray], key: str) -> bool:
    """Cache an artifact computed from expert `name` (float32), tagged with the `key` of its inputs; returns
    False (and logs why) when the library cannot be written: the caller keeps its copy in memory."""
    sha256 = self.manifest(name)["weights"]["sha256"]
    path = self._derived_path(name, kind)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      _save_safetensors(tmp, arrays, metadata={"key": key, "weights_sha256": sha256})
      os.replace(tmp, path)
    except OSError as e:
      logging.warning("not caching %s of expert %r (%s); it is computed in memory", kind, name, e)
      return False
    finally:
      with contextlib.suppress(OSError):
        os.remove(tmp)
    return True

  def load_derived(self, name: str, kind: str, key: Optional[str] = None) -> Optional[Dict[str, np.ndarray]]:
    """A cached artifact, or None when absent, unreadable, made from other weights, or (given `key`) from
    other inputs."""
    path = self._derived_path(name, kind)
    if not os.path.isfile(path):
      return None
    try:
      arrays, metadata = _load_safetensors(path)
    except Exception:  # pylint: disable=broad-except
      return None
    if metadata.get("weights_sha256") != self.manifest(name)["weights"]["sha256"]:
      return None
    return arrays if key is None or metadata.get("key") == key else None


def expert_config(manifest: Mapping, **overrides) -> ExpertConfig:
  """The single-expert (`lora`) ExpertConfig of a stored expert."""
  return ExpertConfig(**{"mode": "lora", "rank": manifest["rank"], "targets": tuple(manifest["targets"]),
                         **overrides})
