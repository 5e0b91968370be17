"""`phatgoose score` and `phatgoose generate`: a base, assembled or routed T5 on JSONL inputs.

  phatgoose score    --base CKPT [--library DIR --router NAME --top_k K] --vocab V --input IN.jsonl [--output OUT]
  phatgoose generate --base CKPT [--library DIR --router NAME --top_k K] --vocab V --input IN.jsonl [--output OUT]

`--base` is a checkpoint of any format (phatgoose-jax, including an assembled routed model with its experts;
Hugging Face; t5x). The work is in `cli/scoring.py`, imported when a command runs.
"""
import importlib

from phatgoose_jax.cli import UsageError

MAX_LENGTH = 512  # `vocab.MAX_LENGTH`, named here so that --help needs no numerical import
PRECISIONS = ("float32", "bfloat16", "official")  # `utils.PRECISIONS`, likewise
PRECISION_HELP = ("precision (algorithm.md §2): float32, the default (the exact formulas, the tested reference); "
                  "official (bf16 rounded at each op as the official bf16 torch.autocast runs; bit-exact with "
                  "XLA_FLAGS=--xla_allow_excess_precision=false); bfloat16 (bf16 parameters and router math, "
                  "XLA's roundings elsewhere)")


def _run(name: str):
  """The `cli.scoring` function `name`, imported when the command runs (with --dry_run: `dry_run`)."""
  def run(args):
    from phatgoose_jax import main  # pylint: disable=import-outside-toplevel (a fast --help)
    main.check_topology_flag(args)
    if args.dry_run:
      return dry_run(args)
    if args.input is None:
      raise UsageError("the following arguments are required: --input")
    return getattr(importlib.import_module("phatgoose_jax.cli.scoring"), name)(args)
  return run


def dry_run(args) -> int:
  """The command's programs (`score_batch`; for generate the encoder pass and one decoding step) compiled
  for --topology or the local devices from shapes only: the architecture is read from the checkpoint's
  metadata, the expert count from the library; no weights are read."""
  from phatgoose_jax import checkpoints, library, main, stage_programs  # pylint: disable=import-outside-toplevel
  from phatgoose_jax import utils  # pylint: disable=import-outside-toplevel
  config = checkpoints.architecture(args.base).replace(**utils.precision_fields(args.dtype or "float32"),
                                                       dropout_rate=0.0)
  num_experts = len(library.ExpertLibrary(args.library).names()) if args.library else 0
  lengths = {"inputs": MAX_LENGTH, "targets": getattr(args, "max_decode_length", MAX_LENGTH)}
  generate = args.command == "generate"

  def build(mesh, rules):
    return stage_programs.eval_programs(config, mesh, rules, num_experts, args.top_k, generate=generate,
                                        batch_size=args.batch_size, lengths=lengths)[generate:]
  main.compile_and_report(config, num_experts, args.top_k, args.topology, build)
  return 0


def add_model_flags(parser) -> None:
  parser.add_argument("--base", required=True,
                      help="model checkpoint: phatgoose-jax (base or assembled routed), Hugging Face or t5x")
  parser.add_argument("--dtype", choices=PRECISIONS, help=PRECISION_HELP)
  parser.add_argument("--vocab", default="byte", help="'byte' or the path of a SentencePiece .model")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--library", help="expert library directory: route over its experts")
  parser.add_argument("--router", default="phatgoose", help="router name (see docs/algorithm.md §4-§5)")
  parser.add_argument("--top_k", type=int, default=2, help="experts per token (1..E)")
  parser.add_argument("--dry_run", action="store_true", help="compile this command's programs from shapes and "
                      "print their per-chip memory and cost (no weights read), then stop")
  parser.add_argument("--topology", help="with --dry_run: compile for this TPU slice (v5e:4x4, v4:2x2x4, ...; "
                      "needs libtpu) instead of the local devices")


def _add_io_flags(parser, inputs_help: str) -> None:
  parser.add_argument("--input", help=inputs_help + " (required unless --dry_run)")
  parser.add_argument("--output", help="JSONL results (default: standard output)")
  parser.add_argument("--error_on_truncation", action="store_true",
                      help=f"refuse texts over {MAX_LENGTH} tokens instead of truncating them")


def register(subparsers):
  score = subparsers.add_parser("score", help="per-example target log-likelihoods of a JSONL file")
  add_model_flags(score)
  _add_io_flags(score, "JSONL: {inputs, targets} or {input_ids, target_ids}")
  score.set_defaults(func=_run("run_score"))
  generate = subparsers.add_parser("generate", help="greedy decoding of a JSONL file of inputs")
  add_model_flags(generate)
  _add_io_flags(generate, "JSONL: {inputs} or {input_ids}")
  generate.add_argument("--max_decode_length", type=int, default=64)
  generate.set_defaults(func=_run("run_generate"))
