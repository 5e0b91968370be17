"""Serving throughput and latency: concurrent clients through the batching scheduler of `phatgoose serve`.

Usage: python benchmarks/serve.py [--size small] [--experts 36] [--top_k 2] [--rank 16] [--clients 1,8,32]
         [--batch_size 32] [--max_tokens 16] [--seconds 6] [--json]

Three random models of one size (`eval_shape` and random draws, routed_model.random_variables): the unrouted
base, the base with one LoRA, and the routed library as the server runs it (`serving.live_library`: E LoRA
experts in one program with per-row routing; every request asks PHATGOOSE's top-k over all E). For each model
and number of clients, each client thread submits one prompt of random bytes at a time to the scheduler
(`serving.scheduler`: iteration-level decoding in `batch_size` slots) and waits for its tokens; random
weights never emit EOS, so every request decodes `max_tokens` tokens. Reported: generated tokens per second
over the run and the p50 / p99 request latency. HTTP is not in the loop (the server adds its JSON and socket
work per request on the same CPUs). Every bucket is compiled before timing (`SlotDecoder.warm_up`).
"""
import threading
import time

import numpy as np

import common
from routed_model import random_variables
from phatgoose_jax import assembly, text_model
from phatgoose_jax import vocab as vocab_lib
from phatgoose_jax.experts import routing
from phatgoose_jax.experts.config import ExpertConfig
from phatgoose_jax.models import EncoderDecoderModel
from phatgoose_jax.serving import scheduler as sched
from phatgoose_jax.serving import slots
from phatgoose_jax.t5.config import preset


def text_models(args) -> dict:
  """{name: (TextModel, one row's routing inputs or None)}."""
  config = preset(args.size, dropout_rate=0.0)
  variants = {"base": ExpertConfig(), "lora": ExpertConfig(mode="lora", rank=args.rank),
              "routed": ExpertConfig(mode="routed", rank=args.rank, num_experts=args.experts, top_k=args.top_k,
                                     score="per_row")}
  route = routing.RowRouting(np.int32(0), np.ones(args.experts, bool), np.int32(args.top_k))
  vocabulary = vocab_lib.get_vocabulary("byte")
  out = {}
  for name, experts in variants.items():
    model = EncoderDecoderModel(config, experts)
    out[name] = (text_model.TextModel(assembly.LoadedModel(model, random_variables(model)), vocabulary,
                                      args.batch_size), route if name == "routed" else None)
  return out


def run(model, route, clients: int, args) -> dict:
  """Tokens per second and latencies of `clients` threads asking `model` for `seconds`."""
  scheduler = sched.Scheduler(4 * clients, None, args.batch_size, args.prompt_length, args.max_tokens)
  rng = np.random.default_rng(clients)
  prompts = [list(rng.integers(3, 259, args.prompt_length)) for _ in range(64)]
  latencies, tokens = [], []
  stop_at = time.monotonic() + args.seconds

  def client(c):
    i = c
    while time.monotonic() < stop_at:
      row = sched.GenerateRow([int(t) for t in prompts[i % 64]], args.max_tokens, 0.0, 1.0,
                              text_model.prompt_key(0, i), [], route)
      start = time.monotonic()
      result = scheduler.submit(sched.Job("m", lambda: model, "generate", [row], start + 600)).result()
      latencies.append(time.monotonic() - start)
      tokens.append(len(result[0]["token_ids"]))
      i += clients

  start = time.monotonic()
  threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  seconds = time.monotonic() - start
  scheduler.close()
  p50, p99 = np.percentile(latencies, [50, 99])
  return {"clients": clients, "requests": len(latencies), "tokens_per_s": sum(tokens) / seconds,
          "p50_s": float(p50), "p99_s": float(p99)}


def main():
  p = common.parser(__doc__)
  p.add_argument("--size", default="small")
  p.add_argument("--experts", type=int, default=36)
  p.add_argument("--top_k", type=int, default=2)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--clients", default="1,8,32")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--prompt_length", type=int, default=32)
  p.add_argument("--max_tokens", type=int, default=16)
  p.add_argument("--seconds", type=float, default=6.0)
  args = p.parse_args()
  models = text_models(args)
  result = {"benchmark": "serve", "machine": common.machine(), "size": args.size, "experts": args.experts,
            "top_k": args.top_k, "rank": args.rank, "batch_size": args.batch_size, "max_tokens": args.max_tokens,
            "prompt_length": args.prompt_length, "runs": []}
  for name, (model, route) in models.items():
    slots.SlotDecoder(model, args.batch_size, args.prompt_length, args.max_tokens, route).warm_up()
    for clients in map(int, args.clients.split(",")):
      result["runs"].append({"model": name, **run(model, route, clients, args)})
  base = {r["clients"]: r["tokens_per_s"] for r in result["runs"] if r["model"] == "base"}
  one = {r["model"]: r["tokens_per_s"] for r in result["runs"] if r["clients"] == 1}
  rows = [[r["model"], r["clients"], r["requests"], f"{r['tokens_per_s']:.1f}",
           f"{r['tokens_per_s'] / base[r['clients']]:.2f}", f"{r['tokens_per_s'] / one[r['model']]:.1f}",
           f"{r['p50_s'] * 1e3:.0f}", f"{r['p99_s'] * 1e3:.0f}"] for r in result["runs"]]
  common.emit(result, args.json, ["model", "clients", "requests", "tokens/s", "of base", "of 1 client",
                                  "p50 ms", "p99 ms"], rows)


if __name__ == "__main__":
  main()
