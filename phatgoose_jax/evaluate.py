"""The evaluation stages, each a gin-configurable function (routed model -> evaluation).

  evaluate     a task or mixture on a base, an assembled checkpoint, or library experts combined by a
               router: rank classification and greedy generation (algorithm.md §6); results.json + .md
  route_stats  per dataset and layer, the distribution of the experts a per-token router chooses

Every model comes from `assembly.load` (the configured model, routed over a library when one is given).
"""
import os
from typing import Optional, Sequence

import gin

from phatgoose_jax import assembly, data, distributed
from phatgoose_jax import library as lib
from phatgoose_jax import partitioning, routers, utils
from phatgoose_jax.evaluation import evaluator
from phatgoose_jax.evaluation import route_stats as route_stats_lib
from phatgoose_jax.tasks import flan


@gin.configurable(denylist=["loaded", "vocabulary"])
def runner(loaded: assembly.LoadedModel, vocabulary, batch_size: int = 64) -> evaluator.Runner:
  """The model as score / generate functions, placed on the configured mesh, with the configured lengths."""
  mesh, rules = utils.sharding()
  lengths = data.feature_lengths()
  variables = utils.place(loaded.model, loaded.variables, mesh, rules)
  return evaluator.Runner(loaded.model, variables, vocabulary, loaded.expert_weights, batch_size,
                          lengths["inputs"], lengths["targets"], partitioning.batch_sharding(mesh, rules))


def _expert_pool(library: Optional[str], expert_pool: Optional[str]) -> Optional[str]:
  """The pool the experts come from: the library's own datasets decide, whatever the caller says."""
  if not library:
    return expert_pool
  return flan.pool_of(m.get("dataset") or m["name"] for m in lib.ExpertLibrary(library).list()) or expert_pool


@gin.configurable
def evaluate(task: str = gin.REQUIRED, output_dir: str = gin.REQUIRED, base: str = gin.REQUIRED,
             library: Optional[str] = None, router: str = "phatgoose", names: Optional[Sequence[str]] = None,
             router_options: Optional[dict] = None, method: Optional[str] = None, max_examples: Optional[int] = None,
             expert_pool: Optional[str] = None, data_dirs: Optional[dict] = None,
             held_out: data.HeldOut = data.NOTHING_HELD_OUT) -> dict:
  """Score a task or mixture (rank classification / greedy generation, algorithm.md §6); process 0 writes
  `output_dir/results.json` and `output_dir/results.md`. Returns the results."""
  task = data.resolve(task)
  expert_pool = _expert_pool(library, expert_pool)
  flan.check_evaluation(expert_pool, task)  # before any model is loaded (algorithm.md §6)
  data.check_vocabulary(data.vocabulary(task), base)
  os.makedirs(output_dir, exist_ok=True)
  loaded = assembly.load(base, library, router, names, held_out, router_options)
  results = evaluator.evaluate(task, runner(loaded, data.vocabulary(task)), max_examples=max_examples,
                               expert_pool=expert_pool, **(data_dirs or {}))
  if distributed.is_writer():
    evaluator.write_results({method or (router if library else "model"): results}, output_dir)
  return results


@gin.configurable
def route_stats(task: str = gin.REQUIRED, output_dir: str = gin.REQUIRED, base: str = gin.REQUIRED,
                library: Optional[str] = None, router: str = "phatgoose", names: Optional[Sequence[str]] = None,
                max_examples: Optional[int] = 200, data_dirs: Optional[dict] = None,
                held_out: data.HeldOut = data.NOTHING_HELD_OUT) -> dict:
  """Per dataset and layer, the fraction of top-k choices each expert gets; JSON + one heatmap per dataset."""
  task = data.resolve(task)
  data.check_vocabulary(data.vocabulary(task), base)
  os.makedirs(output_dir, exist_ok=True)
  loaded = assembly.load(base, library, router, names, held_out)
  if loaded.model.experts.mode != "routed" or loaded.expert_weights is not None:
    raise ValueError(f"route statistics need a per-token routed model (a routed checkpoint, or a library with a "
                     f"per-token router: {', '.join(routers.PER_TOKEN)})")
  expert_names = list(names or lib.ExpertLibrary(library).names()) if library else None
  stats = route_stats_lib.collect(task, runner(loaded, data.vocabulary(task)), max_examples=max_examples,
                                  **(data_dirs or {}))
  if distributed.is_writer():
    route_stats_lib.write(stats, output_dir, expert_names)
  return stats

