"""The P3 expert pool and the T0 held-out evaluation, as seqio tasks over promptsource templates (algorithm.md §6).

- `p3_<key>`: training on the 36 held-in datasets, every template of the dataset; mixture `p3_held_in`.
- `p3_<key>_eval`: evaluation over the dataset's original-task templates.
- `t0_<key>`: the 11 T0 held-out datasets; every (example, original-task template) pair is one example,
  scored by rank classification over the template's answer choices; mixture `t0_held_out`.
Examples whose template renders no target (e.g. unlabeled rows), or a target outside its answer choices,
are skipped, as P3 does.
"""
from typing import Iterator, Optional

from phatgoose_jax.tasks import promptsource, readers, seqio_tasks, sources


def train_examples(source: sources.DatasetSource, split: str = "train") -> Iterator[dict]:
  """{inputs, targets} for every (row, template) of the dataset with a non-empty target."""
  templates = promptsource.load_templates(source.templates)
  for row in readers.read_split(source, split):
    for template in templates:
      parts = promptsource.apply(template, row)
      if len(parts) > 1 and parts[1]:
        yield {"inputs": parts[0], "targets": parts[1]}


def eval_example(template: promptsource.Template, row: dict) -> Optional[dict]:
  """One evaluation example from a row and an original-task template, or None if it has no usable target."""
  parts = promptsource.apply(template, row)
  if len(parts) < 2 or not parts[1]:
    return None
  choices = promptsource.answer_choices(template, row)
  if choices:
    if parts[1] not in choices:
      return None
    return dict(inputs=parts[0], target=parts[1], choices=choices, correct=[c == parts[1] for c in choices],
                references=[parts[1]], metric="accuracy")
  metric = "rouge_l" if "ROUGE" in template.metrics else "exact_match"
  return dict(inputs=parts[0], target=parts[1], choices=[], correct=[], references=[parts[1]], metric=metric)


def eval_examples(source: sources.DatasetSource, split: Optional[str] = None) -> Iterator[dict]:
  """Every (row, original-task template) pair of the dataset's evaluation split, row-major."""
  templates = promptsource.load_templates(source.templates, original_task_only=True)
  for row in readers.read_split(source, split or source.eval_split):
    for template in templates:
      example = eval_example(template, row)
      if example is not None:
        yield example


def _split_of(source: sources.DatasetSource, split: str) -> str:
  return source.train_split if split == "train" else source.eval_split


def register() -> None:
  """Registers the P3 training / evaluation tasks, the T0 held-out tasks and their mixtures."""
  for source in sources.P3_HELD_IN:
    train = seqio_tasks.text_source(
        lambda split, s=source: train_examples(s, _split_of(s, split)), seqio_tasks.TRAIN_SIGNATURE)
    seqio_tasks.add_task(f"p3_{source.key}", train, evaluation=False)
    evaluation = seqio_tasks.text_source(
        lambda split, s=source: eval_examples(s, _split_of(s, split)), seqio_tasks.EVAL_SIGNATURE)
    seqio_tasks.add_task(f"p3_{source.key}_eval", evaluation, evaluation=True)
  for source in sources.T0_HELD_OUT:
    evaluation = seqio_tasks.text_source(
        lambda split, s=source: eval_examples(s), seqio_tasks.EVAL_SIGNATURE, splits=("validation",))
    seqio_tasks.add_task(f"t0_{source.key}", evaluation, evaluation=True)
  seqio_tasks.add_mixture("p3_held_in", [f"p3_{s.key}" for s in sources.P3_HELD_IN])
  seqio_tasks.add_mixture("p3_held_in_eval", [f"p3_{s.key}_eval" for s in sources.P3_HELD_IN])
  seqio_tasks.add_mixture("t0_held_out", [f"t0_{s.key}" for s in sources.T0_HELD_OUT])
