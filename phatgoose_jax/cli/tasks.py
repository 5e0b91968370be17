"""`phatgoose tasks`: list the registered tasks and mixtures, inspect a task's examples (algorithm.md §6).

  phatgoose tasks list [--prefix P]
  phatgoose tasks inspect NAME [--bigbench_dir DIR] [--bbh_dir DIR] [--templates_dir DIR] [--data_dir DIR]
                          [--n N] [--json]

NAME is a registered task or mixture, or `bigbench/<task>[/<subtask>]` under --bigbench_dir. With --json,
stdout carries exactly one JSON object: {"task", "num_examples", "examples": [{inputs, choices, target}]}.
The inputs are the prompts the official PHATGOOSE code feeds the model (BIG-bench's own formatting followed by
"\nAnswer:"; the promptsource rendering of each (example, template) pair).
"""
import contextlib
import json
import os
import sys

from phatgoose_jax.cli import UsageError


def register(subparsers) -> None:
  parser = subparsers.add_parser("tasks", help="seqio task registries: list and inspect")
  commands = parser.add_subparsers(dest="tasks_command", required=True)
  listing = commands.add_parser("list", help="registered tasks and mixtures")
  listing.add_argument("--prefix", default="", help="only names starting with this")
  listing.set_defaults(func=run_list)
  inspect = commands.add_parser("inspect", help="number of examples and the first N rendered")
  inspect.add_argument("name", help="task or mixture name, or bigbench/<task>[/<subtask>]")
  inspect.add_argument("--bigbench_dir", help="BIG-bench task directory (default $PHATGOOSE_BIGBENCH_DIR)")
  inspect.add_argument("--bbh_dir", help="BIG-Bench Hard release directory (default $PHATGOOSE_BBH_DIR)")
  inspect.add_argument("--templates_dir", help="promptsource templates (default $PHATGOOSE_TEMPLATES_DIR)")
  inspect.add_argument("--data_dir", help="local JSONL datasets (default $PHATGOOSE_DATA_DIR)")
  inspect.add_argument("--n", type=int, default=3, help="examples to show")
  inspect.add_argument("--json", action="store_true", help="print one JSON object on stdout")
  inspect.set_defaults(func=run_inspect)


@contextlib.contextmanager
def _stdout_to_stderr():
  """Sends everything written to stdout (python or native, e.g. TF logs) to stderr for the block."""
  sys.stdout.flush()
  saved = os.dup(1)
  os.dup2(2, 1)
  try:
    with contextlib.redirect_stdout(sys.stderr):
      yield
  finally:
    sys.stdout.flush()
    os.dup2(saved, 1)
    os.close(saved)


def _tasks():
  from phatgoose_jax import tasks
  return tasks


def run_list(args) -> int:
  with _stdout_to_stderr():
    names = _tasks().registered_names(args.prefix)
  print("\n".join(names))
  return 0


def _load(args) -> dict:
  tasks = _tasks()
  try:
    return tasks.get_eval_examples(args.name, bigbench_dir=args.bigbench_dir, bbh_dir=args.bbh_dir,
                                   templates_dir=args.templates_dir, data_dir=args.data_dir)
  except KeyError as e:
    raise UsageError(e.args[0]) from e
  except (tasks.sources.MissingDataError, ValueError) as e:
    raise UsageError(str(e)) from e


def _report(name: str, examples: list, n: int) -> dict:
  shown = [{"inputs": e["inputs"], "choices": e["choices"], "target": e["target"]} for e in examples[:n]]
  return {"task": name, "num_examples": len(examples), "examples": shown}


def _print_text(report: dict) -> None:
  print(f"{report['task']}: {report['num_examples']} examples")
  for i, example in enumerate(report["examples"]):
    print(f"--- example {i}\n[input]\n{example['inputs']}")
    if example["choices"]:
      print("[choices]\n" + "\n".join(f"  {j}: {c}" for j, c in enumerate(example["choices"])))
    print(f"[target]\n{example['target']}")


def run_inspect(args) -> int:
  if args.n < 0:
    raise UsageError("--n must be >= 0")
  with _stdout_to_stderr():
    by_task = _load(args)
  examples = [e for task_examples in by_task.values() for e in task_examples]
  report = _report(args.name, examples, args.n)
  if args.json:
    print(json.dumps(report, ensure_ascii=False))
  else:
    _print_text(report)
  return 0
