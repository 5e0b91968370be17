"""Metrics of algorithm.md §6 against hand-computed values and, where one is importable, a reference
implementation (nltk's corpus BLEU, which takes the closest rather than the shortest reference length)."""
import math

import pytest
from nltk.translate import bleu_score

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
  assert metrics.exact_match(["Paris", "the cat", "dog"], ["Paris", "the cat", "Dog"]) == pytest.approx(2 / 3)
  assert metrics.multi_answer_exact_match(["4", "five", "x"], [["four", "4"], ["5"], ["x", "y"]]) == pytest.approx(2 / 3)
  with pytest.raises(ValueError):
    metrics.exact_match(["a"], ["a", "b"])


def test_rouge_l_by_hand_best_of_references():
  # Prediction "the cat sat", reference "the cat sat down": LCS 3, precision 3/3, recall 3/4, F = 6/7.
  assert metrics.rouge_l(["the cat sat"], [["the cat sat down"]]) == pytest.approx(6 / 7)
  # LCS("a b c d", "a c b d") = 3 -> P = R = F = 3/4; averaged with a perfect match: (0.75 + 1) / 2.
  assert metrics.rouge_l(["a b c d", "same"], [["a c b d"], ["same"]]) == pytest.approx(0.875)
  # Several references: the best F counts (score_multi): "a dog" gives 0, "the cat sat down" 6/7; case folded.
  assert metrics.rouge_l(["The Cat sat"], [["a dog", "the cat sat down"]]) == pytest.approx(6 / 7)
  with pytest.raises(ValueError, match="list of reference texts"):
    metrics.rouge_l(["the cat"], ["the cat"])


def test_exact_match_compares_the_decoded_text_as_it_is():
  """evaluate's "exact_match" with no options and `ExactMatchMultipleAns` (`pred in ref_list`) compare the
  strings unchanged (src/data/metrics.py:25-32, 210-215): spacing and case count."""
  assert metrics.exact_match([" the cat", "the  cat", "the cat "], ["the cat"] * 3) == 0.0
  assert metrics.multi_answer_exact_match(["4 ", " 4"], [["4"], ["four", "4"]]) == 0.0


def test_squad_v1_normalisation_exact_match_and_f1_by_hand():
  assert metrics.squad_normalize("  The Cat's  hat, an apple!") == "cats hat apple"
  # Row 1: "The Cat!" normalises to "cat" = the first reference: EM 1, F1 1. Row 2: "blue sky" against
  # "the blue sea" ("blue sea": 1 common token, P = R = 1/2, F1 1/2) and "sky" (P 1/2, R 1, F1 2/3): best 2/3.
  # Row 3: nothing in common: 0.
  got = metrics.squad(["The Cat!", "blue sky", "red"], [["cat", "dog"], ["the blue sea", "sky"], ["green"]])
  assert got == pytest.approx({"exact_match": 1 / 3, "f1": (1 + 2 / 3 + 0) / 3})
  # The article "a" goes: "b b c" vs "b b b d" share the multiset {b, b}: P = 2/3, R = 2/4, F1 = 4/7.
  assert metrics.squad_f1("a b b c", "b b b d") == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))


def test_13a_tokenisation_by_hand():
  assert metrics.tokenize_13a("Hello, world! It's 3.5-4 km.") == [
      "Hello", ",", "world", "!", "It's", "3.5", "-", "4", "km", "."]
  assert metrics.tokenize_13a("a&amp;b <skipped>x-\ny\n(z)") == ["a", "&", "b", "xy", "(", "z", ")"]


def test_bleu_by_hand():
  # Pair 1: unigrams 5/6, bigrams 3/5, trigrams 1/4, 4-grams 0/3; pair 2 matches all 4 + 3 + 2 + 1 n-grams.
  # Corpus precisions 9/10, 6/8, 3/6, 1/4; lengths 10 and 10, so no brevity penalty.
  predictions, references = ["the cat sat on the mat", "a b c d"], [["the cat is on the mat"], ["a b c d"]]
  assert metrics.bleu(predictions, references) == pytest.approx((0.9 * 0.75 * 0.5 * 0.25) ** 0.25)
  # Any order without a match gives 0 (no smoothing).
  assert metrics.bleu(["the cat sat on the mat"], [["the cat is on the mat"]]) == 0.0
  # Brevity penalty against the SHORTEST reference (5 tokens) for a 4-token prediction: exp(1 - 5/4).
  assert metrics.bleu(["a b c d"], [["a b c d e f g", "a b c d e"]]) == pytest.approx(math.exp(1 - 5 / 4))
  # Shortest (2 tokens) rather than closest (7): no penalty, where nltk's closest-length rule gives exp(1 - 7/6).
  assert metrics.bleu(["a b c d e f"], [["a b", "a b c d e f g"]]) == pytest.approx(1.0)
  assert metrics.bleu([""], [["a b"]]) == 0.0


def test_bleu_equals_nltk_where_closest_is_shortest():
  predictions = ["the quick brown fox jumps over the dog .", "a stitch in time saves nine", "to be or not to be"]
  references = [["the fast brown fox jumped over the lazy dog ."], ["a stitch in time saves nine"],
                ["to be , or not to be : that is the question", "to be or not to be"]]
  tokens = [[metrics.tokenize_13a(r) for r in refs] for refs in references]
  expected = bleu_score.corpus_bleu(tokens, [metrics.tokenize_13a(p) for p in predictions])
  assert metrics.bleu(predictions, references) == pytest.approx(expected) and 0 < expected < 1


def test_dataset_and_benchmark_scores():
  assert metrics.dataset_score({"exact_match": 0.5, "rouge_l": 0.7}) == pytest.approx(0.6)
  assert metrics.benchmark_score({"a": 0.6, "b": 0.2, "c": 0.1}) == pytest.approx(0.3)
  with pytest.raises(ValueError):
    metrics.benchmark_score({})
