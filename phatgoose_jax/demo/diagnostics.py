"""What explains the demo's table: routing accuracy, confidence intervals, and the score chart.

Routing accuracy of a per-token router on held-in validation data (teacher-forced, non-pad tokens; encoder
tokens for encoder modules and cross-attention key / value, target tokens otherwise, as in
`evaluation/route_stats.py`):

  acc = #{(t, l): own(t) in topk_l(t)} / #{(t, l)}        chance = k / E

over every token t and routed module l, where own(t) is the expert of t's held-in task. The top-k indices of
a token are distinct, so #{(t, l): e in topk} is the count of slots holding e.

Held-out intervals (95%, z = 1.96): per task the Wilson score interval of an accuracy p over n examples,

  (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n);

for the unweighted mean of T task accuracies, mean +- z sqrt(sum_t q_t(1-q_t)/m_t) / T, with the Agresti-Coull
adjusted q_t = (n_t p_t + z^2/2) / m_t, m_t = n_t + z^2 (normal approximation; tasks are independent samples;
the adjustment keeps a task at 0% or 100% from contributing no uncertainty).
"""
import math
from typing import Dict, Mapping, Sequence

import numpy as np

from phatgoose_jax.evaluation import route_stats

Z95 = 1.96


def wilson_interval(p: float, n: int, z: float = Z95) -> list:
  """The Wilson score interval [low, high] of an accuracy p measured on n examples."""
  if n == 0:
    return [0.0, 1.0]
  centre = p + z * z / (2 * n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  scale = 1 + z * z / n
  return [max(0.0, (centre - half) / scale), min(1.0, (centre + half) / scale)]


def mean_interval(scores: Mapping[str, float], counts: Mapping[str, int], z: float = Z95) -> list:
  """[low, high] of the unweighted mean of task accuracies (Agresti-Coull adjusted normal approximation, see
  the module docstring)."""
  mean = sum(scores.values()) / len(scores)
  adjusted = {t: ((counts[t] * p + z * z / 2) / (counts[t] + z * z), counts[t] + z * z) for t, p in scores.items()}
  half = z * math.sqrt(sum(q * (1 - q) / m for q, m in adjusted.values())) / len(scores)
  return [max(0.0, mean - half), min(1.0, mean + half)]


def routing_counts(runner, examples: Sequence[dict], own: int) -> Dict[str, np.ndarray]:
  """`{module: [decisions holding the own expert, decisions]}` over the examples' non-pad tokens."""
  k = runner.model.experts.top_k
  num_experts = runner.model.experts.num_experts
  totals: Dict[str, np.ndarray] = {}
  for start in range(0, len(examples), runner.batch_size):
    chunk = examples[start:start + runner.batch_size]
    batch, state = runner.intermediates([e["inputs"] for e in chunk], [e["target"] for e in chunk])
    for path, slots in route_stats.module_fractions(state, batch, num_experts, len(chunk)).items():
      totals[path] = totals.get(path, 0.0) + np.array([slots[own], slots.sum() / k])
  return totals


def routing_accuracy(counts_per_task: Mapping[str, Mapping[str, np.ndarray]]) -> float:
  """Pooled over tasks and modules: own-expert decisions / decisions."""
  hits = sum(c[0] for per_module in counts_per_task.values() for c in per_module.values())
  total = sum(c[1] for per_module in counts_per_task.values() for c in per_module.values())
  return float(hits / max(total, 1.0))


def plot_scores(methods: Mapping[str, dict], path: str, title: str) -> None:
  """Held-out average per method with its 95% interval, and the held-in average beside it."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  names = list(methods)
  x = np.arange(len(names))
  held_out = np.array([methods[m]["heldout_avg"] for m in names])
  low, high = np.array([methods[m]["heldout_avg_ci"] for m in names]).T
  fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(names), 3.6))
  ax.bar(x - 0.2, 100 * held_out, 0.4, yerr=100 * np.stack([held_out - low, high - held_out]), capsize=3,
         label="held-out average (95% interval)")
  ax.bar(x + 0.2, [100 * methods[m]["heldin_avg"] for m in names], 0.4, label="held-in average", alpha=0.6)
  ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
  ax.set_ylabel("accuracy (%)")
  ax.set_ylim(0, 100)
  ax.legend(fontsize=7)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
