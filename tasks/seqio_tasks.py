"""seqio plumbing shared by every registry: text sources, rank-classification preprocessing, features,
idempotent registration (algorithm.md §6).

An evaluation source yields one example per (example, prompt) with fields `inputs`, `target`, `choices`,
`correct`, `references`, `metric` and `idx`; the `rank_classification` preprocessor expands it into one row
per answer choice (`inputs`, `targets`, `idx`, `choice_idx`, `is_correct`; a generative example gives one
row with its target). Data is read only when a dataset is requested: registration touches no file.
"""
import functools
import itertools
from typing import Callable, Iterable, Iterator, Optional

import seqio
import tensorflow as tf

from phatgoose_jax.evaluation import metrics
from phatgoose_jax.tasks import sources

EVAL_SIGNATURE = {
    "inputs": tf.TensorSpec([], tf.string),
    "target": tf.TensorSpec([], tf.string),
    "choices": tf.TensorSpec([None], tf.string),
    "correct": tf.TensorSpec([None], tf.bool),
    "references": tf.TensorSpec([None], tf.string),
    "metric": tf.TensorSpec([], tf.string),
    "idx": tf.TensorSpec([], tf.int32),
}
TRAIN_SIGNATURE = {"inputs": tf.TensorSpec([], tf.string), "targets": tf.TensorSpec([], tf.string)}


@functools.lru_cache(maxsize=None)
def output_features() -> dict:
  """Tokenized `inputs` / `targets` with the T5 SentencePiece vocabulary (loaded lazily by seqio)."""
  vocabulary = seqio.SentencePieceVocabulary(sources.spm_path())
  return {"inputs": seqio.Feature(vocabulary, add_eos=True), "targets": seqio.Feature(vocabulary, add_eos=True)}


def _indexed(examples: Iterable[dict]):
  for idx, ex in enumerate(examples):
    yield {**{k: ex[k] for k in EVAL_SIGNATURE if k != "idx"}, "idx": idx}


def _opened(examples_fn: Callable, split: str) -> Iterator[dict]:
  """`examples_fn(split)` with its first example already read, so that missing data raises here, in
  python, with its own message (inside tf.data it would surface as an opaque op error)."""
  examples = iter(examples_fn(split))
  first = next(examples, None)
  return itertools.chain([] if first is None else [first], examples)


class TextSource(seqio.FunctionDataSource):
  """A seqio source over `examples_fn(split)` (python dicts), read when the dataset is requested.

  `get_dataset` serves them as tf.data; `examples` gives the same dicts directly, without tf.data."""

  def __init__(self, examples_fn: Callable, signature: dict, splits):
    self.examples_fn = examples_fn
    self.signature = signature
    super().__init__(self._dataset_fn, splits=splits)

  def examples(self, split: str) -> Iterator[dict]:
    return self.examples_fn(split)

  def _dataset_fn(self, split, shuffle_files, seed=None):
    del shuffle_files, seed
    opened = [_opened(self.examples_fn, split)]
    def rows():
      examples = opened.pop() if opened else self.examples_fn(split)
      return _indexed(examples) if self.signature is EVAL_SIGNATURE else examples
    return tf.data.Dataset.from_generator(rows, output_signature=self.signature)


def text_source(examples_fn: Callable, signature: dict, splits=("train", "validation")) -> TextSource:
  return TextSource(examples_fn, signature, splits)


def rank_classification(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """One row per answer choice: inputs, targets (the choice), idx, choice_idx, is_correct (algorithm.md §6)."""
  def expand(ex):
    has_choices = tf.size(ex["choices"]) > 0
    targets = tf.cond(has_choices, lambda: ex["choices"], lambda: tf.reshape(ex["target"], [1]))
    correct = tf.cond(has_choices, lambda: ex["correct"], lambda: tf.constant([True]))
    n = tf.size(targets)
    return tf.data.Dataset.from_tensor_slices({
        "inputs": tf.fill([n], ex["inputs"]), "targets": targets, "idx": tf.fill([n], ex["idx"]),
        "choice_idx": tf.range(n, dtype=tf.int32), "is_correct": correct})
  return dataset.flat_map(expand)


def row_key(output, example=None, is_target=False):
  """Postprocessor: a target row becomes (idx, choice_idx, is_correct) for `rank_classification_metric`."""
  if not is_target:
    return output
  return int(example["idx"]), int(example["choice_idx"]), bool(example["is_correct"])


def rank_classification_metric(targets, scores) -> dict:
  """seqio score metric: accuracy over examples with more than one choice (scores: mean log-likelihoods)."""
  idx, choice, correct = (list(col) for col in zip(*targets))
  counts = {i: idx.count(i) for i in set(idx)}
  keep = [counts[i] > 1 for i in idx]
  pick = lambda col: [v for v, k in zip(col, keep) if k]
  return {"accuracy": metrics.rank_classification_accuracy(pick(scores), pick(idx), pick(choice), pick(correct))}


def add_task(name: str, source: seqio.DataSource, evaluation: bool, features: Optional[dict] = None) -> seqio.Task:
  """Registers (or re-registers) a text task: evaluation tasks get rank-classification rows."""
  seqio.TaskRegistry.remove(name)
  task = make_task(name, source, evaluation, features)
  seqio.TaskRegistry.add_provider(name, task)
  return task


def make_task(name: str, source: seqio.DataSource, evaluation: bool, features: Optional[dict] = None) -> seqio.Task:
  """A text task tokenized with `features` (default: the T5 SentencePiece `output_features()`)."""
  text_steps = [rank_classification] if evaluation else []
  steps = text_steps + [seqio.CacheDatasetPlaceholder(), seqio.preprocessors.tokenize,
                        seqio.preprocessors.append_eos_after_trim]
  return seqio.Task(name, source, features or output_features(), preprocessors=steps,
                    postprocess_fn=row_key if evaluation else None,
                    metric_fns=[rank_classification_metric] if evaluation else [])


def add_mixture(name: str, task_names) -> None:
  """Registers (or re-registers) an equal-rate mixture of `task_names`."""
  seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, list(task_names), default_rate=1.0)
