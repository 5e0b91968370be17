"""T5 v1.1 (LM-adapted) configurations: the released sizes and a tiny test preset (algorithm.md §1).

A `T5Config` fixes the frozen base network. It is a frozen dataclass, so it hashes and can be a static argument
of jitted functions. `ALL_TARGETS` names every linear layer of the stack (the modules experts may wrap).
"""
import dataclasses
import json

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
  # With dtype bfloat16: round as torch.autocast (CUDA) does in the official bf16 runs (algorithm.md §2).
  autocast: bool = False
  scan_layers: bool = False  # each stack's layers under nn.scan, their variables stacked (checkpoints/layout.py)
  # What a layer keeps for the backward pass (t5/network.py REMAT_POLICIES): 'none' keeps every activation.
  remat_policy: str = "none"

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
    """The architecture as a canonical JSON string (precision, dropout and the layer layout excluded: they do not
    change weights)."""
    d = self.to_dict()
    for field in ("dtype", "autocast", "dropout_rate", "scan_layers", "remat_policy"):
      d.pop(field)
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
