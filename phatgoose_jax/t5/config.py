"""T5 v1.1 (LM-adapted) configurations: the released sizes and a tiny test preset (algorithm.md §1).

A `T5Config` fixes the frozen base network; an `ExpertConfig` says which linear layers carry LoRA experts
and how they are combined (one expert, one gated expert, or E routed experts). Both are frozen dataclasses,
so they hash and can be static arguments of jitted functions.
"""
import dataclasses
import json
from typing import Optional

# Every linear layer of the T5 v1.1 stack, by the name of its module in the parameter tree.
ATTENTION_MODULES = ("query", "key", "value", "out")
MLP_MODULES = ("wi_0", "wi_1", "wo")
ALL_TARGETS = ATTENTION_MODULES + MLP_MODULES


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyper-parameters of a T5 v1.1 encoder-decoder (no biases, gated-GELU FFN, RMSNorm, untied logits)."""
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 1024
  num_heads: int = 6
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  dtype: str = "float32"  # compute dtype; parameters stay float32

  @property
  def joined_kv(self) -> int:
    return self.num_heads * self.d_kv

  def replace(self, **kw) -> "T5Config":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "T5Config":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise ValueError(f"unknown T5Config fields {sorted(unknown)}; known: {sorted(names)}")
    return cls(**d)

  def fingerprint(self) -> str:
    """The architecture as a canonical JSON string (dtype and dropout excluded: they do not change weights)."""
    d = self.to_dict()
    d.pop("dtype")
    d.pop("dropout_rate")
    return json.dumps(d, sort_keys=True)


PRESETS = {
    "tiny": T5Config(vocab_size=259, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_encoder_layers=2,
                     num_decoder_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=20),
    "small": T5Config(d_model=512, d_kv=64, d_ff=1024, num_heads=6, num_encoder_layers=8, num_decoder_layers=8),
    "base": T5Config(d_model=768, d_kv=64, d_ff=2048, num_heads=12, num_encoder_layers=12, num_decoder_layers=12),
    "large": T5Config(d_model=1024, d_kv=64, d_ff=2816, num_heads=16, num_encoder_layers=24,
                      num_decoder_layers=24),
    "xl": T5Config(d_model=2048, d_kv=64, d_ff=5120, num_heads=32, num_encoder_layers=24, num_decoder_layers=24),
    "xxl": T5Config(d_model=4096, d_kv=64, d_ff=10240, num_heads=64, num_encoder_layers=24,
                    num_decoder_layers=24),
}


def preset(name: str, **overrides) -> T5Config:
  """A released T5 v1.1 size (`small` ... `xxl`) or `tiny`, with optional field overrides."""
  if name not in PRESETS:
    raise ValueError(f"unknown T5 preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)


ROUTING_IMPLS = ("dense", "gather", "ragged", "auto")
ROUTER_SCORES = ("standardized", "arrow", "spectr")


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
  """Where LoRA experts sit and how they combine (algorithm.md §2-§5).

  mode:
    'none'   the plain base model;
    'lora'   one expert: `W u + (B A u) * scale`                          (algorithm.md §2);
    'gated'  one expert with its gate: `W u + sigmoid(v . u) (B A u) * scale` (algorithm.md §3);
    'routed' E experts, per-token top-k routing over router vectors        (algorithm.md §4, §5).
  `scale` defaults to 1/rank. `score` picks the PHATGOOSE standardized score or Arrow's |u . e|.
  `impl` picks the routed computation: 'dense' (every expert, masked: the reference), 'gather' (only the
  chosen experts' weights, gathered per token), 'ragged' (tokens grouped by expert, `jax.lax.ragged_dot`),
  or 'auto' (the grouped matmul; see routing.resolve_impl).
  """
  mode: str = "none"
  rank: int = 16
  targets: tuple = ALL_TARGETS
  num_experts: int = 0
  top_k: int = 2
  score: str = "standardized"
  impl: str = "dense"
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
