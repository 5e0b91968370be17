"""Whole-model cost of per-token routing: routed / unrouted T5 forward and one cached decoding step.

Usage: python benchmarks/routed_model.py [--cases base:36,small:166] [--batch 4] [--input_length 128]
         [--target_length 32] [--top_k 2] [--rank 16] [--impls auto] [--rounds 5] [--json]

Every linear layer (attention q, k, v, o and FFN wi_0, wi_1, wo) carries E routed LoRA experts with random
weights and router vectors. Times (medians of interleaved rounds, compilation excluded): the teacher-forced
forward (`EncoderDecoderModel.logits`) over batch x (input_length + target_length) tokens, and one
`decode_step` with a KV cache (batch tokens through the decoder; cross-attention keys and values come from
the encoded input). The default compares the unrouted model with `impl='auto'` only (blocks for the
forward's tokens, gather for a decoding step's batch x k pairs: routing.resolve_impl), one routed model to
compile per case; `--impls blocks,gather` compares the paths (two more compilations of the routed T5).
"""
import jax
import jax.numpy as jnp
import numpy as np

import common
from phatgoose_jax.experts.config import ExpertConfig
from phatgoose_jax.models import EncoderDecoderModel, shift_right, unbox
from phatgoose_jax.t5.config import preset


def random_variables(model, shapes):
  variables = unbox(model.get_initial_variables(jax.random.key(0), shapes))
  if "experts" in variables:
    leaves, tree = jax.tree.flatten(variables["experts"])
    keys = jax.random.split(jax.random.key(1), len(leaves))
    variables["experts"] = tree.unflatten([jax.random.normal(k, x.shape) * 0.05 for k, x in zip(keys, leaves)])
  return variables


def model_calls(model, variables, batch, target_length):
  """(forward call, decode-step call) for one model, both compiled."""
  forward = common.compiled(lambda v, b: model.logits(v, b), variables, batch)[0]
  enc = batch["encoder_input_tokens"]
  encoded = model.encode(variables, enc)
  cache = model.init_cache(variables, encoded, enc, target_length)
  token = batch["decoder_input_tokens"][:, :1]
  step = common.compiled(lambda v, c, e, x, t: model.decode_step(v, c, e, x, t)[0], variables, cache, encoded,
                         enc, token)[0]
  return forward, step


def measure(size, experts, args):
  config = preset(size, dropout_rate=0.0)
  rng = np.random.default_rng(0)
  enc = rng.integers(2, config.vocab_size, (args.batch, args.input_length)).astype(np.int32)
  dec = rng.integers(2, config.vocab_size, (args.batch, args.target_length)).astype(np.int32)
  batch = {"encoder_input_tokens": jnp.asarray(enc), "decoder_input_tokens": jnp.asarray(shift_right(dec)),
           "decoder_target_tokens": jnp.asarray(dec)}
  shapes = {"encoder_input_tokens": enc.shape, "decoder_input_tokens": dec.shape}
  variants = {"unrouted": ExpertConfig()}
  variants.update({impl: ExpertConfig(mode="routed", rank=args.rank, num_experts=experts, top_k=args.top_k,
                                      impl=impl) for impl in args.impls})
  forward, step = {}, {}
  for name, expert_config in variants.items():
    model = EncoderDecoderModel(config, expert_config)
    forward[name], step[name] = model_calls(model, random_variables(model, shapes), batch, args.target_length)
  out = {"model": size, "experts": experts}
  for what, calls in (("forward", forward), ("decode_step", step)):
    times = common.interleaved(calls, args.rounds)
    out[what] = {"times": {n: common.summary(t) for n, t in times.items()},
                 "ratio": {n: common.ratio(t, times["unrouted"]) for n, t in times.items() if n != "unrouted"}}
  return out


def main():
  p = common.parser(__doc__)
  p.add_argument("--cases", default="base:36,small:166")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--input_length", type=int, default=128)
  p.add_argument("--target_length", type=int, default=32)
  p.add_argument("--top_k", type=int, default=2)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--impls", default="auto")
  p.add_argument("--rounds", type=int, default=5)
  args = p.parse_args()
  args.impls = args.impls.split(",")
  result = {"benchmark": "routed_model", "machine": common.machine(), "batch": args.batch,
            "input_length": args.input_length, "target_length": args.target_length, "top_k": args.top_k,
            "rank": args.rank, "cases": []}
  for case in args.cases.split(","):
    size, experts = case.split(":")
    result["cases"].append(measure(size, int(experts), args))
  header = ["model", "E", "what", "unrouted ms"] + [f"{i} ratio (spread)" for i in args.impls]
  rows = []
  for c in result["cases"]:
    for what in ("forward", "decode_step"):
      t = c[what]["times"]
      base = t["unrouted"]["median_s"]
      rows.append([c["model"], c["experts"], what, f"{base * 1e3:.1f}"] +
                  [f"{c[what]['ratio'][i]:.3f} ({t[i]['min_s'] / base:.2f}-{t[i]['max_s'] / base:.2f})"
                   for i in args.impls])
  common.emit(result, args.json, header, rows)


if __name__ == "__main__":
  main()
