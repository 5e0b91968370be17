"""Which experts the router chooses, per dataset and per layer: the paper's qualitative routing figure.

For every routed module l and dataset D, over the non-pad tokens t that module sees (encoder tokens for
encoder modules and cross-attention key / value, target tokens otherwise) of D's examples, teacher-forced
on their targets:

  fraction_{D,l}(e) = #{(t, j): route_index_{l,t,j} = e, j < k} / #{(t, j)}

i.e. the share of the top-k slots that expert e fills. The indices come from the `route_index` values the
routed layers sow into the `intermediates` collection. Written as `route_stats.json`
(`{dataset: {module: [fraction per expert]}}`) and one heatmap PNG per dataset (modules x experts).
"""
import json
import os
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from phatgoose_jax import tasks
from phatgoose_jax.routers.average_activation import uses_encoder_mask

ROUTE_INDEX = "route_index"


def module_fractions(intermediates: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray],
                     num_experts: int, rows: int) -> Dict[str, np.ndarray]:
  """`{module: counts <float64>[E]}` of top-k choices over the first `rows` examples' non-pad tokens."""
  counts = {}
  for key, index in intermediates.items():
    path, leaf = key.rsplit("/", 1)
    if leaf != ROUTE_INDEX:
      continue
    tokens = batch["encoder_input_tokens"] if uses_encoder_mask(path) else batch["decoder_target_tokens"]
    mask = np.asarray(tokens)[:rows] > 0
    chosen = np.asarray(index)[:rows][mask].reshape(-1)
    counts[path] = np.bincount(chosen, minlength=num_experts).astype(np.float64)
  return counts


def collect(name: str, runner, max_examples: Optional[int] = 200, **dirs) -> Dict[str, Dict[str, list]]:
  """`{task: {module: [fraction per expert]}}` for every task of the task or mixture `name`."""
  num_experts = runner.model.experts.num_experts
  stats = {}
  for task, examples in tasks.get_eval_examples(name, max_examples, **dirs).items():
    totals: Dict[str, np.ndarray] = {}
    for start in range(0, len(examples), runner.batch_size):
      chunk = examples[start:start + runner.batch_size]
      batch, state = runner.intermediates([e["inputs"] for e in chunk], [e["target"] for e in chunk])
      for path, c in module_fractions(state, batch, num_experts, len(chunk)).items():
        totals[path] = totals.get(path, 0.0) + c
    stats[task] = {p: (c / max(c.sum(), 1.0)).tolist() for p, c in sorted(totals.items(), key=_module_order)}
  return stats


def _module_order(item) -> tuple:
  stack, layer, block, kind = item[0].split("/")
  return (stack != "encoder", int(layer.split("_")[1]), block, kind)


def plot(stats: Mapping[str, Mapping[str, list]], path: str, expert_names: Optional[Sequence[str]] = None,
         title: str = "share of top-k routing slots per expert") -> None:
  """One heatmap per dataset, side by side: rows are modules (model order), columns experts."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  tasks = list(stats)
  modules = list(next(iter(stats.values())))
  num_experts = len(next(iter(stats[tasks[0]].values())))
  labels = list(expert_names) if expert_names else [str(e) for e in range(num_experts)]
  fig, axes = plt.subplots(1, len(tasks), figsize=(2.5 + 0.45 * num_experts * len(tasks), 1.5 + 0.18 * len(modules)),
                           squeeze=False)
  for ax, task in zip(axes[0], tasks):
    image = ax.imshow(np.array([stats[task][m] for m in modules]), aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_title(task, fontsize=8)
    ax.set_xticks(range(num_experts), labels, rotation=90, fontsize=6)
    ax.set_yticks(range(len(modules)), modules if ax is axes[0][0] else [""] * len(modules), fontsize=5)
    fig.colorbar(image, ax=ax, fraction=0.05)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _file_name(task: str) -> str:
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in task) + ".png"


def write(stats: Mapping[str, Mapping[str, list]], output_dir: str,
          expert_names: Optional[Sequence[str]] = None) -> Dict[str, str]:
  """`route_stats.json` and one heatmap per dataset in `output_dir`; returns {task: png path}."""
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, "route_stats.json"), "w") as f:
    json.dump({"experts": list(expert_names) if expert_names else None, "stats": stats}, f, indent=2)
  paths = {}
  for task, per_module in stats.items():
    paths[task] = os.path.join(output_dir, _file_name(task))
    plot({task: per_module}, paths[task], expert_names)
  return paths
