"""Evaluation metrics of the paper's protocol, in plain numpy / python (algorithm.md §6).

- Rank classification: every answer choice of an example is scored by its mean target-token
  log-likelihood (= minus the length-normalised cross-entropy); the prediction is the choice with the
  HIGHEST score, i.e. the lowest length-normalised cross-entropy.
- Generation: exact match, multiple-answer exact match (any reference matches), ROUGE-L F-measure.
- Aggregation: a dataset's score is the mean of its metrics; a benchmark's score is the unweighted mean
  over its datasets.

All metrics are fractions in [0, 1].
"""
from typing import Mapping, Sequence

import numpy as np
from rouge_score import rouge_scorer


def rank_classification_accuracy(scores, example_ids, choice_ids, correct) -> float:
  """Fraction of examples whose highest-scoring choice is a correct one.

  Args:
    scores: <float>[rows] mean log-likelihood of each (example, choice) row (higher is better).
    example_ids: <int>[rows] the example each row belongs to.
    choice_ids: <int>[rows] the choice index of each row inside its example (ties go to the lowest).
    correct: <bool>[rows] whether the row's choice is a correct answer.
  """
  scores, example_ids = np.asarray(scores, np.float64), np.asarray(example_ids)
  choice_ids, correct = np.asarray(choice_ids), np.asarray(correct, bool)
  if scores.size == 0:
    raise ValueError("rank classification needs at least one scored choice")
  order = np.lexsort((choice_ids, -scores, example_ids))
  first = np.ones(order.size, bool)
  first[1:] = example_ids[order][1:] != example_ids[order][:-1]
  return float(correct[order][first].mean())


def _normalize(text: str) -> str:
  return " ".join(text.strip().split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
  """Fraction of predictions equal to their reference (whitespace-normalised, case-sensitive)."""
  _check_lengths(predictions, references)
  return float(np.mean([_normalize(p) == _normalize(r) for p, r in zip(predictions, references)]))


def multi_answer_exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """Fraction of predictions equal to ANY of their example's references."""
  _check_lengths(predictions, references)
  hits = [_normalize(p) in {_normalize(r) for r in refs} for p, refs in zip(predictions, references)]
  return float(np.mean(hits))


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
  """Mean ROUGE-L F-measure (rouge-score package, its default tokenizer, no stemming)."""
  _check_lengths(predictions, references)
  scorer = rouge_scorer.RougeScorer(["rougeL"])
  return float(np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]))


def dataset_score(metrics: Mapping[str, float]) -> float:
  """A dataset's score: the mean of its metrics."""
  if not metrics:
    raise ValueError("a dataset needs at least one metric")
  return float(np.mean(list(metrics.values())))


def benchmark_score(dataset_scores: Mapping[str, float]) -> float:
  """A benchmark's score: the unweighted mean of its datasets' scores."""
  if not dataset_scores:
    raise ValueError("a benchmark needs at least one dataset")
  return float(np.mean(list(dataset_scores.values())))


def _check_lengths(predictions, references):
  if len(predictions) != len(references) or not predictions:
    raise ValueError(f"need as many predictions as references (got {len(predictions)} and {len(references)})")
