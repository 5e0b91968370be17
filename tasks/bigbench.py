"""BIG-bench JSON tasks as zero-shot evaluation examples (algorithm.md §6).

Reads the official layout `<dir>/<task>/task.json`, or `<dir>/<task>/<subtask>/task.json` for tasks with
subtasks (a task with subtasks is the union of all of them, in sorted subtask order). Each example
becomes `task_prefix + input + "\\nAnswer:"`; multiple-choice examples (`target_scores`) are scored by rank
classification over their choices (the correct choices are those with the top score), generative examples
(`target`, a string or a list of references) by exact match, multiple-answer exact match when an example
has several references, or ROUGE-L when the task's preferred score is a ROUGE.
"""
import json
import pathlib

from phatgoose_jax.tasks import seqio_tasks, sources

ANSWER_SUFFIX = "\nAnswer:"


def task_files(task: str, bigbench_dir=None) -> list:
  """The task.json files that make up `task` ("name" or "name/subtask") under the BIG-bench directory."""
  root = pathlib.Path(bigbench_dir or sources.get_dir("bigbench_dir"), task)
  subtasks = sorted(p for p in root.glob("*/task.json")) if root.is_dir() else []
  if subtasks:
    return subtasks
  if not (root / "task.json").is_file():
    raise sources.missing(f"BIG-bench task {task}", str(root / "task.json"), sources.DIR_KINDS["bigbench_dir"][2])
  return [root / "task.json"]


def _generative_metric(task_data: dict, references: list) -> str:
  if str(task_data.get("preferred_score", "")).startswith("rouge"):
    return "rouge_l"
  return "multi_answer_exact_match" if len(references) > 1 else "exact_match"


def _example(raw: dict, task_data: dict) -> dict:
  inputs = str(task_data.get("task_prefix", "")) + raw["input"] + ANSWER_SUFFIX
  if "target_scores" in raw:
    choices = list(raw["target_scores"])
    best = max(raw["target_scores"].values())
    correct = [raw["target_scores"][c] == best for c in choices]
    target = choices[correct.index(True)]
    return dict(inputs=inputs, choices=choices, correct=correct, target=target, references=[target],
                metric="accuracy")
  references = raw["target"] if isinstance(raw["target"], list) else [raw["target"]]
  return dict(inputs=inputs, choices=[], correct=[], target=references[0], references=list(references),
              metric=_generative_metric(task_data, references))


def read_examples(task: str, bigbench_dir=None) -> list:
  """All zero-shot examples of `task` (see module docstring), as dicts of inputs, choices, correct,
  target, references and metric."""
  examples = []
  for path in task_files(task, bigbench_dir):
    with open(path, encoding="utf-8") as f:
      task_data = json.load(f)
    examples.extend(_example(raw, task_data) for raw in task_data.get("examples", []))
  return examples


def seqio_name(task: str) -> str:
  """The seqio name of an unregistered BIG-bench task path: "bigbench:<task>[.<subtask>]"."""
  return "bigbench:" + task.replace("/", ".")


def make_task(task: str):
  """An unregistered seqio task over BIG-bench `task` ("name" or "name/subtask")."""
  source = seqio_tasks.text_source(lambda split: read_examples(task), seqio_tasks.EVAL_SIGNATURE,
                                   splits=("validation",))
  return seqio_tasks.make_task(seqio_name(task), source, evaluation=True)


def register() -> None:
  """Registers `bbl_<task>` (BIG-bench Lite), `bbh_<task>` (BIG-bench Hard) and their mixtures."""
  benchmarks = {"bbl": {name: name for name in sources.BIGBENCH_LITE}, "bbh": sources.BIGBENCH_HARD}
  for prefix, tasks in benchmarks.items():
    for name, directory in tasks.items():
      source = seqio_tasks.text_source(lambda split, d=directory: read_examples(d), seqio_tasks.EVAL_SIGNATURE,
                                       splits=("validation",))
      seqio_tasks.add_task(f"{prefix}_{name}", source, evaluation=True)
  seqio_tasks.add_mixture("bigbench_lite", [f"bbl_{name}" for name in sources.BIGBENCH_LITE])
  seqio_tasks.add_mixture("bigbench_hard", [f"bbh_{name}" for name in sources.BIGBENCH_HARD])
