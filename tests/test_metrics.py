"""Metrics of algorithm.md §6 against hand-computed values."""
import pytest

from phatgoose_jax.evaluation import metrics


def test_rank_classification_picks_highest_mean_log_likelihood():
  # Example 0: choice 1 has the highest score (-0.5) and is correct. Example 1: choice 0 (-0.2) wins, wrong.
  # Example 2: a tie between choices 0 and 1 goes to choice 0, which is correct. Rows are shuffled.
  scores = [-1.0, -0.5, -0.2, -0.9, -0.3, -0.3, -2.0]
  example_ids = [0, 0, 1, 1, 2, 2, 0]
  choice_ids = [0, 1, 0, 1, 1, 0, 2]
  correct = [False, True, False, True, False, True, False]
  assert metrics.rank_classification_accuracy(scores, example_ids, choice_ids, correct) == pytest.approx(2 / 3)


def test_rank_classification_counts_any_correct_choice():
  assert metrics.rank_classification_accuracy([-1.0, -2.0, -3.0], [7, 7, 7], [0, 1, 2], [True, False, True]) == 1.0
  with pytest.raises(ValueError):
    metrics.rank_classification_accuracy([], [], [], [])


def test_exact_match_and_multi_answer():
  assert metrics.exact_match(["Paris", " the  cat ", "dog"], ["Paris", "the cat", "Dog"]) == pytest.approx(2 / 3)
  assert metrics.multi_answer_exact_match(["4", "five", "x"], [["four", "4"], ["5"], ["x", "y"]]) == pytest.approx(2 / 3)
  with pytest.raises(ValueError):
    metrics.exact_match(["a"], ["a", "b"])


def test_rouge_l_by_hand():
  # Prediction "the cat sat", reference "the cat sat down": LCS 3, precision 3/3, recall 3/4, F = 6/7.
  assert metrics.rouge_l(["the cat sat"], ["the cat sat down"]) == pytest.approx(6 / 7)
  # LCS("a b c d", "a c b d") = 3 -> P = R = F = 3/4; averaged with a perfect match: (0.75 + 1) / 2.
  assert metrics.rouge_l(["a b c d", "same"], ["a c b d", "same"]) == pytest.approx(0.875)


def test_dataset_and_benchmark_scores():
  assert metrics.dataset_score({"exact_match": 0.5, "rouge_l": 0.7}) == pytest.approx(0.6)
  assert metrics.benchmark_score({"a": 0.6, "b": 0.2, "c": 0.1}) == pytest.approx(0.3)
  with pytest.raises(ValueError):
    metrics.benchmark_score({})
