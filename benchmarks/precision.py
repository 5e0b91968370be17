"""How often bf16 router math changes the top-2 experts, against float32, on random data.

Usage: python benchmarks/precision.py [--experts 36,166] [--d_in 2048,5120] [--tokens 8192]
         [--preset small] [--model_experts 36] [--batch 8] [--length 64] [--seed 0] [--json]

Two measurements (algorithm.md §4; bf16 as the official evaluation computes it, `experts/routing.py`):
  layer  one routed layer: N random token activations u ~ Normal(0, 1) and E random gate vectors; the same
         activations' top-2 under float32 router math and under bf16 router math (activations and gate
         vectors rounded to bf16, `routing.phatgoose_scores` / `routing.top_k_weights` on bf16 inputs);
  model  a whole T5 of `--preset` with E random experts on every linear layer (initial base weights, random
         LoRA factors and gate vectors): the teacher-forced forward on random tokens in float32, then in bf16
         (`utils.model_config.dtype = 'bfloat16'`: bf16 parameters, activations and router math), comparing
         the top-2 chosen at every module and token. Here activations differ too, as they would in
         an evaluation.
Reported: the fraction of (token[, module]) whose top-2 set differs, and whose top-1 expert differs.
"""
import jax
import jax.numpy as jnp
import numpy as np

import common
from phatgoose_jax import utils
from phatgoose_jax.checkpoints import names
from phatgoose_jax.experts import routing
from phatgoose_jax.experts.config import ExpertConfig
from phatgoose_jax.models import EncoderDecoderModel, shift_right, unbox
from phatgoose_jax.t5.config import preset


def differ(index_a: np.ndarray, index_b: np.ndarray) -> dict:
  """Fractions of rows whose top-k sets, and whose top-1 experts, differ (`index` <int>[..., k])."""
  a, b = np.sort(index_a, axis=-1), np.sort(index_b, axis=-1)
  return {"top2_differs": float(np.mean(np.any(a != b, axis=-1))),
          "top1_differs": float(np.mean(index_a[..., 0] != index_b[..., 0]))}


@jax.jit
def layer_top2(u, router):
  """(float32 top-2, bf16 top-2) of the same activations."""
  full = routing.top_k_weights(routing.phatgoose_scores(u, router), 2)[1]
  half = routing.top_k_weights(routing.phatgoose_scores(u.astype(jnp.bfloat16), router.astype(jnp.bfloat16)), 2)[1]
  return full, half


def layer_case(num_experts: int, d_in: int, tokens: int, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  u = rng.standard_normal((tokens, d_in)).astype(np.float32)
  router = rng.standard_normal((num_experts, d_in)).astype(np.float32)
  full, half = layer_top2(u, router)
  return {"experts": num_experts, "d_in": d_in, "tokens": tokens, **differ(np.asarray(full), np.asarray(half))}


def random_routed_variables(model: EncoderDecoderModel, seed: int) -> dict:
  """Initial base weights and random experts: lora_a ~ Normal(0, 1/d_in), lora_b ~ Normal(0, 1/r) (so that
  B A u has about the scale of u before the 1/r LoRA scaling), gate vectors ~ Normal(0, 1)."""
  variables = unbox(model.get_initial_variables(jax.random.PRNGKey(seed)))
  rng = np.random.default_rng(seed)

  def draw(key, shape):
    std = shape[-2] ** -0.5 if key.endswith(("lora_a", "lora_b")) else 1.0  # [E, d_in, r] or [E, r, d_out]
    return (std * rng.standard_normal(shape)).astype(np.float32)

  flat = {k: draw(k, v.shape) for k, v in names.flatten(variables["experts"]).items()}
  return {"params": variables["params"], "experts": names.unflatten(flat)}


def route_indices(model: EncoderDecoderModel, variables: dict, batch: dict) -> dict:
  _, state = model.logits(variables, batch, mutable=("intermediates",))
  return {k: np.asarray(v[0]) for k, v in names.flatten(state["intermediates"]).items() if k.endswith("route_index")}


def model_case(size: str, num_experts: int, batch: int, length: int, seed: int) -> dict:
  config = preset(size).replace(dropout_rate=0.0)
  experts = ExpertConfig(mode="routed", rank=16, num_experts=num_experts, top_k=2, impl="dense")
  full_model = EncoderDecoderModel(config, experts)
  half_model = EncoderDecoderModel(config.replace(dtype="bfloat16"), experts)
  variables = random_routed_variables(full_model, seed)
  rng = np.random.default_rng(seed + 1)
  targets = rng.integers(2, config.vocab_size, (batch, length)).astype(np.int32)
  tokens = {"encoder_input_tokens": rng.integers(2, config.vocab_size, (batch, length)).astype(np.int32),
            "decoder_input_tokens": shift_right(targets), "decoder_target_tokens": targets}
  full = route_indices(full_model, variables, tokens)
  half = route_indices(half_model, utils.in_compute_dtype(variables, "bfloat16"), tokens)
  def pairs(indices):
    return np.concatenate([indices[k].reshape(-1, 2) for k in sorted(full)])
  return {"preset": size, "experts": num_experts, "modules": len(full), "tokens": batch * length,
          **differ(pairs(full), pairs(half))}


def main():
  p = common.parser(__doc__)
  p.add_argument("--experts", default="36,166", help="E of the layer cases")
  p.add_argument("--d_in", default="2048,5120", help="activation widths of the layer cases (T5-XL: 2048, 5120)")
  p.add_argument("--tokens", type=int, default=8192)
  p.add_argument("--preset", default="small", help="T5 size of the whole-model case")
  p.add_argument("--model_experts", type=int, default=36)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=64)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  result = {"machine": common.machine()}
  result["layer"] = [layer_case(e, d, args.tokens, args.seed) for e in map(int, args.experts.split(","))
                     for d in map(int, args.d_in.split(","))]
  result["model"] = model_case(args.preset, args.model_experts, args.batch, args.length, args.seed)
  rows = [["layer", f"E={r['experts']} d_in={r['d_in']}", r["tokens"], f"{r['top2_differs']:.4f}",
           f"{r['top1_differs']:.4f}"] for r in result["layer"]]
  m = result["model"]
  rows.append(["model", f"{m['preset']} E={m['experts']}, {m['modules']} modules", m["tokens"],
               f"{m['top2_differs']:.4f}", f"{m['top1_differs']:.4f}"])
  common.emit(result, args.json, ["case", "setting", "tokens", "top-2 set differs", "top-1 differs"], rows,
              notes=("fractions of tokens (layer) or of token-module pairs (model); bf16 = the official bf16 "
                     "evaluation's rounding",))


if __name__ == "__main__":
  main()
