"""One optimiser step on the same batch: expert (LoRA) training vs gate training vs full fine-tuning.

Usage: python benchmarks/training_step.py [--preset small] [--batch 8] [--input_length 128]
         [--target_length 32] [--rank 16] [--rounds 5] [--json]

Each step is `jax.value_and_grad` of `EncoderDecoderModel.loss_fn` w.r.t. the trained collection only, then
an optax AdamW update, jitted with the trained variables and optimiser state donated:
  expert  mode 'lora':  trains `lora` (A, B of every linear layer; algorithm.md §2), base frozen;
  gate    mode 'gated': trains `gates` (one vector per linear layer; algorithm.md §3), base and LoRA frozen;
  full    mode 'none':  trains `params` (every base weight).
Peak memory is XLA's buffer assignment for the compiled step (`memory_analysis()`): arguments + outputs +
temporaries - donated (aliased) bytes, i.e. what the step holds at once; no allocation is measured.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

import common
from phatgoose_jax.experts.config import ExpertConfig
from phatgoose_jax.models import EncoderDecoderModel, shift_right, unbox
from phatgoose_jax.t5.config import preset

STEPS = {"expert": ("lora", "lora"), "gate": ("gated", "gates"), "full": ("none", "params")}


def make_step(model, collection, optimizer):
  def step(trained, opt_state, frozen, batch):
    loss_of = lambda t: model.loss_fn({**frozen, collection: t}, batch)[0]  # noqa: E731
    loss, grads = jax.value_and_grad(loss_of)(trained)
    updates, opt_state = optimizer.update(grads, opt_state, trained)
    return optax.apply_updates(trained, updates), opt_state, loss
  return step


def measure(name, config, batch, args):
  mode, collection = STEPS[name]
  model = EncoderDecoderModel(config, ExpertConfig(mode=mode, rank=args.rank))
  shapes = {k: batch[k].shape for k in ("encoder_input_tokens", "decoder_input_tokens")}
  variables = unbox(model.get_initial_variables(jax.random.key(0), shapes))
  trained = variables.pop(collection)
  optimizer = optax.adamw(1e-3)
  opt_state = optimizer.init(trained)
  exe = jax.jit(make_step(model, collection, optimizer), donate_argnums=(0, 1)).lower(
      trained, opt_state, variables, batch).compile()
  state = [trained, opt_state]

  def call():
    state[0], state[1], loss = exe(state[0], state[1], variables, batch)
    return loss
  jax.block_until_ready(call())
  mem = exe.memory_analysis()
  peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
  return call, {"trained_parameters": int(sum(x.size for x in jax.tree.leaves(trained))),
                "peak_bytes": int(peak), "temp_bytes": int(mem.temp_size_in_bytes),
                "argument_bytes": int(mem.argument_size_in_bytes)}


def main():
  p = common.parser(__doc__)
  p.add_argument("--preset", default="small")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--input_length", type=int, default=128)
  p.add_argument("--target_length", type=int, default=32)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--rounds", type=int, default=5)
  args = p.parse_args()
  config = preset(args.preset, dropout_rate=0.0)
  rng = np.random.default_rng(0)
  enc = rng.integers(2, config.vocab_size, (args.batch, args.input_length)).astype(np.int32)
  dec = rng.integers(2, config.vocab_size, (args.batch, args.target_length)).astype(np.int32)
  batch = {"encoder_input_tokens": jnp.asarray(enc), "decoder_input_tokens": jnp.asarray(shift_right(dec)),
           "decoder_target_tokens": jnp.asarray(dec)}
  calls, info = {}, {}
  for name in STEPS:
    calls[name], info[name] = measure(name, config, batch, args)
  times = common.interleaved(calls, args.rounds)
  result = {"benchmark": "training_step", "machine": common.machine(), "preset": args.preset, "batch": args.batch,
            "input_length": args.input_length, "target_length": args.target_length, "rank": args.rank,
            "steps": {n: {**info[n], "times": common.summary(times[n]), "ratio_to_full": common.ratio(
                times[n], times["full"])} for n in STEPS}}
  header = ["step", "trained params", "median ms", "spread ms", "/ full", "peak MiB", "temp MiB"]
  rows = [[n, f"{s['trained_parameters']:,}", f"{s['times']['median_s'] * 1e3:.1f}",
           f"{s['times']['min_s'] * 1e3:.0f}-{s['times']['max_s'] * 1e3:.0f}", f"{s['ratio_to_full']:.2f}",
           f"{s['peak_bytes'] / 2 ** 20:.1f}", f"{s['temp_bytes'] / 2 ** 20:.1f}"]
          for n, s in result["steps"].items()]
  common.emit(result, args.json, header, rows)


if __name__ == "__main__":
  main()
