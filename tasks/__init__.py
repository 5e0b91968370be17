"""seqio task registries of the paper's data (algorithm.md §6), registered on import (cheap, no data read).

Registered names: `p3_<key>` / `p3_<key>_eval` (36 held-in P3 datasets; mixtures `p3_held_in`,
`p3_held_in_eval`), `t0_<key>` (11 T0 held-out; mixture `t0_held_out`), `bbl_<task>` (17 BIG-bench Lite;
mixture `bigbench_lite`), `bbh_<task>` (22 BIG-bench Hard; mixture `bigbench_hard`). The FLAN pool is
registered from its directory by `flan.register_pool`. Besides registered names, `bigbench/<task>` and
`bigbench/<task>/<subtask>` name any task of the BIG-bench directory, and a `.jsonl` path a user's own data
(`jsonl.py`).
"""
import itertools
from typing import Dict, Optional, Sequence, Tuple

import seqio

from phatgoose_jax.tasks import bigbench, flan, jsonl, p3, seqio_tasks, sources

BIGBENCH_PREFIX = "bigbench/"


def register_all() -> None:
  """Registers every static task and mixture; safe to call again (re-registers)."""
  p3.register()
  bigbench.register()


def get_task_or_mixture(name: str):
  """The seqio Task or Mixture called `name`; a `bigbench/...` path or a `.jsonl` file is registered first."""
  if name.startswith(BIGBENCH_PREFIX):
    return bigbench.register_path(name[len(BIGBENCH_PREFIX):])
  if jsonl.is_jsonl(name):
    return seqio.get_mixture_or_task(jsonl.register(name))
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError as e:
    raise KeyError(f"unknown task or mixture {name!r} (see `phatgoose tasks list`)") from e


_EXAMPLE_KEYS = ("inputs", "choices", "correct", "target", "references", "metric")


def task_examples(task: seqio.Task, max_examples: Optional[int] = None) -> list:
  """Evaluation examples of one seqio task (inputs, choices, correct, target, references, metric), from
  its source's python view (the same dicts its tf.data view serves)."""
  if not isinstance(task.source, seqio_tasks.TextSource) or task.source.signature is not seqio_tasks.EVAL_SIGNATURE:
    raise ValueError(f"{task.name} is not an evaluation task")
  split = "validation" if "validation" in task.splits else task.splits[0]
  examples = itertools.islice(task.source.examples(split), max_examples)
  return [{k: example[k] for k in _EXAMPLE_KEYS} for example in examples]


def get_eval_examples(name: str, max_examples: Optional[int] = None, **dirs) -> dict:
  """{task name: examples} of a task or of each task of a mixture; `dirs` are data directories
  (templates_dir, bigbench_dir, flan_dir, data_dir, tfds_dir), read while the examples are built."""
  provider = get_task_or_mixture(name)
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  with sources.using_dirs(**dirs):
    return {task.name: task_examples(task, max_examples) for task in tasks}


POOLS: Dict[int, Tuple[str, ...]] = {}  # `register_pool`: suites' own expert pools (group -> tasks in order)


def register_pool(group: int, training_tasks: Sequence[str]) -> None:
  """A suite's expert pool: its training tasks' experts list in this order, group `group` (3 and up: 0 and 1 are
  P3 and FLAN, 2 the library's experts outside any pool), whatever order they are added in."""
  if group < 3:
    raise ValueError(f"pool group {group} is taken (0 P3, 1 FLAN, 2 experts outside a pool); use 3 or more")
  POOLS[group] = tuple(training_tasks)


def pool_position(task: Optional[str]) -> Optional[tuple]:
  """(pool, index) of a training task in its expert pool's official order, the order the official code stacks
  the experts in (scripts/concatenate.py:264-295): (0, i) for the P3 pool's i-th dataset `p3_<key>`
  (p3_dataset_dict, lines 8-45), (1, i) for the FLAN pool's i-th expert `flan_<name>` (full_dataset_dict, lines
  186-193), (group, i) in a `register_pool` pool; None for any other task."""
  positions = {f"p3_{source.key}": (0, i) for i, source in enumerate(sources.P3_HELD_IN)}
  positions.update({f"flan_{name}": (1, i) for i, (name, _, _) in enumerate(flan.FLAN_EXPERTS)})
  positions.update({name: (group, i) for group, names in POOLS.items() for i, name in enumerate(names)})
  return positions.get(task)


def registered_names(prefix: str = "") -> list:
  """Sorted names of registered tasks and mixtures starting with `prefix`."""
  names = itertools.chain(seqio.TaskRegistry.names(), seqio.MixtureRegistry.names())
  return sorted(n for n in set(names) if n.startswith(prefix))


register_all()
