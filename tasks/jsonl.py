"""A user's own data as seqio tasks: JSONL files, one example per line.

  training      {"inputs": "...", "targets": "..."}                    -> split `train`
  evaluation    {"inputs": "...", "choices": ["...", ...], "answer": i}  -> rank classification (algorithm.md §6)

`register(path)` registers the file as task `jsonl_<file stem>` and returns that name: a training file gets a
`train` split (and a `validation` split when `<stem>.validation.jsonl` lies beside it); an evaluation file
(its first line has `choices`) gets a `validation` split scored by rank classification. The vocabulary is
`'byte'`, the path of a SentencePiece model, or by default the T5 SentencePiece model (`sources.spm_path`).
Every stage, and `phatgoose tasks inspect`, takes such a path wherever it takes a task name
(`--task path/to/train.jsonl`).
"""
import json
import os
import re
from typing import Iterator, Optional

from phatgoose_jax import vocab as vocab_lib
from phatgoose_jax.tasks import seqio_tasks, sources

SUFFIX = ".jsonl"
VALIDATION_SUFFIX = ".validation.jsonl"


def is_jsonl(name: str) -> bool:
  return name.endswith(SUFFIX) and os.path.isfile(name)


def task_name(path: str) -> str:
  stem = os.path.basename(path)[:-len(SUFFIX)]
  return "jsonl_" + re.sub(r"[^0-9A-Za-z_]", "_", stem)


def _rows(path: str) -> Iterator[dict]:
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if line.strip():
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path} line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(row, dict) or not isinstance(row.get("inputs"), str):
          raise ValueError(f"{path} line {lineno}: expected a JSON object with a string 'inputs'")
        yield row


def _training_row(row: dict) -> dict:
  if not isinstance(row.get("targets"), str):
    raise ValueError(f"a training line needs a string 'targets': {row}")
  return {"inputs": row["inputs"], "targets": row["targets"]}


def _evaluation_row(row: dict) -> dict:
  """The evaluation record of one line: `answer` is the index of the correct choice (or its text)."""
  choices, answer = row.get("choices"), row.get("answer")
  if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
    raise ValueError(f"an evaluation line needs 'choices': a list of at least two strings: {row}")
  index = choices.index(answer) if isinstance(answer, str) and answer in choices else answer
  if not isinstance(index, int) or not 0 <= index < len(choices):
    raise ValueError(f"'answer' must be the index or the text of one of the choices: {row}")
  return {"inputs": row["inputs"], "target": choices[index], "choices": choices,
          "correct": [i == index for i in range(len(choices))], "references": [choices[index]],
          "metric": "accuracy"}


def output_features(vocabulary: Optional[str]) -> dict:
  return seqio_tasks.features(vocab_lib.get_vocabulary(vocabulary or sources.spm_path()))


def register(path: str, vocabulary: Optional[str] = None) -> str:
  """Registers (or re-registers) the JSONL file `path` as a seqio task; returns the task's name."""
  path = os.path.abspath(path)
  first = next(_rows(path), None)
  if first is None:
    raise ValueError(f"{path} holds no examples")
  name = task_name(path)
  evaluation = "choices" in first
  if evaluation:
    source = seqio_tasks.text_source(lambda split: (_evaluation_row(r) for r in _rows(path)),
                                     seqio_tasks.EVAL_SIGNATURE, splits=("validation",))
  else:
    validation = path[:-len(SUFFIX)] + VALIDATION_SUFFIX
    files = {"train": path, **({"validation": validation} if os.path.isfile(validation) else {})}
    source = seqio_tasks.text_source(lambda split: (_training_row(r) for r in _rows(files[split])),
                                     seqio_tasks.TRAIN_SIGNATURE, splits=tuple(files))
  seqio_tasks.add_task(name, source, evaluation, output_features(vocabulary))
  return name
