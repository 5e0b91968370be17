"""Where LoRA experts sit in the T5 and how they combine: `ExpertConfig` (algorithm.md §2-§5).

A frozen dataclass, so it hashes and can be a static argument of jitted functions.
"""
import dataclasses
from typing import Optional

from phatgoose_jax.t5.config import ALL_TARGETS

ROUTING_IMPLS = ("dense", "gather", "ragged", "blocks", "grouped", "fused", "auto")
ROUTER_SCORES = ("standardized", "arrow", "spectr", "per_row")


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
  """Where LoRA experts sit and how they combine (algorithm.md §2-§5).

  mode:
    'none'   the plain base model;
    'lora'   one expert: `W u + (B A u) * scale`                          (algorithm.md §2);
    'gated'  one expert with its gate: `W u + sigmoid(v . u) (B A u) * scale` (algorithm.md §3);
    'routed' E experts, per-token top-k routing over router vectors        (algorithm.md §4, §5).
  `scale` defaults to 1/rank. `score` picks the PHATGOOSE standardized score, Arrow's |u . e|, SpectR's
  ||V^T u||, or 'per_row': each row of a batch its own of these three over its own subset of the experts, with
  its own top-k up to `top_k` (`routing.RowRouting`, passed as the model's `expert_weights`: a served library).
  `impl` picks the routed computation, all exact: 'dense' (every expert, masked: the reference, memory
  O(tokens E d_out)), 'gather' (the chosen experts' weights gathered per token, memory O(tokens k d_in r)),
  'ragged' (tokens grouped by expert, `jax.lax.ragged_dot`: the accelerator path), 'blocks' (tokens sorted
  by expert into fixed-size blocks, batched matmuls over chunks of blocks: the CPU path, bounded memory),
  'grouped' (the megablox Pallas grouped matmul: TPU), 'fused' (the blocks layout in one Pallas TPU kernel that
  gathers its token rows itself: TPU, d_in a multiple of 128), or 'auto', the default: on CPU the measured fastest by
  token count ('gather' for a decoding step's few tokens, 'blocks' otherwise), on TPU/GPU the least roofline
  time by the compiler's cost analysis for the device compiled for (see routing.resolve_impl, cost.py).
  """
  mode: str = "none"
  rank: int = 16
  targets: tuple = ALL_TARGETS
  num_experts: int = 0
  top_k: int = 2
  score: str = "standardized"
  impl: str = "auto"
  scale: Optional[float] = None

  def __post_init__(self):
    if self.mode not in ("none", "lora", "gated", "routed"):
      raise ValueError(f"ExpertConfig.mode must be none, lora, gated or routed, got {self.mode!r}")
    unknown = set(self.targets) - set(ALL_TARGETS)
    if unknown:
      raise ValueError(f"unknown LoRA target modules {sorted(unknown)}; choose from {ALL_TARGETS}")
    if self.mode != "none" and self.rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
    if self.mode == "routed":
      if self.num_experts < 1:
        raise ValueError(f"routed mode needs num_experts >= 1, got {self.num_experts}")
      if not 1 <= self.top_k <= self.num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
    if self.score not in ROUTER_SCORES:
      raise ValueError(f"ExpertConfig.score must be one of {ROUTER_SCORES}, got {self.score!r}")
    if self.impl not in ROUTING_IMPLS:
      raise ValueError(f"ExpertConfig.impl must be one of {ROUTING_IMPLS}, got {self.impl!r}")
    object.__setattr__(self, "targets", tuple(self.targets))

  @property
  def lora_scale(self) -> float:
    return 1.0 / self.rank if self.scale is None else self.scale

  def applies_to(self, module_name: str) -> bool:
    return self.mode != "none" and module_name in self.targets

  def replace(self, **kw) -> "ExpertConfig":
    return dataclasses.replace(self, **kw)
