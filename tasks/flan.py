"""The FLAN expert pool (166 experts), read from the released FLAN collection (algorithm.md §6).

The FLAN directory holds one JSONL file per expert, `<flan_dir>/<expert>.jsonl`, whose rows are rows of
the released collection: `inputs`, `targets`, the task name and the template type (`_task_name` /
`_template_type` as in Open-Orca/FLAN, or `task_name` / `template_type`). Only zero-shot templates
(`zs_opt`, `zs_noopt`) are used. The pool contains WSC, COPA, HellaSwag and WiC, so evaluating it on the
T0 held-out datasets is refused (`check_evaluation`).
"""
import pathlib
import re
from typing import Iterator, Optional

import seqio

from phatgoose_jax.tasks import readers, seqio_tasks, sources

POOL = "flan"
MIXTURE = "flan_166"


def _field(row: dict, name: str):
  return row.get(f"_{name}", row.get(name))


def train_examples(path) -> Iterator[dict]:
  """{inputs, targets} of the zero-shot rows of one expert's file."""
  for row in readers.read_jsonl(path):
    if _field(row, "template_type") in sources.FLAN_ZERO_SHOT_TEMPLATE_TYPES:
      yield {"inputs": row["inputs"], "targets": row["targets"]}


def expert_files(flan_dir=None) -> list:
  root = pathlib.Path(flan_dir or sources.get_dir("flan_dir"))
  files = sorted(root.glob("*.jsonl"))
  if not files:
    raise sources.missing("the FLAN collection", f"{root}/<expert>.jsonl", sources.DIR_KINDS["flan_dir"][2])
  return files


def task_name(path) -> str:
  return "flan_" + re.sub(r"[^\w.:]", "_", pathlib.Path(path).stem)


def register_pool(flan_dir=None) -> list:
  """Registers one `flan_<expert>` training task per expert file and, for the full 166, `flan_166`.

  Lists the directory (this is called on request, never at import). Returns the task names."""
  names = []
  for path in expert_files(flan_dir):
    source = seqio_tasks.text_source(lambda split, p=path: train_examples(p), seqio_tasks.TRAIN_SIGNATURE,
                                     splits=("train",))
    names.append(seqio_tasks.add_task(task_name(path), source, evaluation=False).name)
  if len(names) != sources.FLAN_POOL_SIZE:
    raise ValueError(f"the FLAN pool has {sources.FLAN_POOL_SIZE} experts (algorithm.md §6); {len(names)} expert files "
                     f"found; the {len(names)} tasks are registered, the mixture {MIXTURE} is not")
  seqio_tasks.add_mixture(MIXTURE, names)
  return names


def _task_names(name: str) -> set:
  if name in seqio.MixtureRegistry.names():
    return {task.name for task in seqio.get_mixture_or_task(name).tasks}
  return {name}


def pool_of(datasets) -> Optional[str]:
  """"flan" when any expert was trained on a FLAN-pool task (`flan_<expert>`), else None."""
  return POOL if any(str(d or "").startswith("flan_") for d in datasets) else None


def check_evaluation(expert_pool: Optional[str], name: str) -> None:
  """Raises ValueError when the FLAN pool would be evaluated on a T0 held-out task (algorithm.md §6)."""
  if expert_pool != POOL:
    return
  held_out = {f"t0_{s.key}" for s in sources.T0_HELD_OUT}
  leaked = sorted(_task_names(name) & held_out)
  if leaked:
    raise ValueError(f"the FLAN expert pool contains WSC, COPA, HellaSwag and WiC and must not be evaluated on "
                     f"T0 held-out tasks (algorithm.md §6): {name} includes {', '.join(leaked)}")
