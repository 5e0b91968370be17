"""Evaluate a model on tasks and mixtures: rank classification and greedy generation (algorithm.md §6).

A `Runner` turns a model and its variables into the two functions `task_eval` needs:
  score(pairs)     -> mean target-token log-likelihood of each (input, target) pair (length-normalised:
                      rank classification picks the highest, i.e. the lowest mean cross-entropy);
  generate(inputs) -> greedy decodings.
Batches have a fixed shape (`batch_size` rows of `input_length` / `target_length` tokens, padded), so each
jitted function compiles once, and are placed with the mesh's batch sharding. Per-example routers
(uniform, oracle, retrieval) give `expert_weights(batch) -> <float32>[b, E]`; the batch they see holds the
encoded inputs, their texts (`inputs`) and the task name (`task`, the oracle's label).
Results: `{"name", "tasks": {task: {num_examples, metrics, score}}, "score"}`; a dataset's score is the mean of
its metrics and a benchmark's the unweighted mean over its datasets.
"""
import dataclasses
import json
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import jax
import numpy as np
import seqio

from phatgoose_jax import tasks
from phatgoose_jax import vocab as vocab_lib
from phatgoose_jax.checkpoints import names
from phatgoose_jax.evaluation import metrics, task_eval
from phatgoose_jax.models import EncoderDecoderModel, pad_tokens, shift_right
from phatgoose_jax.tasks import flan


@dataclasses.dataclass
class Runner:
  """A model ready to score and generate text in fixed-shape, sharded batches."""
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

  def _encode(self, texts: Sequence[str], length: int) -> np.ndarray:
    return pad_tokens([vocab_lib.encode(self.vocabulary, t, length) for t in texts], length, self.batch_size)

  def _weights(self, inputs: Sequence[str], encoded: np.ndarray, task: Optional[str]):
    if self.expert_weights is None:
      return None
    texts = list(inputs) + [""] * (self.batch_size - len(inputs))
    batch = {"encoder_input_tokens": encoded, "inputs": texts, "task": [task] * self.batch_size}
    return self._put(np.asarray(self.expert_weights(batch), np.float32))

  def features(self, inputs: Sequence[str], targets: Sequence[str]) -> Dict[str, np.ndarray]:
    """One padded batch of t5x features (at most `batch_size` examples)."""
    encoded = self._encode(inputs, self.input_length)
    targets = self._encode(targets, self.target_length)
    return {"encoder_input_tokens": encoded, "decoder_input_tokens": shift_right(targets),
            "decoder_target_tokens": targets}

  def _chunks(self, items: Sequence) -> List[Sequence]:
    return [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]

  def score(self, pairs: Sequence[tuple], task: Optional[str] = None) -> List[float]:
    """Mean log-likelihood of each target given its input."""
    out = []
    for chunk in self._chunks(list(pairs)):
      inputs, targets = [p[0] for p in chunk], [p[1] for p in chunk]
      batch = self.features(inputs, targets)
      weights = self._weights(inputs, batch["encoder_input_tokens"], task)
      batch = {k: self._put(v) for k, v in batch.items()}
      scores = self.model.jit_score(self.variables, batch if weights is None else {**batch, "expert_weights": weights})
      out += np.asarray(scores)[:len(chunk)].tolist()
    return out

  def generate(self, inputs: Sequence[str], task: Optional[str] = None) -> List[str]:
    """Greedy decodings of at most `target_length` tokens."""
    out = []
    for chunk in self._chunks(list(inputs)):
      encoded = self._encode(chunk, self.input_length)
      weights = self._weights(chunk, encoded, task)
      batch = {"encoder_input_tokens": self._put(encoded),
               "decoder_input_tokens": np.zeros((len(encoded), self.target_length), np.int32)}
      tokens, _ = self.model.jit_predict(self.variables, batch if weights is None else {**batch, "expert_weights": weights})
      out += [vocab_lib.decode(self.vocabulary, row) for row in np.asarray(tokens)[:len(chunk)]]
    return out

  def intermediates(self, inputs: Sequence[str], targets: Sequence[str]) -> tuple:
    """(features, sown `intermediates` `{'module/path/name': array}`) of one teacher-forced batch."""
    batch = self.features(inputs, targets)
    _, aux = self.model.jit_score(self.variables, {k: self._put(v) for k, v in batch.items()},
                                  return_intermediates=True)
    flat = names.flatten(jax.device_get(aux["intermediates"]))
    return batch, {k: np.asarray(v[0] if isinstance(v, tuple) else v) for k, v in flat.items()}


def task_list(name: str) -> List[str]:
  """The task names of a task or mixture (a `bigbench/...` path is one task)."""
  provider = tasks.get_task_or_mixture(name)
  return [t.name for t in provider.tasks] if isinstance(provider, seqio.Mixture) else [name]


def evaluate(name: str, runner: Runner, max_examples: Optional[int] = None, expert_pool: Optional[str] = None,
             **dirs) -> dict:
  """Scores of each task of `name` and their unweighted mean (`task_eval.evaluate_task` per task)."""
  flan.check_evaluation(expert_pool, name)
  results = {}
  for task in task_list(name):
    result = task_eval.evaluate_task(task, lambda pairs, t=task: runner.score(pairs, t),
                                     lambda inputs, t=task: runner.generate(inputs, t), max_examples=max_examples,
                                     expert_pool=expert_pool, **dirs)
    results.update(result["tasks"])
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
