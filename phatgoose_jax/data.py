"""The one data path: a registered seqio task or mixture -> its preprocessors -> `EncDecFeatureConverter`.

Every stage that trains or builds a router reads its data here: `seqio.Task.get_dataset` runs the task's
own preprocessors (prompt rendering, tokenization with the task's vocabulary, EOS), the examples are
trimmed to the configured lengths (EOS kept: seqio's `append_eos_after_trim` rule), and seqio's
`EncDecFeatureConverter` (no packing) makes t5x's features:
  encoder_input_tokens, decoder_input_tokens, decoder_target_tokens, decoder_loss_weights
  <int32>[num_examples, length].
Each process reads only its shard of the examples (`shard_info`, seqio's `ShardInfo`). Wherever a task name
is taken, a JSONL file of the user's own data may be given instead (`resolve`, `tasks/jsonl.py`).

`HeldOut` names what must never reach expert, gate or router building (held-out tasks, and optionally
held-out examples recognised from their input text); the stages receive it explicitly.
"""
import dataclasses
import functools
import logging
from typing import Callable, Dict, FrozenSet, List, Mapping, Optional, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf

from phatgoose_jax import checkpoints, utils
from phatgoose_jax import vocab as vocab_lib
from phatgoose_jax.tasks import jsonl, seqio_tasks

FEATURES = ("inputs", "targets")
_READ_BATCH = 4096  # rows per tf.data -> numpy transfer


class HeldOutError(ValueError):
  """Held-out data was passed to a stage that builds experts, gates or routers."""


class TruncationError(ValueError):
  """Examples longer than the configured lengths, with truncation refused (`strict_lengths`)."""


@dataclasses.dataclass(frozen=True)
class HeldOut:
  """Task names, and optionally a predicate on an example's input text, that are held out."""
  tasks: FrozenSet[str] = frozenset()
  predicate: Optional[Callable[[str], bool]] = None

  def check_tasks(self, names: Sequence[str]) -> None:
    leaked = sorted(set(names) & set(self.tasks))
    if leaked:
      raise HeldOutError(f"held-out tasks {leaked} must not be used to build experts, gates or routers")

  def check_texts(self, texts: Sequence[str]) -> None:
    if self.predicate is None:
      return
    for text in texts:
      if self.predicate(text):
        raise HeldOutError(f"a held-out example reached expert / router building: {text!r}")


NOTHING_HELD_OUT = HeldOut()


@gin.configurable
def feature_lengths(inputs: int = 512, targets: int = 512) -> Dict[str, int]:
  """Task feature lengths: inputs and targets each truncated to 512 tokens, EOS kept (algorithm.md §1)."""
  return {"inputs": inputs, "targets": targets}


@gin.configurable(allowlist=["jsonl_vocabulary"])
def resolve(name: str, jsonl_vocabulary: Optional[str] = None) -> str:
  """The registered name of a task: `name` itself, or for a JSONL file of the user's own data the task it is
  registered as (`tasks.jsonl`; `jsonl_vocabulary`: 'byte', a SentencePiece path, default the T5 model)."""
  return jsonl.register(name, jsonl_vocabulary) if jsonl.is_jsonl(name) else name


def task_names(name: str) -> List[str]:
  """The tasks of a registered task or mixture (or of a JSONL file, registered as a task)."""
  provider = seqio.get_mixture_or_task(resolve(name))
  return [t.name for t in provider.tasks] if isinstance(provider, seqio.Mixture) else [provider.name]


def validation_task(name: str) -> Optional[str]:
  """The evaluation task that selects a checkpoint of training task (or mixture) `name`, or None.

  One rule: `<name>_eval` when it is registered and every task in it is scored by a metric (P3 `p3_<key>` ->
  `p3_<key>_eval`, `p3_held_in` -> `p3_held_in_eval`, FLAN `flan_<expert>` -> `flan_<expert>_eval`, the
  demo's `tok_<X>` / `demo_<skill>` -> their `_eval` tasks). The official trainer validates on the dataset's
  EVAL scope: only the 123 FLAN-collection experts by ROUGE-L (colm/datasets/flanv2_t5xl.gin); the 43
  P3-collection ones like `p3_<key>_eval` (colm/datasets/p3_t5xl.gin, e.g. D/P3SOCIALIQA/EVAL: the validation
  split, original templates in turn, rank classification; a generative dataset by its EVAL `metrics`: SQuAD,
  BLEU and/or ROUGE-L, algorithm.md §6). Tasks without one (JSONL files, base pre-training, the `flan_166`
  mixture) return None: the caller selects by validation loss (algorithm.md §2).
  """
  candidate = resolve(name) + "_eval"
  if candidate not in set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()):
    return None
  provider = seqio.get_mixture_or_task(candidate)
  members = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  return candidate if all(task.metric_fns for task in members) else None


def vocabulary(name: str) -> seqio.Vocabulary:
  """The vocabulary of a task's (or a mixture's first task's) `inputs` feature."""
  return seqio.get_mixture_or_task(task_names(name)[0]).output_features["inputs"].vocabulary


def check_vocabulary(vocabulary_: seqio.Vocabulary, base: Optional[str]) -> None:
  """Refuses (ValueError, `vocab.check_fits`) a vocabulary that does not fit the embedding of the configured
  model (`utils.model_config`), else of `base`'s architecture, read from its metadata alone: every stage that
  reads text calls it before any data or weights are read."""
  config = utils.model_config() or checkpoints.architecture(base)
  vocab_lib.check_fits(vocabulary_, config.vocab_size)


def _trim(ids: tf.Tensor, length: int, eos_id: int) -> tf.Tensor:
  """At most `length` ids; a trimmed sequence ends with EOS (seqio's append_eos_after_trim)."""
  return tf.cond(tf.size(ids) > length, lambda: tf.concat([ids[:length - 1], tf.constant([eos_id], ids.dtype)], 0),
                 lambda: ids)


def _plain(fn: Callable) -> Callable:
  """A tf.data map function traced as written (graph ops only): no autograph conversion, which would parse
  its source again at every call."""
  return tf.autograph.experimental.do_not_convert(fn)


def _read(task: seqio.Task, split: str, max_examples: Optional[int], shard_info) -> tf.data.Dataset:
  """The task's tokenized examples: their `inputs`, `targets` and `inputs_pretokenized`."""
  dataset = task.get_dataset(None, split=split, shuffle=False, shard_info=shard_info, num_epochs=1)
  if max_examples is not None:
    dataset = dataset.take(max_examples)
  return dataset.map(_plain(lambda ex: {k: ex[k] for k in FEATURES + ("inputs_pretokenized",)}))


def _numpy(dataset: tf.data.Dataset) -> Dict[str, np.ndarray]:
  """All elements of a dataset of fixed-shape features, stacked (read in large batches, not row by row)."""
  parts = list(dataset.batch(_READ_BATCH).as_numpy_iterator())
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}


def examples(name: str, split: str, lengths: Mapping[str, int], *, max_examples: Optional[int] = None,
             held_out: HeldOut = NOTHING_HELD_OUT, shard_info: Optional[seqio.ShardInfo] = None,
             strict_lengths: bool = False) -> Dict[str, np.ndarray]:
  """t5x features of a task or mixture split (every task of a mixture, at most `max_examples` each), plus
  `inputs_pretokenized` <object>[num_examples] (the input texts, for routers that read text).

  `lengths` are {"inputs": L_in, "targets": L_out}. Longer examples are trimmed (EOS kept) with a warning
  giving their count, or refused with `strict_lengths`. Held-out tasks and examples are refused.
  """
  names = task_names(name)
  held_out.check_tasks(names)
  datasets = []
  for task_name in names:
    task = seqio.get_mixture_or_task(task_name)
    if split not in task.splits:
      raise KeyError(f"task {task_name} has no {split!r} split (it has {list(task.splits)})")
    datasets.append(_read(task, split, max_examples, shard_info))
  dataset = functools.reduce(tf.data.Dataset.concatenate, datasets).cache()
  seen = _numpy(dataset.map(_plain(lambda ex: {"text": ex["inputs_pretokenized"],
                                               "long": tf.reduce_any([tf.size(ex[k]) > lengths[k] for k in FEATURES])})))
  if not seen:
    raise ValueError(f"{name} has no {split!r} examples")
  texts = [t.decode("utf-8") for t in seen["text"]]
  held_out.check_texts(texts)
  long, eos = int(seen["long"].sum()), vocabulary(name).eos_id
  if long and strict_lengths:
    raise TruncationError(f"{long} of {len(texts)} examples of {name} ({split}) are longer than {dict(lengths)} "
                          f"tokens; raise the lengths or drop strict_lengths to trim them")
  if long:
    logging.warning("%d of %d examples of %s (%s) are longer than %s tokens and were trimmed", long, len(texts),
                    name, split, dict(lengths))
  trimmed = dataset.map(_plain(lambda ex: {k: _trim(ex[k], lengths[k], eos) for k in FEATURES}))
  features = _numpy(seqio.EncDecFeatureConverter(pack=False)(trimmed, dict(lengths)))
  return dict({k: v.astype(np.int32) for k, v in features.items()}, inputs_pretokenized=np.array(texts, dtype=object))


def stored_examples(name: str, count: int, held_out: HeldOut = NOTHING_HELD_OUT) -> Dict[str, list]:
  """`inputs` (texts) and `answer_choices` (lists, or None) of the examples retrieval stores for a training task
  or mixture: each task's first `count` training examples in its official dataset's own order
  (`seqio_tasks.TextSource.stored_examples`, algorithm.md §5). Held-out tasks and examples are refused."""
  stored = _text_examples(name, held_out, lambda source: source.stored_examples("train", count))
  return {"inputs": [e["inputs"] for e in stored], "answer_choices": [e["answer_choices"] for e in stored]}


def sampled_examples(name: str, count: int, held_out: HeldOut = NOTHING_HELD_OUT) -> Dict[str, list]:
  """`inputs` (texts) of the examples average activation runs for a training task or mixture: each task's
  training examples under the official `max_examples_per_dataset = count`, in its dataset's own order
  (`seqio_tasks.TextSource.sampled_examples`, algorithm.md §5). Held-out tasks and examples are refused."""
  sampled = _text_examples(name, held_out, lambda source: source.sampled_examples("train", count))
  return {"inputs": [example["inputs"] for example in sampled]}


def _text_examples(name: str, held_out: HeldOut, read: Callable) -> list:
  """`read(source)` of each task's text source, concatenated; held-out tasks and input texts refused."""
  names = task_names(name)
  held_out.check_tasks(names)
  examples = []
  for task_name in names:
    source = seqio.get_mixture_or_task(task_name).source
    if not isinstance(source, seqio_tasks.TextSource):
      raise ValueError(f"task {task_name} is not a text task of phatgoose_jax.tasks (its source is "
                       f"{type(source).__name__}); this router reads the texts of its examples")
    examples += read(source)
  held_out.check_texts([example["inputs"] for example in examples])
  return examples


def batches(features: Mapping[str, np.ndarray], batch_size: int) -> List[Dict[str, np.ndarray]]:
  """Consecutive batches (the last one shorter) of a features dict."""
  size = len(next(iter(features.values())))
  return [{k: v[i:i + batch_size] for k, v in features.items()} for i in range(0, size, batch_size)]


def model_features(features: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Only the arrays a model step takes (the texts stay behind)."""
  return {k: v for k, v in features.items() if k != "inputs_pretokenized"}
