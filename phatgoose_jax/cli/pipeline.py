"""Pipeline subcommands: thin wrappers over the gin entry point (`python -m phatgoose_jax.main`).

  phatgoose train-expert    --base B --task T --library L --workdir W [--name N]
  phatgoose train-gate      --base B --library L --name N --workdir W [--task T]
  phatgoose train-multitask --task T --output O --workdir W [--base B] [--finetune lora|full]
  phatgoose assemble        --base B --library L --output O [--router R]
  phatgoose evaluate        --base B --task T --output_dir D [--library L --router R] [--expert_pool P]
  phatgoose route-stats     --base B --library L --task T --output_dir D [--router R]
  phatgoose demo            [--workdir DIR] [--seed N] [--smoke]

Each runs its run file `gin/runs/<stage>.gin` (plus `--model SIZE`'s `gin/models/t5_1_1_<SIZE>.gin` and any
`--gin_file F`); flags set that file's macros, and `--gin KEY=VALUE` (repeatable) adds any other binding.
Bindings are all parsed before work starts; a bad one is reported by name (exit code 2).
"""
import json
import os
import tempfile
import time

# subcommand -> (run file, help, [(flag, macro, required, help)])
_STAGES = {
    "train-expert": ("runs/train_expert.gin", "train one LoRA expert and add it to a library (algorithm.md §2)", [
        ("--base", "BASE", True, "base model: native checkpoint, Hugging Face or t5x directory"),
        ("--task", "TASK", True, "training task or mixture"),
        ("--library", "LIBRARY", True, "expert library directory"),
        ("--workdir", "WORKDIR", True, "checkpoints (resumed when present) and TensorBoard logs"),
        ("--name", "NAME", False, "expert name (default: the task)")]),
    "train-gate": ("runs/train_gate.gin", "train a library expert's gate (algorithm.md §3)", [
        ("--base", "BASE", True, "base model the expert was trained on"),
        ("--library", "LIBRARY", True, "expert library directory"),
        ("--name", "NAME", True, "the expert's name in the library"),
        ("--workdir", "WORKDIR", True, "checkpoints and TensorBoard logs"),
        ("--task", "TASK", False, "training task (default: the expert's dataset)")]),
    "train-multitask": ("runs/train_multitask.gin", "one model on the union of a mixture (algorithm.md §5)", [
        ("--task", "TASK", True, "training task or mixture"),
        ("--output", "OUTPUT", True, "library ('lora') or checkpoint directory ('full')"),
        ("--workdir", "WORKDIR", True, "checkpoints and TensorBoard logs"),
        ("--base", "BASE", False, "base model (required for 'lora'; 'full' without it trains from scratch)"),
        ("--finetune", "FINETUNE", False, "'lora' (default) or 'full'")]),
    "assemble": ("runs/assemble.gin", "library experts + router -> routed checkpoint", [
        ("--base", "BASE", True, "base model"), ("--library", "LIBRARY", True, "expert library directory"),
        ("--output", "OUTPUT", True, "checkpoint directory to write"),
        ("--router", "ROUTER", False, "router name (default phatgoose)")]),
    "evaluate": ("runs/eval_routed.gin", "score a task or mixture; results.json + results.md", [
        ("--base", "BASE", True, "base model"), ("--task", "TASK", True, "task or mixture name"),
        ("--output_dir", "OUTPUT_DIR", True, "where results go"),
        ("--library", "LIBRARY", False, "expert library (without it: the base model alone)"),
        ("--router", "ROUTER", False, "router name (default phatgoose)"),
        ("--expert_pool", "EXPERT_POOL", False, "'p3' or 'flan': the pool the library's experts come from")]),
    "route-stats": ("runs/route_stats.gin", "per dataset and layer, the experts a router chooses (JSON + PNG)", [
        ("--base", "BASE", True, "base model"), ("--library", "LIBRARY", True, "expert library directory"),
        ("--task", "TASK", True, "task or mixture name"), ("--output_dir", "OUTPUT_DIR", True, "where results go"),
        ("--router", "ROUTER", False, "per-token router (default phatgoose)")]),
}


def _add_gin_flags(parser) -> None:
  parser.add_argument("--gin_file", action="append", default=[], help="extra gin file (repeatable)")
  parser.add_argument("--gin", action="append", default=[], metavar="KEY=VALUE", help="gin binding (repeatable)")


def register(subparsers) -> None:
  for command, (run_file, help_text, flags) in _STAGES.items():
    parser = subparsers.add_parser(command, help=help_text)
    for flag, macro, required, flag_help in flags:
      parser.add_argument(flag, required=required, help=flag_help)
    parser.add_argument("--model", help="T5 size whose gin/models file to include (tiny, small, ... xxl)")
    parser.add_argument("--vocab", help="'byte' or a SentencePiece .model path")
    _add_gin_flags(parser)
    parser.set_defaults(func=run_stage, run_file=run_file, macros=[(f, m) for f, m, _, _ in flags])
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
  if args.vocab:
    bindings.append(f"VOCABULARY = {args.vocab!r}")
  return bindings + list(args.gin)


def run_stage(args) -> int:
  from phatgoose_jax import main  # pylint: disable=import-outside-toplevel
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
