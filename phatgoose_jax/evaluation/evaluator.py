"""Evaluate a model on tasks and mixtures through seqio: rank classification and greedy generation (algorithm.md §6).

Each task of a task or mixture is evaluated by a `seqio.Evaluator`: the task's preprocessors make one row per
answer choice (or one per generative example), seqio's `EncDecFeatureConverter` makes the model features at
the configured lengths (trimming keeps EOS), and the task's own metric functions (`tasks/seqio_tasks.py`)
compute the numbers from what a `Runner` gives them:
  score_fn   -> every row's target log-likelihood from `EncoderDecoderModel.score_batch` (length-normalised:
                rank classification picks the highest mean, i.e. the lowest length-normalised cross-entropy);
  predict_fn -> greedy decodings (`predict_batch_with_aux`) of the generative rows: `new_tokens(L)` = L - 1
                tokens for the task's generation length L (`sources.generation_length`, the official
                `max_gen_length`, passed as `generate(max_length=L)`), at most `target_length`.
Batches have a fixed shape (`batch_size` rows, padded), so each jitted function compiles once, and are placed
with the mesh's batch sharding. Per-example routers (uniform, oracle, retrieval) give `expert_weights(batch) ->
<float32>[b, E]`; the batch they see holds the encoded inputs, their texts (`inputs`), their examples' answer
choices (`answer_choices`, [] for a generative example) and the task name (`task`, the oracle's label).
Results: `{"name", "tasks": {task: {num_examples, metrics, score}}, "score"}`; a dataset's score is the mean of
its metrics and a benchmark's the unweighted mean over its datasets.
"""
import dataclasses
import functools
import json
import logging
import os
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

import jax
import numpy as np
import seqio
from jax.experimental import multihost_utils

from phatgoose_jax import tasks
from phatgoose_jax import vocab as vocab_lib
from phatgoose_jax.checkpoints import names
from phatgoose_jax.evaluation import metrics
from phatgoose_jax.models import EncoderDecoderModel, new_tokens, pad_tokens, shift_right
from phatgoose_jax.tasks import flan, seqio_tasks, sources

MODEL_FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")


@dataclasses.dataclass
class Runner:
  """A model ready to score and decode seqio evaluation datasets in fixed-shape, sharded batches."""
  model: EncoderDecoderModel
  variables: dict
  vocabulary: seqio.Vocabulary
  expert_weights: Optional[Callable[[Mapping], np.ndarray]] = None
  batch_size: int = 64
  input_length: int = 64
  target_length: int = 64
  batch_sharding: Any = None

  def _put(self, x):
    return x if self.batch_sharding is None else jax.device_put(x, self.batch_sharding)

  def _with_weights(self, batch: Dict[str, np.ndarray], texts: Sequence[str], choices: Sequence[list],
                    task: Optional[str]) -> dict:
    """The batch placed on the mesh, with the per-example router's `expert_weights` when there is one."""
    placed = {k: self._put(v) for k, v in batch.items()}
    if self.expert_weights is None:
      return placed
    padding = self.batch_size - len(texts)
    seen = {"encoder_input_tokens": batch["encoder_input_tokens"], "inputs": list(texts) + [""] * padding,
            "answer_choices": list(choices) + [[]] * padding, "task": [task] * self.batch_size}
    return {**placed, "expert_weights": self._put(np.asarray(self.expert_weights(seen), np.float32))}

  def batches(self, dataset, rows: Sequence[Mapping], task: str) -> Iterator[tuple]:
    """(row indices, batch) over an enumerated model-feature dataset; `rows` are its task rows (texts, and
    each row's example's answer choices: the official retriever embeds them, src/models/addons/retriever.py:29-43)."""
    choices = seqio_tasks.example_choices(rows)
    for index, batch in _numpy_batches(dataset, self.batch_size):
      texts = [seqio_tasks.text(rows[i]["inputs_pretokenized"]) for i in index]
      yield index, self._with_weights(batch, texts, [choices[int(rows[i]["idx"])] for i in index], task)

  def score_fn(self, task: str, rows: Sequence[Mapping]) -> Callable:
    """seqio score_fn: dataset -> [(index, mean target log-likelihood)]."""
    def score(dataset):
      out = []
      for index, batch in self.batches(dataset, rows, task):
        out += zip(index.tolist(), _host(self.model.jit_score(self.variables, batch))[:len(index)].tolist())
      return out
    return score

  def predict_fn(self, task: str, rows: Sequence[Mapping]) -> Callable:
    """seqio predict_fn: dataset -> [(index, greedy tokens)]; only generative rows are decoded (the others
    get an empty output, which no metric reads)."""
    length = min(self.target_length, new_tokens(sources.generation_length(task)))
    generative = np.array([seqio_tasks.text(r["metric"]) != seqio_tasks.RANK_CLASSIFICATION for r in rows])

    def predict(dataset):
      if not generative.any():  # nothing to decode: skip reading the dataset
        return [(i, np.zeros((0,), np.int32)) for i in range(len(rows))]
      out = []
      for index, batch in self.batches(dataset, rows, task):
        tokens = np.zeros((len(index), length), np.int32)
        if generative[index].any():
          batch = {**batch, "decoder_input_tokens": np.zeros((self.batch_size, length), np.int32)}
          tokens = _host(self.model.jit_predict(self.variables, batch)[0])[:len(index)]
        out += zip(index.tolist(), list(tokens))
      return out
    return predict

  def features(self, inputs: Sequence[str], targets: Sequence[str]) -> Dict[str, np.ndarray]:
    """One padded batch of t5x features from texts (at most `batch_size` examples)."""
    encode = lambda texts, length: pad_tokens([vocab_lib.encode(self.vocabulary, t, length) for t in texts],
                                              length, self.batch_size)
    targets = encode(targets, self.target_length)
    return {"encoder_input_tokens": encode(inputs, self.input_length), "decoder_input_tokens": shift_right(targets),
            "decoder_target_tokens": targets}

  def intermediates(self, inputs: Sequence[str], targets: Sequence[str]) -> tuple:
    """(features, sown `intermediates` `{'module/path/name': array}`) of one teacher-forced batch."""
    batch = self.features(inputs, targets)
    _, aux = self.model.jit_score(self.variables, {k: self._put(v) for k, v in batch.items()},
                                  return_intermediates=True)
    flat = names.flatten(jax.device_get(aux["intermediates"]))
    return batch, {k: np.asarray(v[0] if isinstance(v, tuple) else v) for k, v in flat.items()}


def _host(x: jax.Array) -> np.ndarray:
  """The whole array in every process (a batch's outputs are sharded over all processes' devices)."""
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  return np.pad(x, [(0, rows - len(x))] + [(0, 0)] * (x.ndim - 1))


@functools.lru_cache(maxsize=32)
def _numpy_batches(dataset, batch_size: int) -> tuple:
  """((row indices, model features padded to `batch_size` rows), ...) of an enumerated model-feature dataset,
  read once: an evaluator's cached dataset is the same object for every method scored on it."""
  return tuple((index, {k: _pad_rows(np.asarray(features[k], np.int32), batch_size) for k in MODEL_FEATURES})
               for index, features in dataset.batch(batch_size).as_numpy_iterator())


def task_list(name: str) -> List[str]:
  """The seqio task names of a task or mixture (a `bigbench/...` path or `.jsonl` file is registered first)."""
  provider = tasks.get_task_or_mixture(name)
  return [t.name for t in provider.tasks] if isinstance(provider, seqio.Mixture) else [provider.name]


def seqio_evaluator(task: str, runner: Runner, max_examples: Optional[int] = None, **dirs) -> tuple:
  """(`seqio.Evaluator`, its task rows) of one registered task: its evaluation split (validation, else its
  first), the first `max_examples` examples (`dirs`: data directories), at the runner's lengths. Built once
  per registered task object and settings, then reused: every method of a comparison reads the same data."""
  lengths = (("inputs", runner.input_length), ("targets", runner.target_length))
  dirs = tuple(sorted((k, os.fspath(v)) for k, v in dirs.items() if v is not None))
  return _cached_evaluator(seqio.get_mixture_or_task(task), lengths, max_examples, dirs)


@functools.lru_cache(maxsize=32)
def _cached_evaluator(task: seqio.Task, lengths: tuple, max_examples: Optional[int], dirs: tuple) -> tuple:
  split = "validation" if "validation" in task.splits else task.splits[0]
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)  # fixed lengths (one compilation) and no seqio loggers are intended
  try:
    with sources.using_dirs(**dict(dirs)), seqio_tasks.first_examples(max_examples):
      evaluator = seqio.Evaluator(task.name, seqio.EncDecFeatureConverter(pack=False), eval_split=split,
                                  sequence_length=dict(lengths), async_compute_metrics=False)
  finally:
    absl_logger.setLevel(level)
  if not evaluator.eval_tasks:
    raise ValueError(f"{task.name} is not an evaluation task (it has no metric functions)")
  return evaluator, list(evaluator.cached_task_datasets[task.name].as_numpy_iterator())


def evaluate_task(task: str, runner: Runner, max_examples: Optional[int] = None, **dirs) -> dict:
  """{"num_examples", "metrics", "score"} of one task, computed by its seqio metric functions."""
  evaluator, rows = seqio_evaluator(task, runner, max_examples, **dirs)
  if not rows:
    raise ValueError(f"{task} has no examples to evaluate")
  future, _ = evaluator.evaluate(compute_metrics=True, score_fn=runner.score_fn(task, rows),
                                 predict_fn=runner.predict_fn(task, rows))
  values = {k: float(v) for k, v in future.result()[task].items()}
  return {"num_examples": len({int(r["idx"]) for r in rows}), "metrics": values,
          "score": metrics.dataset_score(values)}


def evaluate(name: str, runner: Runner, max_examples: Optional[int] = None, expert_pool: Optional[str] = None,
             **dirs) -> dict:
  """Scores of each task of `name` (`evaluate_task`) and their unweighted mean; `expert_pool` names the
  experts' pool ("p3" or "flan"): the FLAN pool is refused on T0 held-out tasks."""
  flan.check_evaluation(expert_pool, name)
  results = {task: evaluate_task(task, runner, max_examples, **dirs) for task in task_list(name)}
  return {"name": name, "tasks": results,
          "score": metrics.benchmark_score({t: r["score"] for t, r in results.items()})}


def markdown_table(scores: Mapping[str, Mapping[str, float]], average: str = "average") -> str:
  """`| method | task ... | average |` with one row per method; scores as percentages."""
  tasks = sorted({t for row in scores.values() for t in row})
  lines = ["| method | " + " | ".join(tasks + [average]) + " |", "|---" * (len(tasks) + 2) + "|"]
  for method, row in scores.items():
    cells = [f"{100 * row[t]:.1f}" if t in row else "-" for t in tasks]
    cells.append(f"{100 * metrics.benchmark_score(row):.1f}" if row else "-")
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_results(results: Mapping[str, dict], output_dir: str) -> None:
  """`results.json` ({method: results}) and `results.md` (one row per method) in `output_dir`."""
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=2, sort_keys=True)
  table = markdown_table({m: {t: r["score"] for t, r in res["tasks"].items()} for m, res in results.items()})
  with open(os.path.join(output_dir, "results.md"), "w") as f:
    f.write(table + "\n")
