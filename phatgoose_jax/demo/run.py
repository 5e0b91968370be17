"""The demo: the whole PHATGOOSE pipeline on the synthetic suite (`demo/suite.py`), offline, on CPU.

  phatgoose demo [--workdir DIR] [--seed N] [--smoke]

Stages, all through `pipeline` (the same functions as the CLI) and one expert library:
  1. pre-train a tiny T5 base on the copy task `demo_pretrain` (full training from scratch);
  2. for each of the six held-in skills, as an independent contributor would: a LoRA expert, then its gate;
  3. the multitask reference: one LoRA on the union of the held-in data (a separate library);
  4. evaluate on the three held-out tasks: base, every single expert (best_individual), merged, uniform,
     average_activation, arrow, retrieval, phatgoose, multitask, oracle;
  5. routing statistics of PHATGOOSE on the held-out tasks -> `routing.png`.
Writes `DIR/results.json` = {"methods": {method: {"heldout": {task: score}, "heldout_avg": score}},
"seconds": total} plus `DIR/results.md` and per-stage outputs; the same `--seed` gives the same scores.
Sizes and step counts are bound in `gin/demo.gin` (`gin/demo_smoke.gin` for the reduced test run).
"""
import json
import os
import time
from typing import Dict, Optional

import gin
import jax

from phatgoose_jax import pipeline
from phatgoose_jax.demo import suite
from phatgoose_jax.evaluation import evaluator, route_stats

ROUTED_METHODS = ("merged", "uniform", "average_activation", "arrow", "retrieval", "phatgoose")
METHODS = ("base", "best_individual") + ROUTED_METHODS + ("multitask", "oracle")


def enable_compilation_cache(cache_dir: str) -> None:
  """Reuse compiled steps across the stages that share a program (every expert, every gate). A cache
  directory configured already (e.g. by JAX_COMPILATION_CACHE_DIR) is kept."""
  if jax.config.jax_compilation_cache_dir:
    return
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _scores(results: dict) -> dict:
  tasks = {t: r["score"] for t, r in results["tasks"].items()}
  return {"heldout": tasks, "heldout_avg": results["score"]}


def train_contributors(base: str, library: str, workdir: str, seed: int, expert_steps: int, gate_steps: int):
  """Each held-in skill's expert, then its gate, trained from that skill's data only."""
  for i, task in enumerate(suite.HELD_IN_TASKS):
    pipeline.train_expert(base=base, task=task, library=library, num_steps=expert_steps, seed=seed + i,
                          workdir=os.path.join(workdir, "train", f"{task}_expert"))
    pipeline.train_gate(base=base, library=library, name=task, num_steps=gate_steps, seed=seed + i,
                        workdir=os.path.join(workdir, "train", f"{task}_gate"))


def evaluate_methods(base: str, library: str, multitask: str, workdir: str) -> Dict[str, dict]:
  """Held-out results of every method of the table."""
  def run(method, **kwargs):
    return pipeline.evaluate(task=suite.HELD_OUT_MIXTURE, output_dir=os.path.join(workdir, "eval", method),
                             base=base, method=method, **kwargs)

  results = {"base": run("base")}
  singles = {task: run(f"single_{task}", library=library, router="merged", names=[task])
             for task in suite.HELD_IN_TASKS}
  results["best_individual"] = max(singles.values(), key=lambda r: r["score"])
  for router in ROUTED_METHODS:
    results[router] = run(router, library=library, router=router)
  results["multitask"] = run("multitask", library=multitask, router="merged", names=["multitask"])
  labels = {task: suite.held_in_task(suite.oracle_skill(task)) for task in suite.HELD_OUT_TASKS}
  results["oracle"] = run("oracle", library=library, router="oracle", router_options={"oracle_labels": labels})
  return results


def routing_figure(base: str, library: str, workdir: str) -> str:
  """PHATGOOSE's expert choices per held-out task and layer, as `routing.png`."""
  stats = pipeline.route_stats(task=suite.HELD_OUT_MIXTURE, output_dir=os.path.join(workdir, "route_stats"),
                               base=base, library=library, router="phatgoose")
  path = os.path.join(workdir, "routing.png")
  route_stats.plot(stats, path, [t[len(suite.PREFIX):] for t in suite.HELD_IN_TASKS],
                   title="PHATGOOSE on held-out tasks: share of top-2 slots per expert")
  return path


@gin.configurable
def run_demo(workdir: str, seed: int = 0, train_examples: int = 4000, validation_examples: int = 200,
             held_out_examples: int = 100, base_steps: int = 1500, expert_steps: int = 300, gate_steps: int = 100,
             multitask_steps: int = 600, clock: Optional[float] = None, cache_dir: Optional[str] = None) -> dict:
  """Runs the demo into `workdir` and returns what `results.json` holds (`clock`: when the run started;
  `cache_dir`: JAX's persistent compilation cache, `workdir/jax_cache` unless one is configured)."""
  started = time.time() if clock is None else clock
  os.makedirs(workdir, exist_ok=True)
  enable_compilation_cache(cache_dir or os.path.join(workdir, "jax_cache"))
  suite.register(seed, suite.SuiteSizes(train_examples, validation_examples, held_out_examples))
  pipeline.declare_held_out(suite.HELD_OUT_TASKS, suite.is_held_out)
  base = pipeline.train_multitask(task=suite.PRETRAIN_TASK, output=os.path.join(workdir, "base"),
                                  workdir=os.path.join(workdir, "train", "base"), finetune="full",
                                  num_steps=base_steps, seed=seed)
  library = os.path.join(workdir, "library")
  train_contributors(base, library, workdir, seed, expert_steps, gate_steps)
  multitask = pipeline.train_multitask(task=suite.HELD_IN_MIXTURE, output=os.path.join(workdir, "multitask"),
                                       workdir=os.path.join(workdir, "train", "multitask"), base=base,
                                       finetune="lora", num_steps=multitask_steps, seed=seed)
  results = evaluate_methods(base, library, multitask, workdir)
  routing_figure(base, library, workdir)
  summary = {"methods": {m: _scores(results[m]) for m in METHODS}, "seconds": round(time.time() - started, 1)}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(summary, f, indent=2)
  table = evaluator.markdown_table({m: s["heldout"] for m, s in summary["methods"].items()}, "heldout_avg")
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  return summary
