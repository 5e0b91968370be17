"""seqio plumbing shared by every registry: text sources, rank-classification preprocessing, features,
idempotent registration (algorithm.md §6).

An evaluation source yields one example per (example, prompt) with fields `inputs`, `target`, `choices`,
`correct`, `references`, `metric` and `idx`; the `rank_classification` preprocessor expands it into one row
per answer choice (`inputs`, `targets`, `idx`, `choice_idx`, `is_correct`, `metric`, `references`; a
generative example gives one row with its target). Every evaluation task carries both metric functions, each
reading only the rows of its kind: `rank_classification_metric` (a score metric: the example's highest-scoring
choice) and `generation_metrics` (a predict metric: greedy outputs against the references); a task registered
as not generative (every example has answer choices) carries only the first. Data is read only
when a dataset is requested: registration touches no file; `first_examples(n)` caps the examples of the
evaluation datasets created inside it.
"""
import contextlib
import contextvars
import functools
import itertools
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import seqio
import tensorflow as tf

from phatgoose_jax import vocab as vocab_lib
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
RANK_CLASSIFICATION = "accuracy"
# Generative metrics by the name a row's `metric` lists: fn(outputs, references per row) -> a value, or named
# values (squad: exact_match and f1, reported as squad_exact_match and squad_f1).
GENERATION_METRICS = {
    "exact_match": lambda outputs, refs: metrics.exact_match(outputs, [r[0] for r in refs]),
    "multi_answer_exact_match": metrics.multi_answer_exact_match,
    "rouge_l": metrics.rouge_l,
    "bleu": metrics.bleu,
    "squad": metrics.squad,
}
METRIC_SEPARATOR = ","  # a row scored by several metrics lists them as "bleu,rouge_l"
_FIRST_EXAMPLES = contextvars.ContextVar("first_examples", default=None)
_CHUNK_ROWS = 1024  # training rows per python -> tf.data transfer
SAMPLE_SEED = 42  # src/data/dataset.py:67, 90: Dataset(seed=42) -> numpy.random.default_rng(seed)


@contextlib.contextmanager
def first_examples(n: Optional[int]):
  """Evaluation datasets created inside the block serve only their first `n` examples (None: all)."""
  token = _FIRST_EXAMPLES.set(n)
  try:
    yield
  finally:
    _FIRST_EXAMPLES.reset(token)


def features(vocabulary: seqio.Vocabulary) -> dict:
  """Tokenized `inputs` / `targets` with `vocabulary`, EOS appended; seqio decodes predictions with the targets'
  vocabulary, which reads them as the official tokenizer does (`vocab.OfficialDecoding`)."""
  return {"inputs": seqio.Feature(vocabulary, add_eos=True),
          "targets": seqio.Feature(vocab_lib.OfficialDecoding(vocabulary), add_eos=True)}


@functools.lru_cache(maxsize=None)
def output_features() -> dict:
  """`features` of the T5 SentencePiece vocabulary (loaded lazily by seqio)."""
  return features(seqio.SentencePieceVocabulary(sources.spm_path()))


def drawn(total: int, cap: int) -> np.ndarray:
  """The indices an official dataset keeps of its `total` items under `max_examples_per_dataset = cap`, in its own
  order: all in order, or `cap` drawn without replacement by default_rng(42), in the order drawn
  (src/data/p3.py:96-112, src/data/flat.py:195-203)."""
  return np.random.default_rng(SAMPLE_SEED).choice(total, cap, replace=False) if total > cap else np.arange(total)


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

  `get_dataset` serves them as tf.data; `examples` gives the same dicts directly, without tf.data;
  `stored_examples` the ones retrieval stores; `sampled_examples` the ones average activation runs."""

  def __init__(self, examples_fn: Callable, signature: dict, splits, stored_fn: Optional[Callable] = None,
               sampled_fn: Optional[Callable] = None):
    self.examples_fn = examples_fn
    self.signature = signature
    self.stored_fn = stored_fn
    self.sampled_fn = sampled_fn
    super().__init__(self._dataset_fn, splits=splits)

  def examples(self, split: str) -> Iterator[dict]:
    return self.examples_fn(split)

  def stored_examples(self, split: str, count: int) -> list:
    """The first `count` examples of `split` in the official dataset's own index order, each with its
    `answer_choices` (algorithm.md §5): `stored_fn(split, count)` where the served order differs from it or
    the dataset has answer choices (P3, `p3.stored_examples`), else the first `count` examples served, with None:
    a dataset without an answer-choices field (src/data/flat.py:17-35)."""
    if self.stored_fn is not None:
      return self.stored_fn(split, count)
    return [dict(example, answer_choices=None) for example in itertools.islice(self.examples_fn(split), count)]

  def sampled_examples(self, split: str, count: int) -> list:
    """The examples of `split` the official dataset serves under `max_examples_per_dataset = count`, in its own
    order (algorithm.md §5): `sampled_fn(split, count)` where the served examples are themselves capped or
    sampled (P3 pairs, `p3.sampled_examples`; FLAN rows), else `drawn` over the examples served."""
    if self.sampled_fn is not None:
      return self.sampled_fn(split, count)
    examples = list(self.examples_fn(split))
    return [examples[i] for i in drawn(len(examples), count)]

  def _dataset_fn(self, split, shuffle_files, seed=None):
    del shuffle_files, seed
    opened = [_opened(self.examples_fn, split)]
    def examples():
      return opened.pop() if opened else self.examples_fn(split)
    if self.signature is EVAL_SIGNATURE:
      limit = _FIRST_EXAMPLES.get()
      return tf.data.Dataset.from_generator(lambda: itertools.islice(_indexed(examples()), limit),
                                            output_signature=self.signature)
    return _from_scalar_rows(examples, self.signature)


def _from_scalar_rows(examples: Callable[[], Iterable[dict]], signature: dict) -> tf.data.Dataset:
  """The rows of a signature of scalar features as tf.data, crossing from python in chunks of rows (one
  generator call per chunk, not per row)."""
  def chunks():
    rows = iter(examples())
    while chunk := list(itertools.islice(rows, _CHUNK_ROWS)):
      yield {k: [row[k] for row in chunk] for k in signature}
  columns = {k: tf.TensorSpec([None], spec.dtype) for k, spec in signature.items()}
  return tf.data.Dataset.from_generator(chunks, output_signature=columns).unbatch()


def text_source(examples_fn: Callable, signature: dict, splits=("train", "validation"),
                stored_fn: Optional[Callable] = None, sampled_fn: Optional[Callable] = None) -> TextSource:
  return TextSource(examples_fn, signature, splits, stored_fn, sampled_fn)


def rank_classification(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """One row per answer choice: inputs, targets (the choice), idx, choice_idx, is_correct, and the example's
  metric and references (algorithm.md §6)."""
  def expand(ex):
    has_choices = tf.size(ex["choices"]) > 0
    targets = tf.cond(has_choices, lambda: ex["choices"], lambda: tf.reshape(ex["target"], [1]))
    correct = tf.cond(has_choices, lambda: ex["correct"], lambda: tf.constant([True]))
    n = tf.size(targets)
    return tf.data.Dataset.from_tensor_slices({
        "inputs": tf.fill([n], ex["inputs"]), "targets": targets, "idx": tf.fill([n], ex["idx"]),
        "choice_idx": tf.range(n, dtype=tf.int32), "is_correct": correct,
        "metric": tf.fill([n], ex["metric"]), "references": tf.tile(ex["references"][None], [n, 1])})
  return dataset.flat_map(expand)


def text(value) -> str:
  """A string feature of a numpy row (bytes) as text."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def example_choices(rows) -> dict:
  """{example idx: its answer choices in order} of an evaluation task's rows (`rank_classification`): the targets
  of its rank-classification rows by `choice_idx`, [] for a generative example."""
  choices = {}
  for row in sorted(rows, key=lambda r: (int(r["idx"]), int(r["choice_idx"]))):
    ranked = text(row["metric"]) == RANK_CLASSIFICATION
    choices.setdefault(int(row["idx"]), []).extend([text(row["targets_pretokenized"])] if ranked else [])
  return choices


def row_key(output, example=None, is_target=False):
  """Postprocessor: a target row becomes {idx, choice_idx, is_correct, metric, references} for the metric
  functions; a prediction stays its text."""
  if not is_target:
    return output
  return {"idx": int(example["idx"]), "choice_idx": int(example["choice_idx"]),
          "is_correct": bool(example["is_correct"]), "metric": text(example["metric"]),
          "references": [text(r) for r in example["references"]]}


def rank_classification_metric(targets, scores) -> dict:
  """seqio score metric: accuracy of the rank-classification rows (scores: mean log-likelihoods, the
  highest choice wins); {} when the task has none."""
  rows = [(t, s) for t, s in zip(targets, scores) if t["metric"] == RANK_CLASSIFICATION]
  if not rows:
    return {}
  column = lambda key: [t[key] for t, _ in rows]
  return {RANK_CLASSIFICATION: metrics.rank_classification_accuracy(
      [s for _, s in rows], column("idx"), column("choice_idx"), column("is_correct"))}


def generation_metrics(targets, predictions) -> dict:
  """seqio predict metric: each generative metric of `GENERATION_METRICS` over the greedy outputs and
  references of the rows whose `metric` lists it (comma-separated); a metric with named values contributes
  each as `<metric>_<name>`, so that the task score, the mean of all values, counts them all as the official
  evaluator does (src/procedures/evaluator.py lines 90-95). {} when the task has no generative rows."""
  values = {}
  for name, metric_fn in GENERATION_METRICS.items():
    rows = [(t, p) for t, p in zip(targets, predictions) if name in t["metric"].split(METRIC_SEPARATOR)]
    if rows:
      value = metric_fn([p for _, p in rows], [t["references"] for t, _ in rows])
      values.update({f"{name}_{k}": v for k, v in value.items()} if isinstance(value, dict) else {name: value})
  return values


def add_task(name: str, source: seqio.DataSource, evaluation: bool, features: Optional[dict] = None,
             generative: bool = True) -> seqio.Task:
  """Registers (or re-registers) a text task: evaluation tasks get rank-classification rows."""
  seqio.TaskRegistry.remove(name)
  task = make_task(name, source, evaluation, features, generative)
  seqio.TaskRegistry.add_provider(name, task)
  return task


def make_task(name: str, source: seqio.DataSource, evaluation: bool, features: Optional[dict] = None,
              generative: bool = True) -> seqio.Task:
  """A text task tokenized with `features` (default: the T5 SentencePiece `output_features()`). An evaluation
  task whose examples all have answer choices (`generative=False`) carries only `rank_classification_metric`:
  seqio then neither decodes nor post-processes predictions for it."""
  text_steps = [rank_classification] if evaluation else []
  steps = text_steps + [seqio.CacheDatasetPlaceholder(), seqio.preprocessors.tokenize,
                        seqio.preprocessors.append_eos_after_trim]
  metric_fns = [rank_classification_metric] + ([generation_metrics] if generative else []) if evaluation else []
  return seqio.Task(name, source, features or output_features(), preprocessors=steps,
                    postprocess_fn=row_key if evaluation else None, metric_fns=metric_fns)


def add_mixture(name: str, task_names) -> None:
  """Registers (or re-registers) an equal-rate mixture of `task_names`."""
  seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, list(task_names), default_rate=1.0)
