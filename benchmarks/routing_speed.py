"""Routed vs unrouted forward time: E experts, top-k, every routing implementation.

Usage: python benchmarks/routing_speed.py [--preset tiny] [--experts 8] [--top_k 2] [--batch 8] [--length 128]
Prints the median time of a jitted teacher-forced forward for the base model and for the routed model with
each implementation (dense reference, gather, ragged grouped matmul), and each routed/unrouted ratio.
"""
import argparse
import time

import jax
import numpy as np

from phatgoose_jax.models import EncoderDecoderModel, shift_right, unbox
from phatgoose_jax.t5.config import preset
from phatgoose_jax.experts.config import ExpertConfig


def median_seconds(fn, repeats):
  jax.block_until_ready(fn())  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def forward_time(config, experts, batch, repeats):
  model = EncoderDecoderModel(config, experts)
  variables = unbox(model.get_initial_variables(jax.random.PRNGKey(0)))
  if "experts" in variables:
    leaves, tree = jax.tree.flatten(variables["experts"])
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    variables["experts"] = tree.unflatten([jax.random.normal(k, x.shape) * 0.1 for k, x in zip(keys, leaves)])
  return median_seconds(lambda: model.logits(variables, batch), repeats)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--top_k", type=int, default=2)
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args()
  config = preset(args.preset, dropout_rate=0.0)
  rng = np.random.default_rng(0)
  tokens = rng.integers(2, config.vocab_size, (args.batch, args.length)).astype(np.int32)
  batch = {"encoder_input_tokens": tokens, "decoder_input_tokens": shift_right(tokens), "decoder_target_tokens": tokens}
  print(f"backend={jax.default_backend()} preset={args.preset} E={args.experts} k={args.top_k} r={args.rank} "
        f"batch={args.batch}x{args.length}")
  base = forward_time(config, ExpertConfig(), batch, args.repeats)
  print(f"{'base (unrouted)':<22} {base * 1e3:9.2f} ms   ratio 1.00")
  for impl in ("dense", "gather", "ragged"):
    experts = ExpertConfig(mode="routed", rank=args.rank, num_experts=args.experts, top_k=args.top_k, impl=impl)
    t = forward_time(config, experts, batch, args.repeats)
    print(f"{'routed/' + impl:<22} {t * 1e3:9.2f} ms   ratio {t / base:.2f}")


if __name__ == "__main__":
  main()
