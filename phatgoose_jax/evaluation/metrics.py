"""Evaluation metrics of the paper's protocol, in plain numpy / python (algorithm.md §6).

- Rank classification: every answer choice of an example is scored by its mean target-token
  log-likelihood (= minus the length-normalised cross-entropy); the prediction is the choice with the
  HIGHEST score, i.e. the lowest length-normalised cross-entropy.
- Generation: exact match, multiple-answer exact match (any reference matches; both on the strings
  unchanged), and the metrics the official `Scorer` computes with Hugging Face `evaluate`
  (src/data/metrics.py): ROUGE-L F-measure against the best reference, SQuAD v1.1 exact match and F1, corpus
  BLEU (tensorflow/nmt `compute_bleu`).
- Aggregation: a dataset's score is the mean of its metrics; a benchmark's score is the unweighted mean
  over its datasets.

All metrics are fractions in [0, 1].
"""
import collections
import math
import re
import string
from typing import Dict, List, Mapping, Sequence

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


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
  """Fraction of predictions equal to their reference, the strings unchanged: evaluate's "exact_match" with
  its defaults (src/data/metrics.py:122-124, 210-215). Predictions are the official tokenizer's text of the
  generated ids (`vocab.official_decode`)."""
  return multi_answer_exact_match(predictions, [[r] for r in references])


def multi_answer_exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """Fraction of predictions equal to ANY of their example's references, the strings unchanged
  (`ExactMatchMultipleAns`: `pred in ref_list`, src/data/metrics.py:25-32)."""
  _check_lengths(predictions, references)
  return float(np.mean([p in list(refs) for p, refs in zip(predictions, references)]))


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """Mean over predictions of the best ROUGE-L F-measure against any of its references.

  F = 2 P R / (P + R) with P = LCS / |prediction|, R = LCS / |reference| over rouge-score's default tokens
  (lowercased alphanumeric runs, no stemming); several references: the highest F (rouge-score's
  `score_multi`), as evaluate's "rouge" with `rouge_types=["rougeL"]` when a row has a list of references.
  The official number is the median of 1000 bootstrap means (`BootstrapAggregator().mid`), a random estimate
  of this mean.
  """
  _check_reference_lists(predictions, references)
  scorer = rouge_scorer.RougeScorer(["rougeL"])
  return float(np.mean([scorer.score_multi(list(refs), p)["rougeL"].fmeasure
                        for p, refs in zip(predictions, references)]))


def squad_normalize(text: str) -> str:
  """SQuAD v1.1 answer normalisation: lowercase, drop punctuation, drop the articles a/an/the, collapse
  whitespace (evaluate metrics/squad/compute_score.py `normalize_answer`, lines 11-27)."""
  text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
  return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def squad_f1(prediction: str, reference: str) -> float:
  """Token F1 = 2 P R / (P + R) of the normalised answers, P = common / |prediction| and R = common /
  |reference| with common the multiset intersection; 0 when nothing is common (compute_score.py lines 30-40)."""
  predicted, expected = squad_normalize(prediction).split(), squad_normalize(reference).split()
  common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(predicted), common / len(expected)
  return 2 * precision * recall / (precision + recall)


def squad(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> Dict[str, float]:
  """SQuAD v1.1 {exact_match, f1}: the mean over predictions of the best score against any reference, as
  fractions (evaluate's "squad", compute_score.py lines 47-73, divided by 100 as src/data/metrics.py does).

  exact_match = mean_i max_r [norm(p_i) == norm(r)], f1 = mean_i max_r squad_f1(p_i, r).
  """
  _check_reference_lists(predictions, references)
  best = lambda fn: float(np.mean([max(fn(p, r) for r in refs) for p, refs in zip(predictions, references)]))
  return {"exact_match": best(lambda p, r: float(squad_normalize(p) == squad_normalize(r))), "f1": best(squad_f1)}


_13A_RULES = (  # sacrebleu TokenizerRegexp, as copied into evaluate metrics/bleu/tokenizer_13a.py lines 44-56
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # symbols
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period and comma unless preceded by a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period and comma unless followed by a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
)


def tokenize_13a(line: str) -> List[str]:
  """mteval-v13a tokens as evaluate's `Tokenizer13a` (metrics/bleu/tokenizer_13a.py lines 59-100): drop
  "<skipped>" and "-\\n", newlines to spaces, unescape &quot; &amp; &lt; &gt;, split off symbols."""
  line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
  if "&" in line:
    for escaped, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
      line = line.replace(escaped, char)
  line = f" {line} "
  for pattern, replacement in _13A_RULES:
    line = pattern.sub(replacement, line)
  return line.split()


def _ngrams(tokens: Sequence[str], max_order: int) -> collections.Counter:
  return collections.Counter(tuple(tokens[i:i + n]) for n in range(1, max_order + 1)
                             for i in range(len(tokens) - n + 1))


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], max_order: int = 4) -> float:
  """Corpus BLEU of evaluate's "bleu" (13a tokens, `smooth=False`): tensorflow/nmt `compute_bleu`
  (nmt/scripts/bleu.py lines 48-112).

  p_n = sum_i |ngrams_n(pred_i) & max_r ngrams_n(ref_ir)| / sum_i max(0, |pred_i| - n + 1) (clipped counts),
  BLEU = BP * exp(sum_n log(p_n) / N), 0 when any p_n is 0, with BP = 1 if c > r else exp(1 - r / c), c the
  total prediction length and r the total length of each prediction's SHORTEST reference (0 when c = 0).
  """
  _check_reference_lists(predictions, references)
  matches, possible = np.zeros(max_order), np.zeros(max_order)
  prediction_length = reference_length = 0
  for prediction, refs in zip(predictions, references):
    tokens, ref_tokens = tokenize_13a(prediction), [tokenize_13a(r) for r in refs]
    prediction_length += len(tokens)
    reference_length += min(len(r) for r in ref_tokens)
    merged = collections.Counter()
    for ref in ref_tokens:
      merged |= _ngrams(ref, max_order)
    for ngram, count in (_ngrams(tokens, max_order) & merged).items():
      matches[len(ngram) - 1] += count
    possible += np.maximum(len(tokens) - np.arange(max_order), 0)
  if prediction_length == 0 or np.any(matches == 0):
    return 0.0
  ratio = prediction_length / reference_length
  brevity = 1.0 if ratio > 1.0 else math.exp(1 - 1 / ratio)
  return float(brevity * math.exp(np.mean(np.log(matches / possible))))


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


def _check_reference_lists(predictions, references):
  _check_lengths(predictions, references)
  if any(isinstance(refs, str) or not refs for refs in references):
    raise ValueError("each prediction needs a non-empty list of reference texts (wrap a single text in a list)")
