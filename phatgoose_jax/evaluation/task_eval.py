"""Evaluate a model, given as two functions, on a registered task or mixture by name (algorithm.md §6).

`score_fn(list of (input_text, target_text)) -> list of mean target-token log-likelihoods` scores answer
choices (rank classification: the highest mean log-likelihood, i.e. the lowest length-normalised
cross-entropy, wins); `generate_fn(list of input_text) -> list of output strings` answers generative
examples (greedy decoding). A task's score is the mean of its metrics, a mixture's the unweighted mean of
its tasks' scores.
"""
from typing import Callable, Optional

from phatgoose_jax.evaluation import metrics
from phatgoose_jax.tasks import flan, get_eval_examples

_GENERATION_METRICS = {
    "exact_match": lambda outputs, exs: metrics.exact_match(outputs, [e["references"][0] for e in exs]),
    "multi_answer_exact_match": lambda outputs, exs: metrics.multi_answer_exact_match(
        outputs, [e["references"] for e in exs]),
    "rouge_l": lambda outputs, exs: metrics.rouge_l(outputs, [e["references"][0] for e in exs]),
}


def _accuracy(examples: list, score_fn: Callable) -> float:
  pairs, example_ids, choice_ids, correct = [], [], [], []
  for i, example in enumerate(examples):
    for j, (choice, is_correct) in enumerate(zip(example["choices"], example["correct"])):
      pairs.append((example["inputs"], choice))
      example_ids.append(i)
      choice_ids.append(j)
      correct.append(is_correct)
  scores = list(score_fn(pairs))
  if len(scores) != len(pairs):
    raise ValueError(f"score_fn returned {len(scores)} scores for {len(pairs)} (input, choice) pairs")
  return metrics.rank_classification_accuracy(scores, example_ids, choice_ids, correct)


def _generation_metric(metric: str, examples: list, generate_fn: Callable) -> float:
  outputs = list(generate_fn([e["inputs"] for e in examples]))
  if len(outputs) != len(examples):
    raise ValueError(f"generate_fn returned {len(outputs)} outputs for {len(examples)} inputs")
  return _GENERATION_METRICS[metric](outputs, examples)


def score_examples(examples: list, score_fn: Callable, generate_fn: Callable) -> dict:
  """{"num_examples", "metrics": {name: value}, "score"} of one task's examples."""
  if not examples:
    raise ValueError("a task with no examples cannot be scored")
  values = {}
  for metric in sorted({e["metric"] for e in examples}):
    group = [e for e in examples if e["metric"] == metric]
    values[metric] = (_accuracy(group, score_fn) if metric == "accuracy"
                      else _generation_metric(metric, group, generate_fn))
  return {"num_examples": len(examples), "metrics": values, "score": metrics.dataset_score(values)}


def evaluate_task(name: str, score_fn: Callable, generate_fn: Callable, max_examples: Optional[int] = None,
                  expert_pool: Optional[str] = None, **dirs) -> dict:
  """Metrics of a task or mixture: {"name", "tasks": {task: {num_examples, metrics, score}}, "score"}.

  `expert_pool` names the experts' pool ("p3" or "flan"); the FLAN pool is refused on T0 held-out tasks.
  `dirs` are data directories (templates_dir, bigbench_dir, flan_dir, data_dir, tfds_dir)."""
  flan.check_evaluation(expert_pool, name)
  results = {task: score_examples(examples, score_fn, generate_fn)
             for task, examples in get_eval_examples(name, max_examples, **dirs).items()}
  return {"name": name, "tasks": results,
          "score": metrics.benchmark_score({task: r["score"] for task, r in results.items()})}
