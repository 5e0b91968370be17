"""`phatgoose library`: build and inspect an expert library (see phatgoose_jax/library.py).

  phatgoose library list --library DIR [--json]
  phatgoose library add CHECKPOINT --library DIR --name NAME --base BASE [--dataset D]
  phatgoose library remove NAME --library DIR
  phatgoose library verify --library DIR [--json] [--repair]
  phatgoose library import-peft ADAPTER_DIR --base BASE --library DIR --name NAME [--dataset D]
  phatgoose library export-peft --library DIR --name NAME --out DIR
  phatgoose library import-reference FILE --base BASE --library DIR [--names n0,n1,...]

CHECKPOINT is a native checkpoint directory (checkpoints/native.py) whose state holds a `lora` collection
(and optionally `gates`), or a safetensors file of flat `lora/<module>/lora_a|lora_b` and
`gates/<module>/gate` keys. `--base` names the base model, a checkpoint of any format (`checkpoints.load`:
phatgoose-jax, Hugging Face or t5x), whose fingerprint every expert of a library must share. `list` shows
an entry whose manifest cannot be read as corrupt (`remove` deletes it). `verify` exits 1 when an entry is
corrupt, does not fit the library or holds NaN / Inf; `--repair` first finishes or undoes interrupted
writes. A library's refusals are one-line errors (exit code 2). A routed model is written as one checkpoint
by `phatgoose assemble`.
"""
import functools
import json
import os
import sys
import warnings

from phatgoose_jax.cli import UsageError

P3_POOL_SIZE = 36


def _add_base(parser) -> None:
  parser.add_argument("--base", required=True, help="the base model: a phatgoose-jax, Hugging Face or t5x checkpoint")


def register(subparsers) -> None:
  parser = subparsers.add_parser("library", help="the expert library: list, add, remove, verify, import, export")
  commands = parser.add_subparsers(dest="library_command", required=True)

  def command(name, func, help_text):
    sub = commands.add_parser(name, help=help_text)
    sub.add_argument("--library", required=True, help="the library directory")
    sub.set_defaults(func=_library_errors(func))
    return sub

  listing = command("list", run_list, "one line per expert")
  listing.add_argument("--json", action="store_true", help="print the manifests as one JSON list")
  add = command("add", run_add, "add one expert checkpoint")
  add.add_argument("expert", help="native checkpoint directory or safetensors file of lora/... gates/... keys")
  add.add_argument("--name", required=True)
  add.add_argument("--dataset", help="the dataset the expert was trained on")
  add.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="stored dtype")
  add.add_argument("--training", help="training metadata as a JSON object")
  _add_base(add)
  remove = command("remove", run_remove, "remove one expert")
  remove.add_argument("name")
  verify = command("verify", run_verify, "check every entry; exit 1 when one is corrupt")
  verify.add_argument("--json", action="store_true")
  verify.add_argument("--repair", action="store_true", help="first finish or undo interrupted writes")
  peft_in = command("import-peft", run_import_peft, "add a Hugging Face PEFT LoRA adapter as one expert")
  peft_in.add_argument("adapter", help="the adapter directory (adapter_config.json + weights)")
  peft_in.add_argument("--name", required=True)
  peft_in.add_argument("--dataset")
  _add_base(peft_in)
  peft_out = command("export-peft", run_export_peft, "write one expert as a PEFT LoRA adapter")
  peft_out.add_argument("--name", required=True)
  peft_out.add_argument("--out", required=True)
  reference = command("import-reference", run_import_reference,
                      "add every expert of a reference-layout checkpoint, router vectors as gates")
  reference.add_argument("file", help="safetensors or PyTorch state-dict file")
  reference.add_argument("--names", help="comma-separated expert names in file order (default: the P3 pool "
                                         "for 36 experts, else expert_<i>)")
  reference.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="stored dtype")
  _add_base(reference)


def _library_errors(func):
  """`func` with the library's refusals (`LibraryError`) turned into usage errors."""
  @functools.wraps(func)
  def run(*args, **kwargs):
    from phatgoose_jax import library  # pylint: disable=import-outside-toplevel
    try:
      return func(*args, **kwargs)
    except library.LibraryError as e:
      raise UsageError(str(e)) from e
  return run


def _library(args, must_exist=True):
  from phatgoose_jax import library  # pylint: disable=import-outside-toplevel
  if must_exist and not os.path.isdir(args.library):
    raise UsageError(f"no library directory {args.library}")
  return library.ExpertLibrary(args.library)


def _load_base(args):
  """(T5Config, params) of the --base checkpoint, whatever its format."""
  from phatgoose_jax import checkpoints  # pylint: disable=import-outside-toplevel
  try:
    loaded = checkpoints.load(args.base)
  except (OSError, ValueError) as e:
    raise UsageError(f"cannot load the base model: {e}") from e
  if loaded.experts.mode != "none":
    raise UsageError(f"{args.base} carries experts ({loaded.experts.mode}); give the base model they were trained on")
  return loaded.config, loaded.variables["params"]


def _fingerprint(args):
  from phatgoose_jax import library  # pylint: disable=import-outside-toplevel
  config, params = _load_base(args)
  return config, library.base_fingerprint(config, params)


def _add(lib, name, lora, fingerprint, **kwargs) -> None:
  """Add one expert, turning warnings into stderr lines."""
  from phatgoose_jax import library  # pylint: disable=import-outside-toplevel
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", library.UntrainedGateWarning)
    lib.add(name, lora, base=fingerprint, **kwargs)
  for w in caught:
    print(f"warning: {w.message}", file=sys.stderr)
  print(f"added {name} to {lib.path}")


def _read_expert(path: str, config):
  """(lora, gates, expert metadata) of a native checkpoint directory or a flat safetensors file."""
  from phatgoose_jax.checkpoints import names, native  # pylint: disable=import-outside-toplevel
  if os.path.isfile(path):
    from safetensors import SafetensorError  # pylint: disable=import-outside-toplevel
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    try:
      flat = load_file(path)
    except SafetensorError as e:
      raise UsageError(f"{path} is not a readable safetensors file ({e}); pass a native checkpoint directory or a "
                       f"safetensors file of lora/<module>/... and gates/<module>/gate keys") from e
    tree = names.unflatten(flat)
    if "lora" not in tree or set(tree) - {"lora", "gates"}:
      raise UsageError(f"{path} must hold only lora/<module>/... and gates/<module>/gate keys, found "
                       f"{sorted(tree)}")
    return tree["lora"], tree.get("gates"), {}
  try:
    loaded = native.load_native(path, expect=config)
  except (OSError, ValueError) as e:
    raise UsageError(str(e)) from e
  if "lora" not in loaded.state:
    raise UsageError(f"native checkpoint {path} holds {sorted(loaded.state)}, no `lora` collection")
  experts = loaded.expert_config
  meta = {} if experts is None else {"expert_config": {"mode": experts.mode, "rank": experts.rank,
                                                       "targets": list(experts.targets)}}
  return loaded.state["lora"], loaded.state.get("gates"), meta


def run_add(args) -> int:
  try:
    training = json.loads(args.training) if args.training else {}
  except ValueError as e:
    raise UsageError(f"--training must be a JSON object: {e}") from e
  config, fingerprint = _fingerprint(args)
  lora, gates, meta = _read_expert(args.expert, config)
  _add(_library(args, must_exist=False), args.name, lora, fingerprint, gates=gates, dataset=args.dataset,
       dtype=args.dtype, training={"source": os.path.abspath(args.expert), **meta, **training})
  return 0


def _row(manifest: dict, derived) -> list:
  return [manifest["name"], manifest.get("dataset") or "-", str(manifest["rank"]), ",".join(manifest["targets"]),
          "yes" if manifest["gate"] else "no", manifest["dtype"], str(manifest["num_modules"]),
          ",".join(derived) or "-"]


def run_list(args) -> int:
  """The entries, those whose manifest cannot be read marked corrupt (with why)."""
  lib = _library(args)
  manifests, corrupt = lib.list(), lib.unreadable()
  if args.json:
    listed = [dict(m, derived=lib.derived_kinds(m["name"])) for m in manifests]
    print(json.dumps(listed + [{"name": n, "corrupt": why} for n, why in corrupt.items()], indent=2))
    return 0
  rows = [["name", "dataset", "rank", "targets", "gate", "dtype", "modules", "derived"]]
  rows += [_row(m, lib.derived_kinds(m["name"])) for m in manifests]
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  for r in rows:
    print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
  for name, why in corrupt.items():
    print(f"{name.ljust(widths[0])}  CORRUPT: {why}")
  return 0


def run_remove(args) -> int:
  _library(args).remove(args.name)
  print(f"removed {args.name}")
  return 0


def run_verify(args) -> int:
  lib = _library(args)
  problems = lib.verify(repair=args.repair)
  if args.json:
    print(json.dumps({"entries": lib.names(), "problems": [p._asdict() for p in problems]}, indent=2))
  else:
    for p in problems:
      print(f"{p.level}: {p.entry}: {p.message}")
    print(f"{len(lib.names())} entries, {sum(p.level == 'error' for p in problems)} errors, "
          f"{sum(p.level == 'warning' for p in problems)} warnings")
  return 1 if any(p.level == "error" for p in problems) else 0


def run_import_peft(args) -> int:
  from phatgoose_jax.checkpoints import peft  # pylint: disable=import-outside-toplevel
  config, fingerprint = _fingerprint(args)
  try:
    adapter = peft.load_peft(args.adapter, config)
  except (OSError, ValueError) as e:
    raise UsageError(str(e)) from e
  _add(_library(args, must_exist=False), args.name, adapter.lora, fingerprint, dataset=args.dataset,
       training={"source": os.path.abspath(args.adapter), "format": "peft"})
  return 0


def run_export_peft(args) -> int:
  from phatgoose_jax import library  # pylint: disable=import-outside-toplevel
  from phatgoose_jax.checkpoints import peft  # pylint: disable=import-outside-toplevel
  expert = _library(args).load(args.name)
  peft.save_peft(args.out, expert.lora, library.fingerprint_config(expert.manifest["base"]))
  print(f"wrote {args.out}")
  return 0


def _reference_names(args, count: int) -> list:
  if args.names:
    chosen = [n.strip() for n in args.names.split(",")]
    if len(chosen) != count:
      raise UsageError(f"--names gives {len(chosen)} names but {args.file} holds {count} experts")
    return chosen
  if count == P3_POOL_SIZE:
    from phatgoose_jax.tasks import sources  # pylint: disable=import-outside-toplevel
    return [s.key.replace("/", "_") for s in sources.P3_HELD_IN]
  return [f"expert_{i}" for i in range(count)]


def run_import_reference(args) -> int:
  from phatgoose_jax.checkpoints import reference  # pylint: disable=import-outside-toplevel
  config, fingerprint = _fingerprint(args)
  try:
    experts = reference.load_reference(args.file, config)
  except (OSError, ValueError, ImportError) as e:
    raise UsageError(str(e)) from e
  chosen = _reference_names(args, len(experts.loras))
  lib = _library(args, must_exist=False)
  for i, name in enumerate(chosen):
    _add(lib, name, experts.loras[i], fingerprint, gates=experts.gates[i] or None, dtype=args.dtype,
         training={"source": os.path.abspath(args.file), "format": "reference", "index": i})
  return 0


