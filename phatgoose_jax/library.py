"""The expert library on disk: one directory per expert, each written whole or not at all.

Layout of a library directory:
  <name>/manifest.json           name, source dataset, base-model fingerprint (T5 architecture + sha256 of
                                 the base weights), rank, target modules, stored dtype, whether a gate is
                                 present, training metadata, and the sha256 of the weights file
  <name>/weights.safetensors     flat '/'-joined keys `lora/<module>/lora_a` <[d_in, r]>,
                                 `lora/<module>/lora_b` <[r, d_out]>, `gates/<module>/gate` <[d_in]>
  <name>/derived/<kind>.safetensors   cached artifacts computed from the expert (average activations,
                                 Arrow vectors, retrieval embeddings), each tagged with the key of its inputs
An entry is written into `.tmp-<name>-<random>/` and renamed into place, a removal renames the entry to
`.trash-...` before deleting it, and derived files are written beside their final name and renamed, so
a crash at any point leaves every listed entry complete; dot-directories are never listed. Adding an
expert touches no other entry. Every expert of one library shares the base model, the rank and the
target modules, which is what stacking them into one routed model needs.
"""
import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence

import flax.linen as nn
import numpy as np

from phatgoose_jax import routers
from phatgoose_jax.checkpoints import names as ckpt_names
from phatgoose_jax.t5.config import ALL_TARGETS, ExpertConfig, T5Config

FORMAT = "phatgoose-jax-expert"
VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
DERIVED = "derived"
DTYPES = ("float32", "bfloat16")
_TMP = ".tmp-"
_TRASH = ".trash-"
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


def params_sha256(params: Mapping) -> str:
  """sha256 over the base parameters: each leaf's path, shape and float32 bytes, in sorted path order."""
  digest = hashlib.sha256()
  for key, value in sorted(_flat_float32(params).items()):
    digest.update(f"{key}:{value.shape};".encode())
    digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()


def base_fingerprint(config: T5Config, params: Mapping) -> dict:
  """What identifies a base model: `{"config": T5Config.fingerprint() as a dict, "params_sha256": ...}`."""
  return {"config": json.loads(config.fingerprint()), "params_sha256": params_sha256(params)}


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
  """sha256 of a list of batches (dicts of arrays or of string lists): the cache key of derived artifacts."""
  digest = hashlib.sha256()
  for batch in batches:
    for key in sorted(batch):
      value = batch[key]
      digest.update(key.encode())
      if isinstance(value, np.ndarray) or hasattr(value, "dtype"):
        value = np.asarray(value)
        digest.update(f"{value.dtype}{value.shape}".encode() + np.ascontiguousarray(value).tobytes())
      else:
        digest.update("\0".join(map(str, value)).encode())
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


def _fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


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
  with open(path, "rb+") as f:
    os.fsync(f.fileno())


def _load_safetensors(path: str) -> tuple:
  """(float32 arrays, metadata) of a safetensors file."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  with safe_open(path, framework="numpy") as f:
    metadata = f.metadata() or {}
    return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}, metadata


class ExpertLibrary:
  """A directory of experts: add, list, remove, verify, load, and assemble E of them into a routed model."""

  def __init__(self, path: str):
    self.path = os.path.abspath(path)

  def _entry(self, name: str) -> str:
    return os.path.join(self.path, name)

  def names(self) -> List[str]:
    """The complete entries, sorted (temporary and half-removed directories are not entries)."""
    if not os.path.isdir(self.path):
      return []
    return sorted(n for n in os.listdir(self.path)
                  if not n.startswith(".") and os.path.isfile(os.path.join(self.path, n, MANIFEST)))

  def manifest(self, name: str) -> dict:
    path = os.path.join(self._entry(name), MANIFEST)
    if not os.path.isfile(path):
      raise LibraryError(f"library {self.path} has no expert named {name!r}; it has {self.names()}")
    try:
      with open(path) as f:
        manifest = json.load(f)
    except (OSError, ValueError) as e:
      raise LibraryError(f"corrupt manifest {path}: {e}") from e
    if manifest.get("format") != FORMAT:
      raise LibraryError(f"{path} is not a {FORMAT} manifest (format {manifest.get('format')!r})")
    return manifest

  def list(self) -> List[dict]:
    """The manifests of all entries, sorted by name."""
    return [self.manifest(n) for n in self.names()]

  def t5_config(self) -> T5Config:
    """The base model's architecture shared by every entry."""
    entries = self.names()
    if not entries:
      raise LibraryError(f"library {self.path} is empty")
    return fingerprint_config(self.manifest(entries[0])["base"])

  def _check_compatible(self, manifest: dict, replace: bool = False) -> None:
    """Refuse an expert whose base model, rank or targets differ from the library's experts."""
    name = manifest["name"]
    if name in self.names() and not replace:
      raise LibraryError(f"library {self.path} already has an expert named {name!r}; remove it first")
    entries = [n for n in self.names() if n != name]
    if not entries:
      return
    ref = self.manifest(entries[0])
    where = f"expert {name!r} does not fit library {self.path} (whose experts, e.g. {entries[0]!r},"
    if ref["base"]["config"] != manifest["base"]["config"]:
      diffs = [f"{k}: {manifest['base']['config'].get(k)!r} vs {v!r}" for k, v in ref["base"]["config"].items()
               if manifest["base"]["config"].get(k) != v]
      raise LibraryError(f"{where} use another base model): architecture differs in {'; '.join(diffs)}")
    if ref["base"]["params_sha256"] != manifest["base"]["params_sha256"]:
      raise LibraryError(f"{where} use another base model): base weights differ (sha256 "
                         f"{manifest['base']['params_sha256'][:12]}... vs {ref['base']['params_sha256'][:12]}...)")
    if ref["rank"] != manifest["rank"]:
      raise LibraryError(f"{where} have rank {ref['rank']}): its LoRA rank is {manifest['rank']}")
    if ref["targets"] != manifest["targets"]:
      raise LibraryError(f"{where} target {ref['targets']}): it targets {manifest['targets']}")

  def add(self, name: str, lora: Mapping, *, base: Mapping, gates: Optional[Mapping] = None,
          dataset: Optional[str] = None, dtype: str = "float32", training: Optional[dict] = None,
          replace: bool = False) -> dict:
    """Store one expert (a nested or flat `lora` collection, optional `gates`) and return its manifest.

    `replace=True` swaps an existing entry of that name for the new one (e.g. the expert with its trained
    gate); a crash mid-swap leaves the old entry readable, or a `.trash-` copy that `verify` reports.
    `base` is `base_fingerprint(config, params)` of the model it was trained on. Warns
    (`UntrainedGateWarning`) when every gate vector is zero.
    """
    if not _NAME.fullmatch(name or ""):
      raise LibraryError(f"expert name {name!r} must match {_NAME.pattern} (it names a directory)")
    if dtype not in DTYPES:
      raise LibraryError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    lora, gates = _flat_float32(lora), _flat_float32(gates or {})
    rank, targets = describe_expert(fingerprint_config(base), lora, gates)
    manifest = {"format": FORMAT, "version": VERSION, "name": name, "dataset": dataset,
                "base": {"config": dict(base["config"]), "params_sha256": base["params_sha256"]},
                "rank": rank, "targets": list(targets), "dtype": dtype, "gate": bool(gates),
                "num_modules": len(lora) // 2, "training": training or {}, "created": time.time()}
    self._check_compatible(manifest, replace)
    if gates_all_zero(gates):
      warnings.warn(f"expert {name!r}: every gate vector is zero (an untrained gate); PHATGOOSE routing "
                    f"will not prefer it for any token", UntrainedGateWarning, stacklevel=2)
    weights = {**{f"lora/{k}": v for k, v in lora.items()}, **{f"gates/{k}": v for k, v in gates.items()}}
    self._write_entry(name, weights, manifest, replace)
    return self.manifest(name)

  def _write_entry(self, name: str, weights: Dict[str, np.ndarray], manifest: dict, replace: bool = False) -> None:
    """Write weights then manifest into a temporary directory, then rename it into place (after moving an
    entry it replaces aside)."""
    os.makedirs(self.path, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{_TMP}{name}-", dir=self.path)
    try:
      _save_safetensors(os.path.join(tmp, WEIGHTS), weights, manifest["dtype"])
      manifest["weights"] = {"file": WEIGHTS, "sha256": file_sha256(os.path.join(tmp, WEIGHTS)),
                             "bytes": os.path.getsize(os.path.join(tmp, WEIGHTS))}
      _write_json(os.path.join(tmp, MANIFEST), manifest)
      trash = self._set_aside(name) if replace and name in self.names() else None
      os.rename(tmp, self._entry(name))
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    _fsync_dir(self.path)
    if trash:
      shutil.rmtree(trash)

  def _set_aside(self, name: str) -> str:
    """Move an entry out of the listing into a `.trash-` directory; returns that directory."""
    trash = tempfile.mkdtemp(prefix=f"{_TRASH}{name}-", dir=self.path)
    os.rename(self._entry(name), os.path.join(trash, name))
    _fsync_dir(self.path)
    return trash

  def remove(self, name: str) -> None:
    """Delete an entry: renamed out of the listing first, then deleted."""
    self.manifest(name)
    shutil.rmtree(self._set_aside(name))

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

  def _verify_entry(self, name: str) -> List[Problem]:
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
    if gates_all_zero(expert.gates):
      found.append(Problem(name, "warning", "every gate vector is zero (an untrained gate)"))
    for kind in self.derived_kinds(name):
      if self.load_derived(name, kind) is None:
        found.append(Problem(name, "warning", f"derived artifact {kind!r} is unreadable; it will be recomputed"))
    return found

  def verify(self) -> List[Problem]:
    """Check every entry (manifest, weights sha256 and shapes, gates) and report leftovers of interrupted writes."""
    problems = []
    if os.path.isdir(self.path):
      for n in sorted(os.listdir(self.path)):
        full = os.path.join(self.path, n)
        if n.startswith((_TMP, _TRASH)):
          problems.append(Problem(n, "warning", "left over by an interrupted write or removal; safe to delete"))
        elif not n.startswith(".") and os.path.isdir(full) and not os.path.isfile(os.path.join(full, MANIFEST)):
          problems.append(Problem(n, "error", f"directory without {MANIFEST}: not a library entry"))
    for name in self.names():
      problems += self._verify_entry(name)
    return problems

  def _derived_path(self, name: str, kind: str) -> str:
    return os.path.join(self._entry(name), DERIVED, f"{kind}.safetensors")

  def derived_kinds(self, name: str) -> List[str]:
    folder = os.path.join(self._entry(name), DERIVED)
    if not os.path.isdir(folder):
      return []
    return sorted(f[:-len(".safetensors")] for f in os.listdir(folder) if f.endswith(".safetensors"))

  def save_derived(self, name: str, kind: str, arrays: Mapping[str, np.ndarray], key: str) -> None:
    """Cache an artifact computed from expert `name` (float32), tagged with the `key` of its inputs."""
    self.manifest(name)
    path = self._derived_path(name, kind)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
      _save_safetensors(tmp, arrays, metadata={"key": key, "weights_sha256": self.manifest(name)["weights"]["sha256"]})
      os.replace(tmp, path)
    finally:
      with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)

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

  def route(self, names: Sequence[str], router: str = "phatgoose", **router_kwargs) -> "routers.Routing":
    """The experts `names` (in this order) combined by `router` (see `routers.ROUTERS`)."""
    missing = [n for n in names if n not in self.names()]
    if missing or not names:
      raise LibraryError(f"library {self.path} has no experts {missing or '(none asked)'}; it has {self.names()}")
    return routers.build(router, self, list(names), **router_kwargs)

  def assemble(self, names: Sequence[str], router: str = "phatgoose", **router_kwargs) -> tuple:
    """`(ExpertConfig, collection)`: the `experts` collection (`lora_a` [E, d_in, r], `lora_b` [E, r, d_out],
    `router` [E, d_in] per module) for routed routers, the `lora` collection for merged ones."""
    routing = self.route(names, router, **router_kwargs)
    return routing.expert_config, routing.collection


def expert_config(manifest: Mapping, **overrides) -> ExpertConfig:
  """The single-expert (`lora`) ExpertConfig of a stored expert."""
  return ExpertConfig(**{"mode": "lora", "rank": manifest["rank"], "targets": tuple(manifest["targets"]),
                         **overrides})
