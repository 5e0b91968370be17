"""Stage subcommands, one per run file `gin/runs/<stage>.gin`, plus `phatgoose demo`.

  phatgoose train-expert | train-gate | train-multitask | assemble | evaluate | route-stats  [flags]
  phatgoose demo [--suite tokens|keyword] [--workdir DIR] [--seed N] [--smoke]

A stage's flags are its run file's macros, read from the file: `--base` sets `BASE`, and a macro bound to
`%gin.REQUIRED` is a required flag; the help is the comment after the macro (or its default). `--model SIZE`
adds `gin/models/t5_1_1_<SIZE>.gin`, `--gin_file F` and `--gin KEY=VALUE` (repeatable) add any other file or
binding, and the multi-host flags (`--coordinator_address`, `--process_count`, `--process_index`) pass through
to the gin entry point `python -m phatgoose_jax.main`. Bindings are all parsed before work starts; a bad
one is reported by name (exit code 2).
"""
import json
import os
import re
import tempfile
import time
from pathlib import Path

import phatgoose_jax

GIN_DIR = phatgoose_jax.GIN_DIR
SHARED_RUN_FILES = ("common.gin", "demo.gin")
_MACRO = re.compile(r"^([A-Z][A-Z0-9_]*) = (.+?)\s*(?:#\s*(.*))?$")


def stage_files() -> dict:
  """{subcommand: run file}: every run file but the shared ones, `train_expert.gin` -> `train-expert`."""
  runs = sorted(p for p in (GIN_DIR / "runs").glob("*.gin") if p.name not in SHARED_RUN_FILES)
  return {p.stem.replace("_", "-"): p for p in runs}


def run_file_flags(path: Path) -> tuple:
  """(help, [(flag, macro, required, help)]) of a run file: its first comment line, and its macros."""
  lines = path.read_text().splitlines()
  help_text = lines[0].lstrip("# ").rstrip(".") if lines and lines[0].startswith("#") else path.stem
  flags = []
  for line in lines:
    match = _MACRO.match(line)
    if match:
      macro, value, comment = match.groups()
      required = value == "%gin.REQUIRED"
      flags.append((f"--{macro.lower()}", macro, required, comment or ("required" if required else
                                                                       f"default {value}")))
  return help_text, flags


def _add_gin_flags(parser) -> None:
  parser.add_argument("--gin_file", action="append", default=[], help="extra gin file (repeatable)")
  parser.add_argument("--gin", action="append", default=[], metavar="KEY=VALUE", help="gin binding (repeatable)")


def register(subparsers) -> None:
  for command, run_file in stage_files().items():
    help_text, flags = run_file_flags(run_file)
    parser = subparsers.add_parser(command, help=help_text, description=help_text)
    for flag, _, required, flag_help in flags:
      parser.add_argument(flag, required=required, help=flag_help)
    parser.add_argument("--model", help="T5 size whose gin/models file to include (tiny, small, ... xxl)")
    parser.add_argument("--dry_run", action="store_true", help="print the mesh, rules, per-device parameter "
                        "bytes and this stage's compiled programs' per-chip memory and cost (needs --model), "
                        "then stop; exit 2 when a program does not fit a chip")
    parser.add_argument("--topology", help="with --dry_run: compile for this TPU slice (v5e:4x4, v4:2x2x4, "
                        "v5p:2x2x4; needs libtpu: pip install 'phatgoose-jax[tpu]') instead of the local devices")
    _add_gin_flags(parser)
    parser.set_defaults(func=run_stage, run_file=str(run_file), macros=[(f, m) for f, m, _, _ in flags],
                        passthrough=True)
  demo = subparsers.add_parser("demo", help="the whole pipeline on a built-in synthetic suite (offline, CPU)")
  demo.add_argument("--suite", choices=("tokens", "keyword"), default="tokens",
                    help="'tokens': held-in tasks over disjoint alphabets (default); 'keyword': string skills on the "
                         "same words, told apart by a keyword only")
  demo.add_argument("--workdir", help="output directory (default: a fresh folder under the temp dir)")
  demo.add_argument("--seed", type=int, default=0, help="data, initialisation and order seed")
  demo.add_argument("--smoke", action="store_true", help="tiny step counts: checks the code path only")
  _add_gin_flags(demo)
  demo.set_defaults(func=run_demo)


def _gin_files(args) -> list:
  files = [f"models/t5_1_1_{args.model}.gin"] if args.model else []
  return files + [args.run_file] + list(args.gin_file)


def _bindings(args) -> list:
  bindings = []
  for flag, macro in args.macros:
    value = getattr(args, flag.lstrip("-"))
    if value is not None:
      bindings.append(f"{macro} = {value!r}")
  return bindings + list(args.gin)


def run_stage(args) -> int:
  from phatgoose_jax import distributed, main  # pylint: disable=import-outside-toplevel (a fast --help)
  distributed.initialize_from_args(main.multihost_flags(args.extra))
  main.check_topology_flag(args)
  if args.dry_run:
    main.parse(_gin_files(args), _bindings(args), require=False)
    main.dry_run(topology=args.topology)
    return 0
  result = main.run_configured(_gin_files(args), _bindings(args))
  if isinstance(result, dict) and "score" in result:
    print(json.dumps({"name": result["name"], "score": result["score"],
                      "tasks": {t: r["score"] for t, r in result["tasks"].items()}}, indent=2))
  elif result is not None:
    print(result if isinstance(result, str) else json.dumps(result, indent=2, default=str)[:4000])
  return 0


def run_demo(args) -> int:
  from phatgoose_jax import main  # pylint: disable=import-outside-toplevel
  from phatgoose_jax.demo import run  # pylint: disable=import-outside-toplevel
  started = time.time()
  workdir = args.workdir or tempfile.mkdtemp(prefix="phatgoose_demo_")
  main.parse(["demo_smoke.gin" if args.smoke else "demo.gin"] + list(args.gin_file), list(args.gin))
  summary = run.run_demo(workdir=os.path.abspath(workdir), seed=args.seed, suite_name=args.suite, clock=started)
  with open(os.path.join(workdir, "results.md")) as f:
    print(f.read())
  print(f"{summary['seconds']:.0f} s; results in {os.path.join(workdir, 'results.json')}, figures "
        f"{', '.join(os.path.join(workdir, f) for f in ('routing.png', 'routing_heldout.png', 'scores.png'))}")
  return 0
