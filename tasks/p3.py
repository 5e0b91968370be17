"""The P3 expert pool and the T0 held-out evaluation as the official PHATGOOSE code builds them (algorithm.md §6).

Official code: `src/data/p3.py` (`P3Dataset`) with the settings of `colm/datasets/p3_t5xl.gin`, pinned per
dataset in `sources.P3_HELD_IN` / `sources.T0_HELD_OUT`:

- Templates are promptsource's, in `DatasetTemplates.all_template_names` order (sorted by name), minus the
  dataset's `ignore_templates` (p3.py lines 53-73); trec uses one fixed template instead (lines 327-395).
- `p3_<key>` (training, gin TRAIN scopes): every template, the rows of the train split; when rows x templates
  exceeds 500,000, a sample of 500,000 (row, template) pairs drawn by `np.random.default_rng(42).choice(rows *
  templates, 500_000, replace=False)` (p3.py lines 96-112; `Dataset` seed 42, dataset.py line 67), pair index
  i being row i // templates and template i % templates. A rendering with no "|||" part, or that fails, trains
  as "<NO INPUT>" -> "<NO INPUT>"; an empty target as "<NO LABEL>" (p3.py lines 133-143). The pairs are served
  row by row (training shuffles them); retrieval stores the first pairs in the order drawn, with their answer
  choices (`stored_examples`).
- `p3_<key>_eval` (gin EVAL scopes) and `t0_<key>`: the original-task templates (or all, `eval_templates`);
  a seeded sample of `max_eval_rows` rows first (p3.py lines 87-95); round robin (row i with template
  i mod T, lines 114-130) for the held-in datasets, every (row, template) pair for T0 held-out; multiple-choice
  pairs are scored by rank classification with the official label `find_label` of the target among the
  template's answer choices. Generative pairs are scored by the metrics of the dataset's EVAL scope
  (`DatasetSource.eval_metrics`: SQuAD, BLEU and/or ROUGE-L) against the references its official dataset class
  gives (`official_references`: e.g. every answer of a SQuAD-style row, the summary). Pairs whose
  template renders no target are skipped: the evaluation splits used here are fully labelled, so the official
  code never meets one.
- app_reviews has a train split only: after `np.random.RandomState(1234).shuffle`, its first 10,000 rows are
  evaluated and the rest trained on (p3.py lines 315-324).
"""
import itertools
from typing import Iterator, Optional

import numpy as np

from phatgoose_jax.tasks import bigbench, promptsource, readers, seqio_tasks, sources

NO_INPUT = "<NO INPUT>"
NO_LABEL = "<NO LABEL>"
SEED = seqio_tasks.SAMPLE_SEED  # src/data/dataset.py line 67: Dataset(seed=42) -> np.random.default_rng(seed)
MAX_TRAIN_PAIRS = 500_000  # colm/datasets/p3_t5xl.gin: TRAIN max_examples_per_dataset
HOLDOUT_SEED = 1234  # src/data/p3.py line 319

# src/data/p3.py lines 329-380 (TrecTemplate.answer_choices), in the official order and spelling.
TREC_CHOICES = (
    "Abbreviation.", "Expression abbreviated.", "Animal.", "Organ of body.", "Color.",
    "Invention, book and other creative piece.", "Currency name.", "Disease and medicine.", "Event.", "Food.",
    "Musical instrument.", "Language.", "Letter like a-z.", "Other entity.", "Plant.", "Product.", "Religion.",
    "Sport.", "Element and substance.", "Symbols and sign.", "Techniques and method.", "Equivalent term.",
    "Vehicle.", "Word with a special property.", "Definition of something.", "Description of something.",
    "Manner of an action.", "Reason.", "Group or organization of persons", "Individual.", "Title of a person.",
    "Description of a person.", "City.", "Country.", "Mountain.", "Other location.", "State.",
    "Postcode or other code.", "Number of something.", "Date.", "Distance, linear measure.", "Price.",
    "Order, rank.", "Other number.", "Lasting time of something.", "Percent, fraction.", "Speed.", "Temperature.",
    "Size, area and volume.", "Weight.",
)
# TrecTemplate.apply (p3.py lines 382-384): f"Question: {text}\nAnswer choices: {choices}\nAnswer:" -> choice.
TREC_TEMPLATE = promptsource.Template(
    id="trec", name="trec", jinja="Question: {{text}}\nAnswer choices: " + str(list(TREC_CHOICES))
    + "\nAnswer: ||| {{answer_choices[fine_label]}}", answer_choices=" ||| ".join(TREC_CHOICES),
    original_task=True, metrics=("Accuracy",))


def templates(source: sources.DatasetSource, train: bool) -> list:
  """The official templates of a dataset for training (all) or evaluation (`eval_templates`), sorted by name,
  minus its ignored templates."""
  if source.key == "trec":
    return [TREC_TEMPLATE]
  ignored = set(source.ignore_templates) | (set() if train else set(source.eval_ignore_templates))
  original_only = not train and source.eval_templates == "original"
  chosen = promptsource.load_templates(source.templates, original_task_only=original_only)
  return sorted((t for t in chosen if t.name not in ignored), key=lambda t: t.name)


def _rows(source: sources.DatasetSource, split: str, train: bool):
  """Rows of a split; for a dataset with `eval_holdout`, its train split shuffled by RandomState(1234) and cut."""
  if source.eval_holdout is None:
    return readers.read_split(source, split)
  rows = list(readers.read_split(source, source.train_split))
  rows = [rows[i] for i in np.random.RandomState(HOLDOUT_SEED).permutation(len(rows))]
  return rows[source.eval_holdout:] if train else rows[:source.eval_holdout]


def sampled_pairs(num_rows: int, num_templates: int, cap: int = MAX_TRAIN_PAIRS) -> np.ndarray:
  """The flat indices row * num_templates + template of the pairs the official code trains on, in its dataset's
  own index order (src/data/p3.py:96-112, 123-124): all of them in order, or `cap` drawn without replacement by
  default_rng(42), in the order drawn (`seqio_tasks.drawn`)."""
  return seqio_tasks.drawn(num_rows * num_templates, cap)


def train_pairs(num_rows: int, num_templates: int, cap: int = MAX_TRAIN_PAIRS) -> list:
  """The (row, template) index pairs of `sampled_pairs`, sorted (training reads them row by row)."""
  return [divmod(int(i), num_templates) for i in np.sort(sampled_pairs(num_rows, num_templates, cap))]


def train_pair(template: promptsource.Template, row: dict) -> dict:
  """{inputs, targets} of one (row, template) as the official training data: "<NO INPUT>" twice when the
  rendering does not split into input and target (or fails), "<NO LABEL>" for an empty target."""
  try:
    parts = promptsource.apply(template, row)
  except Exception:  # pylint: disable=broad-except  # the official code catches everything (p3.py line 135)
    parts = []
  if len(parts) != 2:
    return {"inputs": NO_INPUT, "targets": NO_INPUT}
  return {"inputs": parts[0], "targets": parts[1] or NO_LABEL}


def train_examples(source: sources.DatasetSource, split: str = "train") -> Iterator[dict]:
  """{inputs, targets} of the official training pairs of the dataset (see module docstring)."""
  chosen = templates(source, train=True)
  num_rows = sum(1 for _ in _rows(source, split, train=True))
  by_row = {row: [t for _, t in pairs] for row, pairs in
            itertools.groupby(train_pairs(num_rows, len(chosen), MAX_TRAIN_PAIRS), key=lambda pair: pair[0])}
  for index, row in enumerate(_rows(source, split, train=True)):
    for template in by_row.get(index, ()):
      yield train_pair(chosen[template], row)


def stored_examples(source: sources.DatasetSource, count: int, split: str = "train") -> list:
  """{inputs, targets, answer_choices} of the first `count` training pairs in the official dataset's own index
  order, the examples retrieval stores (algorithm.md §5): item i is the i-th pair drawn (`sampled_pairs`,
  src/data/p3.py:104-108, 123-124), not the i-th sorted one; `answer_choices` is the template's list for the
  row, [] for a template without answer choices (lines 144-146)."""
  return _drawn_examples(source, split, lambda num_rows, num_templates: sampled_pairs(
      num_rows, num_templates, MAX_TRAIN_PAIRS)[:count])


def sampled_examples(source: sources.DatasetSource, count: int, split: str = "train") -> list:
  """{inputs, targets, answer_choices} of the pairs the official dataset serves under
  `max_examples_per_dataset = count`, the sample average activation runs (algorithm.md §5;
  colm/experiments/bash_scripts/reinit_router_embedding.sh:103): `count` of all rows x templates pairs (not of the
  500,000 trained on), drawn by default_rng(42), in the order drawn (src/data/p3.py:96-112, 123-124)."""
  return _drawn_examples(source, split, lambda num_rows, num_templates: sampled_pairs(num_rows, num_templates, count))


def _drawn_examples(source: sources.DatasetSource, split: str, indices_fn) -> list:
  """{inputs, targets, answer_choices} of the training pairs at flat indices `indices_fn(num_rows, num_templates)`,
  in that order."""
  chosen = templates(source, train=True)
  num_rows = sum(1 for _ in _rows(source, split, train=True))
  pairs = [divmod(int(i), len(chosen)) for i in indices_fn(num_rows, len(chosen))]
  wanted = {row for row, _ in pairs}
  rows = {i: row for i, row in enumerate(_rows(source, split, train=True)) if i in wanted}
  return [dict(train_pair(chosen[t], rows[r]), answer_choices=promptsource.answer_choices(chosen[t], rows[r]) or [])
          for r, t in pairs]


def eval_example(template: promptsource.Template, row: dict, source: sources.DatasetSource) -> Optional[dict]:
  """One evaluation example from a row and a template, or None if it renders no target: rank classification
  among the template's answer choices, else generation scored by `source.eval_metrics` (comma-separated in
  `metric`) against `official_references`."""
  parts = promptsource.apply(template, row)
  if len(parts) != 2 or not parts[1]:
    return None
  choices = promptsource.answer_choices(template, row)
  if choices:
    label = bigbench.text_label(parts[1], choices)
    return dict(inputs=parts[0], target=parts[1], choices=choices,
                correct=[i == label for i in range(len(choices))], references=[parts[1]], metric="accuracy")
  if not source.eval_metrics:
    raise ValueError(f"template {template.name!r} generates its answer: its dataset needs the official EVAL "
                     "metrics (tasks/sources.py DatasetSource.eval_metrics)")
  return dict(inputs=parts[0], target=parts[1], choices=[], correct=[],
              references=official_references(source, row, parts[1]),
              metric=seqio_tasks.METRIC_SEPARATOR.join(source.eval_metrics))


def official_references(source: sources.DatasetSource, row: dict, target: str) -> list:
  """The references the official dataset class gives a generative row: its `source.references_field`
  ("answers.text" reads a nested field; one text is one reference), else the rendered target. A row marked
  `no_answer` (duorc) keeps the rendered target: `P3DuorcDataset` (src/data/p3.py lines 237-254) renders row
  i's no-answer branch with template i mod T: duorc evaluates every row, so that is the template round robin
  pairs it with."""
  if source.references_field is None or row.get("no_answer"):
    return [target]
  value = row
  for key in source.references_field.split("."):
    value = value[key]
  return [value] if isinstance(value, str) else list(value)


def eval_pairs(num_rows: int, num_templates: int, round_robin: bool) -> list:
  """(row, template) index pairs of an evaluation: row i with template i mod T (round robin), else all."""
  if round_robin:
    return [(i, i % num_templates) for i in range(num_rows)]
  return [(i, t) for i in range(num_rows) for t in range(num_templates)]


def eval_examples(source: sources.DatasetSource, split: Optional[str] = None) -> Iterator[dict]:
  """The official evaluation (row, template) pairs of the dataset's evaluation split, in official order."""
  chosen = templates(source, train=False)
  rows = list(_rows(source, split or source.eval_split, train=False))
  if source.max_eval_rows is not None and len(rows) > source.max_eval_rows:
    rows = [rows[i] for i in np.random.default_rng(SEED).choice(len(rows), source.max_eval_rows, replace=False)]
  for row, template in eval_pairs(len(rows), len(chosen), source.round_robin):
    example = eval_example(chosen[template], rows[row], source)
    if example is not None:
      yield example


def _split_of(source: sources.DatasetSource, split: str) -> str:
  return source.train_split if split == "train" else source.eval_split


def register_dataset(name: str, source: sources.DatasetSource) -> str:
  """Registers the training task `name` (`train_examples`) and its evaluation task `<name>_eval`
  (`eval_examples`) of one dataset; their "validation" split is the dataset's evaluation split. A dataset without
  EVAL metrics is multiple choice (a template without answer choices is refused, `eval_example`), so its
  evaluation task carries only the rank-classification metric. Returns `name`."""
  train = seqio_tasks.text_source(
      lambda split, s=source: train_examples(s, _split_of(s, split)), seqio_tasks.TRAIN_SIGNATURE,
      stored_fn=lambda split, count, s=source: stored_examples(s, count, _split_of(s, split)),
      sampled_fn=lambda split, count, s=source: sampled_examples(s, count, _split_of(s, split)))
  seqio_tasks.add_task(name, train, evaluation=False)
  evaluation = seqio_tasks.text_source(
      lambda split, s=source: eval_examples(s, _split_of(s, split)), seqio_tasks.EVAL_SIGNATURE)
  seqio_tasks.add_task(f"{name}_eval", evaluation, evaluation=True, generative=bool(source.eval_metrics))
  return name


def register() -> None:
  """Registers the P3 training / evaluation tasks, the T0 held-out tasks and their mixtures."""
  for source in sources.P3_HELD_IN:
    register_dataset(f"p3_{source.key}", source)
  for source in sources.T0_HELD_OUT:
    evaluation = seqio_tasks.text_source(
        lambda split, s=source: eval_examples(s), seqio_tasks.EVAL_SIGNATURE, splits=("validation",))
    seqio_tasks.add_task(f"t0_{source.key}", evaluation, evaluation=True, generative=bool(source.eval_metrics))
  seqio_tasks.add_mixture("p3_held_in", [f"p3_{s.key}" for s in sources.P3_HELD_IN])
  seqio_tasks.add_mixture("p3_held_in_eval", [f"p3_{s.key}_eval" for s in sources.P3_HELD_IN])
  seqio_tasks.add_mixture("t0_held_out", [f"t0_{s.key}" for s in sources.T0_HELD_OUT])
