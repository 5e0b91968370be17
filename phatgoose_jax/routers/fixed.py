"""Fixed per-example mixtures: every expert equally (uniform), or the one expert a label names (oracle).

Both return a routed model whose router vectors are zero and whose `top_k` is E, so even without
`expert_weights` every token mixes all experts equally; the `expert_weights` function gives the
per-example mixture <float32>[b, E] that replaces per-token routing (algorithm.md §5).
"""
from typing import Mapping, Optional

import numpy as np

from phatgoose_jax.routers import Routing, load_all, routed, zero_vectors


def uniform_weights(batch_size: int, num_experts: int) -> np.ndarray:
  """w_e = 1 / E for every example."""
  return np.full((batch_size, num_experts), 1.0 / num_experts, np.float32)


def one_hot_weights(index: np.ndarray, num_experts: int) -> np.ndarray:
  """w_e = 1 for the chosen expert of each example, 0 for the others."""
  return np.eye(num_experts, dtype=np.float32)[np.asarray(index)]


def _batch_size(batch: Mapping) -> int:
  return len(batch["encoder_input_tokens"])


def build_uniform(library, names, *, impl: str = "auto") -> Routing:
  experts = load_all(library, names)
  count = len(experts)
  return routed(experts, [zero_vectors(e) for e in experts], top_k=count, impl=impl,
                expert_weights=lambda batch: uniform_weights(_batch_size(batch), count))


def default_label_map(experts) -> dict:
  """Each expert's name and its source dataset, both -> the expert's name."""
  labels = {e.manifest["name"]: e.manifest["name"] for e in experts}
  labels.update({e.manifest["dataset"]: e.manifest["name"] for e in experts if e.manifest.get("dataset")})
  return labels


def build_oracle(library, names, *, label_to_expert: Optional[Mapping[str, str]] = None, label_key: str = "task",
                 impl: str = "auto") -> Routing:
  """The expert of each example's label: `batch[label_key]` is a sequence of labels (e.g. dataset names),
  mapped to expert names by `label_to_expert` (default: each expert's name and source dataset)."""
  experts = load_all(library, names)
  mapping = dict(label_to_expert) if label_to_expert is not None else default_label_map(experts)
  unknown = sorted({v for v in mapping.values() if v not in names})
  if unknown:
    raise ValueError(f"label_to_expert names experts {unknown} that are not among {list(names)}")
  position = {n: i for i, n in enumerate(names)}

  def weights(batch):
    labels = [str(label) for label in batch[label_key]]
    missing = sorted({label for label in labels if label not in mapping})
    if missing:
      raise KeyError(f"oracle routing has no expert for labels {missing}; known labels: {sorted(mapping)}")
    return one_hot_weights([position[mapping[label]] for label in labels], len(names))

  return routed(experts, [zero_vectors(e) for e in experts], top_k=len(experts), impl=impl,
                expert_weights=weights)
