"""BIG-bench zero-shot evaluation examples exactly as the official PHATGOOSE code builds them (algorithm.md §6).

Official code: `src/data/bigbench.py` of r-three/phatgoose (commit 4fd5790) over the Hugging Face BIG-bench
export (`tasksource/bigbench`), whose `inputs` are BIG-bench's own zero-shot formatting (BIG-bench 1.0.0):

- Each task.json is read as BIG-bench's `JsonTask` reads it: duplicate examples dropped (`api/json_task.py`
  lines 459-490); input prefix `example_input_prefix` (default "\\nQ: "), output prefix `example_output_prefix`
  (default "\\nA: "), choice prefix `choice_prefix` (default "\\n  choice: ") and `append_choices_to_input`
  (default true, Python truthiness) from the task's own task.json (lines 443-446); the task prefix
  `task_prefix` (line 550).
- `default_format_fn` (lines 88-142): for a multiple-choice example whose `append_choices_to_input` holds, the
  input gets `choice_prefix + choice_prefix.join(choices)` with the choices SORTED (unstripped) then permuted by
  a fresh `np.random.RandomState(42)` built in every call (line 116, 121), not one generator per task: every
  example with n choices gets `RandomState(42).permutation(n)`, wherever it stands (JsonTask formats each
  distinct example so, lines 513-523, before bbseqio shuffles them into splits; BIG-bench 0.0.1 does the same);
  the formatted input is `input_prefix + input + output_prefix`;
  without a `target`, the target is the first choice of maximal score (lines 125-135).
- The export (`bbseqio/bigbench_bridge.py` lines 227-249 and the Hugging Face `bigbench.py` script): `inputs =
  (task_prefix + formatted input).strip()`, `targets` = the example's targets (each stripped),
  `multiple_choice_targets` = the `target_scores` keys in file order (stripped), `multiple_choice_scores` their
  scores; examples are shuffled with `random.seed(42)` and cut into train / validation (at least 16 validation
  examples, 16 // n per subtask; `bigbench_bridge.py` lines 152-187, 302-311); the official split
  "train_validation" (`src/data/dataset.py` lines 117-123) is the train parts of every subtask, then the
  validation parts.
- The official example (`src/data/bigbench.py` lines 28-95): prompt `inputs + "\\nAnswer:"`; target the longest
  of `targets`; answer choices `multiple_choice_targets`; label `find_label(target, choices)`; references
  `targets[0]` (exact match, ROUGE) or all `targets` (multiple-answer exact match); `accuracy_multiple_ans`
  counts every choice of score 1 as correct.

Tasks with no task.json upstream (`bbh_choices` in `sources.BIGBENCH_HARD`) are read from the BIG-Bench Hard
release, `<bbh_dir>/<task>.json` with `examples: [{input, target}]`, as the official `BigBenchSampleDataset`
(`src/data/bigbench.py` lines 98-149): prompt `input + "\\nAnswer:"`, scored by rank classification over the
fixed answer set of `colm/datasets/bigbench.gin` (True/False, Yes/No), or generated when it has none.
"""
import functools
import json
import pathlib
import random

import numpy as np

from phatgoose_jax.tasks import seqio_tasks, sources

ANSWER_SUFFIX = "\nAnswer:"
DEFAULT_PREFIXES = {"example_input_prefix": "\nQ: ", "example_output_prefix": "\nA: ",
                    "choice_prefix": "\n  choice: "}
FORMAT_SEED = 42  # json_task.JsonTask(random_seed=42) -> default_format_fn's RandomState
SPLIT_SHUFFLE_SEED = 42  # bigbench_bridge.SPLIT_SHUFFLE_SEED
MIN_VALIDATION_EXAMPLES = 16  # Hugging Face bigbench.py: MIN_VALIDATION_EXAMPLES for the train / validation splits
_END = "</s>"  # stands for the EOS id that ends every tokenized sequence in the official label matching
# Official metric names -> this project's metric names (evaluation/metrics.py).
_METRICS = {"accuracy": "accuracy", "accuracy_multiple_ans": "accuracy", "exact_match": "exact_match",
            "exact_match_multiple_ans": "multi_answer_exact_match", "rouge": "rouge_l"}


def task_files(task: str, bigbench_dir=None) -> list:
  """The task.json files that make up `task` ("name" or "name/subtask"), subtasks in sorted order (as
  `JsonTask` sorts them, json_task.py line 345)."""
  root = pathlib.Path(bigbench_dir or sources.get_dir("bigbench_dir"), task)
  subtasks = sorted(p for p in root.glob("*/task.json")) if root.is_dir() else []
  if subtasks:
    return subtasks
  if not (root / "task.json").is_file():
    raise sources.missing(f"BIG-bench task {task}", str(root / "task.json"), sources.DIR_KINDS["bigbench_dir"][2])
  return [root / "task.json"]


@functools.lru_cache(maxsize=None)
def _permutation(n: int) -> tuple:
  return tuple(np.random.RandomState(FORMAT_SEED).permutation(n))


def permuted_choices(choices) -> list:
  """The order in which BIG-bench appends choices to the input: sorted, then permuted by a fresh
  RandomState(42) (json_task.py lines 116, 121: `rng.permutation(sorted(choices))`; a permutation of a
  list moves its items as the permutation of its indices)."""
  ordered = sorted(choices)
  return [ordered[i] for i in _permutation(len(ordered))]


def format_input(example: dict, task_data: dict) -> str:
  """The Hugging Face export's `inputs` of one task.json example: (task_prefix + input_prefix + input
  [+ choice_prefix + choice_prefix.join(permuted choices)] + output_prefix).strip()."""
  prefixes = {key: task_data.get(key, default) for key, default in DEFAULT_PREFIXES.items()}
  text = example["input"]
  if "target_scores" in example and task_data.get("append_choices_to_input", True):
    choice_prefix = prefixes["choice_prefix"]
    text += choice_prefix + choice_prefix.join(permuted_choices(example["target_scores"]))
  formatted = prefixes["example_input_prefix"] + text + prefixes["example_output_prefix"]
  return (str(task_data.get("task_prefix", "")) + formatted).strip()


def export_targets(example: dict) -> list:
  """The export's `targets`: the example's `target` (a string or a list), else the first choice of maximal
  score (json_task.py lines 125-142), each stripped."""
  if "target" in example:
    target = example["target"]
  else:
    best = max(example["target_scores"].values())
    target = next(k for k, v in example["target_scores"].items() if v == best)
  return [t.strip() for t in (target if isinstance(target, list) else [target])]


def find_label(target, choices) -> int:
  """The official label (src/data/bigbench.py lines 11-23, = src/data/p3.py lines 12-24): the index of the
  choice maximising (number of equal positions between `target[:len(choice)]` and `choice[:len(target)]`,
  -len(choice), index); -1 without choices. `target` and `choices` are sequences (token ids officially)."""
  if not choices:
    return -1
  def rank(indexed):
    index, choice = indexed
    matched = sum(a == b for a, b in zip(target[:len(choice)], choice[:len(target)]))
    return matched, -len(choice), index
  return max(enumerate(choices), key=rank)[0]


def text_label(target: str, choices) -> int:
  """`find_label` over characters, each sequence ended by one EOS marker. Over T5 token ids it picks the same
  choice whenever the target is one of the choices (all its tokens and EOS match, which no other choice can),
  and whenever the target starts with exactly one choice's text followed by punctuation (strategyqa)."""
  if target in choices:  # all characters and the end marker match: the last equal choice wins the tie-break
    return len(choices) - 1 - choices[::-1].index(target)
  return find_label(list(target) + [_END], [list(c) + [_END] for c in choices])


def _distinct(examples: list) -> list:
  """Examples with exact duplicates removed, order kept (json_task.py lines 459-490)."""
  seen, distinct = set(), []
  for example in examples:
    key = json.dumps(example)
    if key not in seen:
      seen.add(key)
      distinct.append(example)
  return distinct


def _export_rows(task_data: dict) -> list:
  """One task.json's rows of the Hugging Face export, in file order (bigbench_bridge.py lines 227-249)."""
  rows = []
  for example in _distinct(task_data.get("examples", [])):
    scores = example.get("target_scores", {})
    rows.append({"inputs": format_input(example, task_data), "targets": export_targets(example),
                 "multiple_choice_targets": [c.strip() for c in scores],
                 "multiple_choice_scores": list(scores.values())})
  return rows


def _train_validation(rows: list, min_validation: int) -> tuple:
  """(train, validation) of one task: shuffled by random.seed(42), the last max(int(0.2 n), min_validation)
  examples for validation (bigbench_bridge.py lines 152-187, 302-311)."""
  rows = list(rows)
  random.Random(SPLIT_SHUFFLE_SEED).shuffle(rows)
  num_train = len(rows) - max(int(0.2 * len(rows)), min_validation)
  return rows[:max(num_train, 0)], rows[max(num_train, 0):]


def export_examples(task: str, bigbench_dir=None) -> list:
  """The export rows of `task` in the order of the official "train_validation" split: every subtask's train
  part, then every subtask's validation part (a subtask alone keeps its task's minimum validation size,
  16 // number of subtasks)."""
  files = task_files(task, bigbench_dir)
  min_validation = MIN_VALIDATION_EXAMPLES // len(task_files(task.split("/")[0], bigbench_dir))
  parts = []
  for path in files:
    with open(path, encoding="utf-8") as f:
      parts.append(_train_validation(_export_rows(json.load(f)), min_validation))
  return [row for train, _ in parts for row in train] + [row for _, valid in parts for row in valid]


def default_metric(row: dict) -> str:
  """Metric of an example of a task the official code does not configure: rank classification when it has
  choices, else exact match (several references: multiple-answer exact match)."""
  if row["multiple_choice_targets"]:
    return "accuracy"
  return "exact_match_multiple_ans" if len(row["targets"]) > 1 else "exact_match"


def official_example(inputs: str, targets: list, choices: list, scores: list, metric: str) -> dict:
  """One evaluation example as src/data/bigbench.py builds it (see module docstring)."""
  target = max(targets, key=len)
  if metric in sources.GENERATIVE_METRICS:
    references = list(targets) if metric == "exact_match_multiple_ans" else [targets[0]]
    return dict(inputs=inputs + ANSWER_SUFFIX, choices=[], correct=[], target=target, references=references,
                metric=_METRICS[metric])
  if metric == "accuracy_multiple_ans":
    correct = [score == 1 for score in scores]
  else:
    label = text_label(target, choices)
    correct = [i == label for i in range(len(choices))]
  return dict(inputs=inputs + ANSWER_SUFFIX, choices=list(choices), correct=correct, target=target,
              references=[target], metric="accuracy")


def read_examples(task: str, bigbench_dir=None) -> list:
  """Zero-shot examples of the BIG-bench JSON task `task` ("name" or "name/subtask"), with the task's official
  metric (`default_metric` for a task the official code does not configure)."""
  spec = sources.bigbench_spec(task)
  return [official_example(r["inputs"], r["targets"], r["multiple_choice_targets"], r["multiple_choice_scores"],
                           spec.metric if spec else default_metric(r)) for r in export_examples(task, bigbench_dir)]


def bbh_file(task: str, bbh_dir=None) -> pathlib.Path:
  """`<bbh_dir>/<task>.json` of the BIG-Bench Hard release."""
  path = pathlib.Path(bbh_dir or sources.get_dir("bbh_dir"), f"{task}.json")
  if not path.is_file():
    raise sources.missing(f"BIG-Bench Hard task {task}", str(path), sources.DIR_KINDS["bbh_dir"][2])
  return path


def read_bbh_examples(spec: sources.BigBenchTask, bbh_dir=None) -> list:
  """Examples of a BIG-Bench Hard release task as the official `BigBenchSampleDataset` builds them: prompt
  `input + "\\nAnswer:"`, choices the task's fixed answer set, label `find_label` of the target."""
  with open(bbh_file(spec.path, bbh_dir), encoding="utf-8") as f:
    examples = json.load(f)["examples"]
  choices = list(spec.bbh_choices)
  return [official_example(e["input"], [e["target"]], choices, [], spec.metric) for e in examples]


def seqio_name(task: str) -> str:
  """The seqio name of an unregistered BIG-bench task path: "bigbench:<task>[.<subtask>]"."""
  return "bigbench:" + task.replace("/", ".")


def register_path(task: str):
  """Registers (or re-registers) BIG-bench `task` ("name" or "name/subtask") as seqio task `seqio_name(task)`."""
  source = seqio_tasks.text_source(lambda split: read_examples(task), seqio_tasks.EVAL_SIGNATURE,
                                   splits=("validation",))
  return seqio_tasks.add_task(seqio_name(task), source, evaluation=True)


def _examples_fn(spec: sources.BigBenchTask):
  if spec.bbh_choices is not None:
    return lambda split: read_bbh_examples(spec)
  return lambda split: read_examples(spec.path)


def register() -> None:
  """Registers `bbl_<task>` (BIG-bench Lite), `bbh_<task>` (BIG-bench Hard) and their mixtures."""
  for prefix, table in (("bbl", sources.BIGBENCH_LITE), ("bbh", sources.BIGBENCH_HARD)):
    for name, spec in table.items():
      source = seqio_tasks.text_source(_examples_fn(spec), seqio_tasks.EVAL_SIGNATURE, splits=("validation",))
      seqio_tasks.add_task(f"{prefix}_{name}", source, evaluation=True)
  seqio_tasks.add_mixture("bigbench_lite", [f"bbl_{name}" for name in sources.BIGBENCH_LITE])
  seqio_tasks.add_mixture("bigbench_hard", [f"bbh_{name}" for name in sources.BIGBENCH_HARD])
