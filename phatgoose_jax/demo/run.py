"""The demo: the whole PHATGOOSE pipeline on a synthetic suite, offline, on CPU.

  phatgoose demo [--suite tokens|keyword] [--workdir DIR] [--seed N] [--smoke]

Suites: `tokens` (default, `demo/suite_tokens.py`: six held-in tasks over disjoint alphabets) and `keyword`
(`demo/suite.py`: six string skills on the same words, told apart only by a keyword). Stages, all through
the stage functions (the same as the CLI's) and one expert library:
  1. pre-train a tiny T5 base on the suite's pretraining task (full training from scratch);
  2. for each held-in task, as an independent contributor would: a LoRA expert, then its gate;
  3. the multitask reference: one LoRA on the union of the held-in data (a separate library),
     beside stage 2 (`concurrency` = 2 training stages at a time; results do not depend on it);
  4. evaluate on the held-in validation tasks and the held-out tasks: base, every single expert
     (best_individual: best held-out average), merged, uniform, average_activation, arrow, spectr, retrieval
     (`retrieval_t5`: the base encoder embeds), phatgoose, multitask, oracle;
  5. diagnostics (`demo/diagnostics.py`): routing accuracy of every per-token router on held-in validation
     data, 95% intervals of the held-out scores, PHATGOOSE's routing per layer (`routing.png` on held-in
     tasks, `routing_heldout.png`) and the score chart (`scores.png`).
Writes `DIR/results.json` = {"suite", "seed", "num_examples": {held-out task: n}, "methods": {method:
{"heldout": {task: score}, "heldout_avg", "heldout_ci": {task: [low, high]}, "heldout_avg_ci", "heldin": {task:
score}, "heldin_avg", "routing_accuracy", "routing_chance"}}, "seconds"} plus `DIR/results.md`; the same
`--seed` gives the same scores. Sizes and step counts are bound in `gin/demo.gin` (`gin/demo_smoke.gin` for
the reduced test run).
"""
import json
import os
import time
from concurrent import futures
from typing import Dict, Optional

import gin
import jax

from phatgoose_jax import assembly, data, routers, tasks, train
from phatgoose_jax import evaluate as stages
from phatgoose_jax.demo import diagnostics, suite, suite_tokens
from phatgoose_jax.evaluation import evaluator, metrics, route_stats

SUITES = {"tokens": suite_tokens, "keyword": suite}
ROUTED_METHODS = ("merged", "uniform", "average_activation", "arrow", "spectr", "retrieval", "phatgoose")
PER_TOKEN_METHODS = tuple(m for m in ROUTED_METHODS if m in routers.PER_TOKEN)
METHODS = ("base", "best_individual") + ROUTED_METHODS + ("multitask", "oracle")
# The demo installs without sentence-transformers: its retrieval row embeds with the base T5 encoder.
DEMO_ROUTERS = {"retrieval": "retrieval_t5"}


def enable_compilation_cache(cache_dir: str) -> None:
  """Reuse compiled steps across the stages that share a program (every expert, every gate). A cache
  directory configured already (e.g. by JAX_COMPILATION_CACHE_DIR) is kept."""
  if jax.config.jax_compilation_cache_dir:
    return
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# ---- the stages the demo calls (all of its calls into `train`, `stages` and `assembly`) -------------------


def train_models(s, workdir: str, seed: int, steps: dict, held_out: data.HeldOut, concurrency: int) -> tuple:
  """(base, library, multitask library): the base, then, `concurrency` at a time as independent contributors
  would (each from its own data only), every held-in task's expert followed by its gate, and the multitask
  reference. Each stage's result does not depend on what runs beside it (the same compiled programs on the
  same inputs), so `concurrency` changes only the wall time."""
  base = train.train_multitask(task=s.PRETRAIN_TASK, output=os.path.join(workdir, "base"),  # the base's own data
                               workdir=os.path.join(workdir, "train", "base"), finetune="full",
                               num_steps=steps["base"], seed=seed)
  library = os.path.join(workdir, "library")
  multitask = os.path.join(workdir, "multitask")

  def contribute(i: int, task: str) -> None:
    train.train_expert(base=base, task=task, library=library, num_steps=steps["expert"], seed=seed + i,
                       workdir=os.path.join(workdir, "train", f"{task}_expert"), held_out=held_out)
    train.train_gate(base=base, library=library, name=task, num_steps=steps["gate"], seed=seed + i,
                     workdir=os.path.join(workdir, "train", f"{task}_gate"), held_out=held_out)

  def train_multitask() -> None:
    train.train_multitask(task=s.HELD_IN_MIXTURE, output=multitask, base=base, finetune="lora",
                          workdir=os.path.join(workdir, "train", "multitask"), num_steps=steps["multitask"],
                          seed=seed, held_out=held_out)

  with futures.ThreadPoolExecutor(concurrency) as pool:  # the longest job first
    jobs = [pool.submit(train_multitask)] + [pool.submit(contribute, i, t) for i, t in enumerate(s.HELD_IN_TASKS)]
    for job in jobs:
      job.result()
  return base, library, multitask


def evaluate(s, base: str, workdir: str, method: str, splits=("heldin", "heldout"), **kwargs) -> dict:
  """One method's results on the held-in validation tasks ('heldin') and / or the held-out tasks ('heldout'),
  in one pass of one model: {split: {"tasks", "score"}}, each score the split's average."""
  tasks_of = {"heldin": s.HELD_IN_EVAL_TASKS, "heldout": s.HELD_OUT_TASKS}
  mixture = {("heldin",): s.HELD_IN_EVAL_MIXTURE, ("heldout",): s.HELD_OUT_MIXTURE}.get(tuple(splits), s.EVAL_MIXTURE)
  results = stages.evaluate(task=mixture, output_dir=os.path.join(workdir, "eval", method), base=base,
                            method=method, **kwargs)
  return {split: split_results(results, tasks_of[split]) for split in splits}


def split_results(results: dict, names) -> dict:
  """The results of tasks `names` and their average (`metrics.benchmark_score`)."""
  by_task = {t: results["tasks"][t] for t in names}
  return {"tasks": by_task, "score": metrics.benchmark_score({t: r["score"] for t, r in by_task.items()})}


def routed_runner(base: str, library: str, router: str, task: str):
  """A score runner of the library's experts under a per-token `router`."""
  loaded = assembly.load(base, library, router)
  return stages.runner(loaded, data.vocabulary(task))


# ---- the table ----------------------------------------------------------------------------------------


def method_options(s, library: str, multitask: str) -> Dict[str, dict]:
  """The evaluate() arguments of every method but base and best_individual."""
  labels = {t: s.oracle_expert(t) for t in s.HELD_IN_EVAL_TASKS + s.HELD_OUT_TASKS}
  options = {m: {"library": library, "router": DEMO_ROUTERS.get(m, m)} for m in ROUTED_METHODS}
  options["multitask"] = {"library": multitask, "router": "merged", "names": ["multitask"]}
  options["oracle"] = {"library": library, "router": "oracle", "router_options": {"oracle_labels": labels}}
  return options


def evaluate_methods(s, base: str, library: str, multitask: str, workdir: str) -> Dict[str, dict]:
  """{method: {"heldout": results, "heldin": results}} for every method of the table."""
  singles = {t: evaluate(s, base, workdir, f"single_{t}", ("heldout",), library=library, router="merged", names=[t])
             for t in s.HELD_IN_TASKS}
  best = max(singles, key=lambda t: singles[t]["heldout"]["score"])
  best_heldin = evaluate(s, base, workdir, f"single_{best}_heldin", ("heldin",), library=library, router="merged",
                         names=[best])
  results = {"base": evaluate(s, base, workdir, "base"), "best_individual": {**singles[best], **best_heldin}}
  for method, options in method_options(s, library, multitask).items():
    results[method] = evaluate(s, base, workdir, method, **options)
  return {m: results[m] for m in METHODS}


def routing_accuracies(s, base: str, library: str, max_examples: int) -> tuple:
  """({per-token router: routing accuracy on held-in validation data}, chance k/E)."""
  examples = tasks.get_eval_examples(s.HELD_IN_EVAL_MIXTURE, max_examples)
  names = list(s.HELD_IN_TASKS)  # the library's expert order (the suite's pool, `tasks.register_pool`)
  accuracy = {}
  for router in PER_TOKEN_METHODS:
    runner = routed_runner(base, library, router, s.HELD_IN_EVAL_MIXTURE)
    counts = {t: diagnostics.routing_counts(runner, examples[t], names.index(s.oracle_expert(t)))
              for t in s.HELD_IN_EVAL_TASKS}
    accuracy[router] = diagnostics.routing_accuracy(counts)
  experts = runner.model.experts
  return accuracy, experts.top_k / experts.num_experts


def routing_figures(s, base: str, library: str, workdir: str, max_examples: int) -> None:
  """PHATGOOSE's expert choices per layer on held-in (`routing.png`) and held-out tasks (`routing_heldout.png`)."""
  labels = [t[len(s.PREFIX):] for t in s.HELD_IN_TASKS]  # the library's expert order
  for task, name in ((s.HELD_IN_EVAL_MIXTURE, "routing.png"), (s.HELD_OUT_MIXTURE, "routing_heldout.png")):
    stats = stages.route_stats(task=task, output_dir=os.path.join(workdir, "route_stats", name[:-4]), base=base,
                               library=library, router="phatgoose", max_examples=max_examples)
    route_stats.plot(stats, os.path.join(workdir, name), labels,
                     title=f"PHATGOOSE, {'held-in' if task == s.HELD_IN_EVAL_MIXTURE else 'held-out'} tasks: "
                           "share of top-k slots per expert")


def summarize(results: Dict[str, dict], accuracy: dict, chance: float) -> dict:
  """results.json's `methods` and `num_examples` (see the module docstring)."""
  counts = {t: r["num_examples"] for t, r in results["base"]["heldout"]["tasks"].items()}
  methods = {}
  for method, r in results.items():
    heldout = {t: v["score"] for t, v in r["heldout"]["tasks"].items()}
    methods[method] = {
        "heldout": heldout, "heldout_avg": r["heldout"]["score"],
        "heldout_ci": {t: diagnostics.wilson_interval(p, counts[t]) for t, p in heldout.items()},
        "heldout_avg_ci": diagnostics.mean_interval(heldout, counts),
        "heldin": {t: v["score"] for t, v in r["heldin"]["tasks"].items()}, "heldin_avg": r["heldin"]["score"],
        "routing_accuracy": accuracy.get(method), "routing_chance": chance if method in accuracy else None}
  return {"num_examples": counts, "methods": methods}


def markdown(summary: dict) -> str:
  """The held-out table, then held-in average, held-out interval and routing accuracy per method."""
  methods = summary["methods"]
  table = evaluator.markdown_table({m: s["heldout"] for m, s in methods.items()}, "heldout_avg")
  lines = ["", "| method | heldin_avg | heldout_avg (95% interval) | routing accuracy (chance) |", "|---|---|---|---|"]
  for m, s in methods.items():
    low, high = s["heldout_avg_ci"]
    routing = "-" if s["routing_accuracy"] is None else f"{100 * s['routing_accuracy']:.1f} ({100 * s['routing_chance']:.1f})"
    lines.append(f"| {m} | {100 * s['heldin_avg']:.1f} | {100 * s['heldout_avg']:.1f} "
                 f"({100 * low:.1f}-{100 * high:.1f}) | {routing} |")
  return table + "\n" + "\n".join(lines)


@gin.configurable
def run_demo(workdir: str, seed: int = 0, suite_name: str = "tokens", train_examples: int = 4000,
             validation_examples: int = 200, held_out_examples: int = 100,
             held_in_eval_examples: Optional[int] = None, base_steps: int = 1500,
             expert_steps: int = 300, gate_steps: int = 100, multitask_steps: int = 600,
             routing_examples: int = 100, concurrency: int = 2, clock: Optional[float] = None,
             cache_dir: Optional[str] = None) -> dict:
  """Runs the demo of suite `suite_name` into `workdir` and returns what `results.json` holds (`clock`: when
  the run started; `cache_dir`: JAX's persistent compilation cache, `workdir/jax_cache` unless one is
  configured; `held_in_eval_examples`: examples per held-in task in the table, the first of its validation
  examples (None: all `validation_examples`); `routing_examples`: held-in validation examples per task for the
  routing diagnostics; `concurrency`: training stages at a time, see `train_models`)."""
  if suite_name not in SUITES:
    raise ValueError(f"unknown demo suite {suite_name!r}; choose one of {sorted(SUITES)}")
  s = SUITES[suite_name]
  started = time.time() if clock is None else clock
  os.makedirs(workdir, exist_ok=True)
  enable_compilation_cache(cache_dir or os.path.join(workdir, "jax_cache"))
  s.register(seed, suite.SuiteSizes(train_examples, validation_examples, held_out_examples, held_in_eval_examples))
  held_out = data.HeldOut(frozenset(s.HELD_OUT_TASKS), s.is_held_out)
  base, library, multitask = train_models(s, workdir, seed, {"base": base_steps, "expert": expert_steps,
                                                             "gate": gate_steps, "multitask": multitask_steps},
                                          held_out, concurrency)
  results = evaluate_methods(s, base, library, multitask, workdir)
  accuracy, chance = routing_accuracies(s, base, library, routing_examples)
  routing_figures(s, base, library, workdir, routing_examples)
  summary = {"suite": suite_name, "seed": seed, **summarize(results, accuracy, chance),
             "seconds": round(time.time() - started, 1)}
  diagnostics.plot_scores(summary["methods"], os.path.join(workdir, "scores.png"),
                          f"{suite_name} suite, seed {seed}: held-out (95% interval) and held-in averages")
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(summary, f, indent=2)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown(summary) + "\n")
  return summary
