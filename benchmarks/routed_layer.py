"""One routed linear layer at T5-XL sizes: time of `u W + route(u)` per implementation over the plain `u W`.

Usage: python benchmarks/routed_layer.py [--experts 36,166] [--shapes 2048x2048,5120x2048] [--tokens 2048]
         [--rank 16] [--top_k 2] [--rounds 9] [--impls blocks,gather,dense,ragged] [--json]

For each (E, d_in x d_out) it prints the median time of the plain layer and of each routed implementation
(router scores + top-k + mixed LoRA outputs + the plain layer), their ratio, the min-max spread, the FLOP
bound of that ratio, and the plain matmul's achieved GFLOP/s. FLOP bound (multiply-adds per token):

  plain d_in d_out;  router E d_in;  top-k LoRA k r (d_in + d_out);
  bound = 1 + E / d_out + k r (d_in + d_out) / (d_in d_out).

An implementation whose largest intermediate exceeds --max_gib (dense: tokens E d_out floats; gather:
tokens k d_in r) is skipped and marked so; ragged and the other slow paths get at most --slow_rounds rounds.
"""
import numpy as np
import jax
import jax.numpy as jnp

import common
from phatgoose_jax.experts import routing

SLOW = ("gather", "dense", "ragged")


def intermediate_bytes(impl, tokens, d_in, d_out, rank, experts, k):
  """Bytes of the largest intermediate an implementation materialises (float32)."""
  sizes = {"dense": tokens * experts * d_out, "gather": tokens * k * d_in * rank}
  return 4 * sizes.get(impl, tokens * k * (d_in + d_out))


def flop_bound(d_in, d_out, rank, experts, k):
  return 1 + experts / d_out + k * rank * (d_in + d_out) / (d_in * d_out)


def measure(experts, d_in, d_out, args):
  rng = np.random.default_rng(0)
  normal = lambda *s, scale=1.0: jnp.asarray(rng.normal(size=s).astype(np.float32) * scale)  # noqa: E731
  u, kernel = normal(args.tokens, d_in), normal(d_in, d_out, scale=d_in ** -0.5)
  router, lora_a, lora_b = normal(experts, d_in), normal(experts, d_in, args.rank), normal(experts, args.rank, d_out)
  calls, skipped = {"plain": common.compiled(lambda u, w: u @ w, u, kernel)[0]}, {}
  for impl in args.impls:
    size = intermediate_bytes(impl, args.tokens, d_in, d_out, args.rank, experts, args.top_k)
    if size > args.max_gib * 2 ** 30:
      skipped[impl] = f"intermediate {size / 2 ** 30:.1f} GiB > {args.max_gib} GiB"
      continue

    def layer(u, w, r, a, b, impl=impl):
      return u @ w + routing.route(u, r, a, b, top_k=args.top_k, scale=1 / args.rank, impl=impl)[0]
    calls[impl] = common.compiled(layer, u, kernel, router, lora_a, lora_b)[0]
  times = common.interleaved(calls, args.rounds, {i: args.slow_rounds for i in SLOW})
  plain = np.median(times["plain"])
  return {"experts": experts, "d_in": d_in, "d_out": d_out,
          "flop_bound": flop_bound(d_in, d_out, args.rank, experts, args.top_k),
          "plain_gflops": 2 * args.tokens * d_in * d_out / plain / 1e9,
          "times": {name: common.summary(t) for name, t in times.items()},
          "ratio": {name: common.ratio(t, times["plain"]) for name, t in times.items() if name != "plain"},
          "skipped": skipped}


def main():
  p = common.parser(__doc__)
  p.add_argument("--experts", default="36,166")
  p.add_argument("--shapes", default="2048x2048,5120x2048")
  p.add_argument("--tokens", type=int, default=2048)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--top_k", type=int, default=2)
  p.add_argument("--rounds", type=int, default=9)
  p.add_argument("--slow_rounds", type=int, default=3)
  p.add_argument("--impls", default="blocks,gather,dense,ragged")
  p.add_argument("--max_gib", type=float, default=2.0)
  args = p.parse_args()
  args.impls = args.impls.split(",")
  result = {"benchmark": "routed_layer", "machine": common.machine(), "tokens": args.tokens, "rank": args.rank,
            "top_k": args.top_k, "auto": routing.resolve_impl("auto"), "cases": []}
  for experts in map(int, args.experts.split(",")):
    for shape in args.shapes.split(","):
      d_in, d_out = map(int, shape.split("x"))
      result["cases"].append(measure(experts, d_in, d_out, args))
  header = ["E", "layer", "plain ms", "GFLOP/s"] + [f"{i} (spread)" for i in args.impls] + ["FLOP bound"]
  rows = []
  for c in result["cases"]:
    cells = []
    for impl in args.impls:
      if impl in c["skipped"]:
        cells.append("skipped")
      else:
        t = c["times"][impl]
        cells.append(f"{c['ratio'][impl]:.3f} ({t['min_s'] / c['times']['plain']['median_s']:.2f}-"
                     f"{t['max_s'] / c['times']['plain']['median_s']:.2f})")
    rows.append([c["experts"], f"{c['d_in']}->{c['d_out']}", f"{c['times']['plain']['median_s'] * 1e3:.1f}",
                 f"{c['plain_gflops']:.1f}"] + cells + [f"{c['flop_bound']:.3f}"])
  notes = [f"E={c['experts']} {c['d_in']}->{c['d_out']}: {impl} skipped, {why}"
           for c in result["cases"] for impl, why in c["skipped"].items()]
  common.emit(result, args.json, header, rows, notes)


if __name__ == "__main__":
  main()
