"""Reading a pinned dataset split as python dicts: local JSONL, then TFDS, then Hugging Face (algorithm.md §6).

Nothing here runs at import time; each reader is tried only when a task's data is requested, and a
dataset found nowhere raises `MissingDataError` naming the dataset, every location tried and how to get it.
"""
import importlib.util
import json
import os
import pathlib
from typing import Iterator

import numpy as np

from phatgoose_jax.tasks import sources


def read_jsonl(path) -> Iterator[dict]:
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        yield json.loads(line)


def _local_path(source: sources.DatasetSource, split: str):
  data_dir = sources.get_dir("data_dir", required=False)
  return pathlib.Path(data_dir, source.templates, f"{split}.jsonl") if data_dir else None


def _to_python(value):
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray):
    return [_to_python(v) for v in value.tolist()] if value.dtype == object else value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, dict):
    return {k: _to_python(v) for k, v in value.items()}
  return value


def _tfds_builder(source: sources.DatasetSource):
  if source.tfds is None:
    return None
  import tensorflow_datasets as tfds
  builder = tfds.builder(source.tfds, data_dir=sources.get_dir("tfds_dir", required=False), try_gcs=False)
  return builder if builder.is_prepared() else None


def _read_tfds(builder, split: str) -> Iterator[dict]:
  import tensorflow_datasets as tfds
  for row in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
    yield _to_python(row)


def _read_hf(source: sources.DatasetSource, split: str) -> Iterator[dict]:
  import datasets
  path, config = source.hf
  try:
    rows = datasets.load_dataset(path, config, split=split)
  except Exception as e:  # datasets raises many types (offline, manual download, missing config).
    raise sources.missing(f"dataset {path}/{config} split {split}", "Hugging Face datasets", str(e)) from e
  yield from rows


def _hf_available() -> bool:
  return importlib.util.find_spec("datasets") is not None and not os.environ.get("HF_DATASETS_OFFLINE")


def read_split(source: sources.DatasetSource, split: str) -> Iterator[dict]:
  """Rows of `source`'s `split`, from the first of local JSONL / TFDS / Hugging Face that has them."""
  local = _local_path(source, split)
  if local is not None and local.is_file():
    return read_jsonl(local)
  builder = _tfds_builder(source)
  if builder is not None:
    return _read_tfds(builder, split)
  if _hf_available():
    return _read_hf(source, split)
  raise _missing_everywhere(source, split, local)


def _missing_everywhere(source, split, local) -> sources.MissingDataError:
  env = sources.DIR_KINDS["data_dir"][0]
  where = [f"local JSONL {local}" if local else f"local JSONL <${env}>/{source.templates}/{split}.jsonl "
           f"(${env} is not set)"]
  how = [f"write that JSONL file (Hugging Face schema of {'/'.join(filter(None, source.hf))})"]
  if source.tfds:
    where.append(f"TFDS {source.tfds} (not prepared)")
    how.append(f"`tfds build {source.tfds}`")
  where.append("Hugging Face datasets " + ("(offline)" if importlib.util.find_spec("datasets") else
                                           "(package not installed)"))
  how.append(f"`pip install datasets` for load_dataset{source.hf!r}")
  return sources.missing(f"dataset {source.key} split {split}", "; ".join(where), ", or ".join(how))
