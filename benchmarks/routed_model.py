"""Whole-model cost of per-token routing: routed / unrouted T5 forward and one cached decoding step.

Usage: python benchmarks/routed_model.py [--cases base:36,small:166] [--batch 4] [--input_length 128]
         [--target_length 32] [--top_k 2] [--rank 16] [--impls auto] [--rounds 5] [--json]
       JAX_PLATFORMS=cpu python benchmarks/routed_model.py --topology v5e:4x4 --cases xl:36,small:36
         [--mesh 1,4,4] [--batch 32 --input_length 512 --target_length 64] [--unrolled]

Every linear layer (attention q, k, v, o and FFN wi_0, wi_1, wo) carries E routed LoRA experts with random
weights and router vectors. Times (medians of interleaved rounds, compilation excluded): the teacher-forced
forward (`EncoderDecoderModel.logits`) over batch x (input_length + target_length) tokens, and one
`decode_step` with a KV cache (batch tokens through the decoder; cross-attention keys and values come from
the encoded input). The default compares the unrouted model with `impl='auto'` only (blocks for the
forward's tokens, gather for a decoding step's batch x k pairs: routing.resolve_impl), one routed model to
compile per case; `--impls blocks,gather` compares the paths (two more compilations of the routed T5).
Beside the forward: the unrouted forward's GFLOP/s and the ratio's FLOP bound, (F + 2 M) / F with F the
unrouted forward's FLOPs (XLA's cost analysis of the compiled program) and M routing's multiply-adds
(`routing_macs`).

With --topology (libtpu, JAX_PLATFORMS=cpu) nothing runs: the routed evaluation's programs (`score_batch`,
the encoder pass and one cached decoding step: `stage_programs.eval_programs`, the base in bfloat16, layers
under `nn.scan` unless --unrolled) and the unrouted model's are compiled for the topology on the mesh
(data, model, expert) of --mesh, and each row gives per chip the routed / unrouted roofline time
(`aot.Report.roofline_s`), FLOPs and bytes, the temporaries and the compile times.
"""
import jax
import jax.numpy as jnp
import numpy as np

import common
import gin
import phatgoose_jax.main  # noqa: F401  (registers the gin configurables the bindings below name)
from phatgoose_jax import aot, partitioning, stage_programs, utils
from phatgoose_jax.experts.config import ExpertConfig
from phatgoose_jax.models import EncoderDecoderModel, shift_right, unbox
from phatgoose_jax.t5.config import preset


def random_variables(model):
  """Every collection of `model` drawn from its shapes (`eval_shape` traces the model, nothing runs it):
  LayerNorm scales 1, every other leaf N(0, 0.05^2)."""
  abstract = unbox(jax.eval_shape(model.get_initial_variables, jax.random.key(0)))
  leaves, tree = jax.tree_util.tree_flatten_with_path(abstract)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return tree.unflatten([jnp.ones(x.shape, x.dtype) if jax.tree_util.keystr(path).endswith("['scale']")
                         else jax.random.normal(k, x.shape, x.dtype) * 0.05 for k, (path, x) in zip(keys, leaves)])


def zeros_like_output(fn, *args):
  """Zeros shaped as `fn(*args)`: inputs whose values do not change the time of what consumes them."""
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(fn, *args))


def routing_macs(experts: dict, encoder_tokens: int, decoder_tokens: int, top_k: int) -> int:
  """Multiply-adds routing adds to a teacher-forced forward: per routed module with <[E, d_in, r]> `lora_a`
  and <[E, r, d_out]> `lora_b`, tokens x (E d_in + k r (d_in + d_out)) (router scores, top-k LoRA experts);
  the encoder's modules and the cross-attention keys and values see the encoder tokens, the rest the decoder's."""
  flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(experts)[0]}
  total = 0
  for name, lora_a in flat.items():
    if name.endswith("['lora_a']"):
      num_experts, d_in, rank = lora_a.shape
      d_out = flat[name.replace("['lora_a']", "['lora_b']")].shape[-1]
      on_encoder = name.startswith("['encoder']") or (
          "encoder_decoder_attention" in name and ("['key']" in name or "['value']" in name))
      tokens = encoder_tokens if on_encoder else decoder_tokens
      total += tokens * (num_experts * d_in + top_k * rank * (d_in + d_out))
  return total


def model_calls(model, variables, batch, target_length):
  """(forward call, decode-step call, the forward's FLOPs by XLA's cost analysis) for one model, both
  compiled. The decoding step reads a cache of zeros at position 0 (its cost does not depend on the cached
  values)."""
  forward, exe = common.compiled(lambda v, b: model.logits(v, b), variables, batch)
  enc = batch["encoder_input_tokens"]
  encoded = zeros_like_output(model.encode, variables, enc)
  cache = zeros_like_output(lambda v, e, x: model.init_cache(v, e, x, target_length), variables, encoded, enc)
  token = batch["decoder_input_tokens"][:, :1]
  step = common.compiled(lambda v, c, e, x, t: model.decode_step(v, c, e, x, t)[0], variables, cache, encoded,
                         enc, token)[0]
  return forward, step, exe.cost_analysis()["flops"]


def measure(size, experts, args):
  config = preset(size, dropout_rate=0.0)
  rng = np.random.default_rng(0)
  enc = rng.integers(2, config.vocab_size, (args.batch, args.input_length)).astype(np.int32)
  dec = rng.integers(2, config.vocab_size, (args.batch, args.target_length)).astype(np.int32)
  batch = {"encoder_input_tokens": jnp.asarray(enc), "decoder_input_tokens": jnp.asarray(shift_right(dec)),
           "decoder_target_tokens": jnp.asarray(dec)}
  variants = {"unrouted": ExpertConfig()}
  variants.update({impl: ExpertConfig(mode="routed", rank=args.rank, num_experts=experts, top_k=args.top_k,
                                      impl=impl) for impl in args.impls})
  forward, step = {}, {}
  for name, expert_config in variants.items():
    model = EncoderDecoderModel(config, expert_config)
    variables = random_variables(model)
    forward[name], step[name], flops = model_calls(model, variables, batch, args.target_length)
    if name == "unrouted":
      unrouted_flops = flops
  extra = 2 * routing_macs(variables["experts"], enc.size, dec.size, args.top_k)
  out = {"model": size, "experts": experts, "unrouted_gflops": unrouted_flops / 1e9,
         "forward_flop_bound": (unrouted_flops + extra) / unrouted_flops}
  for what, calls in (("forward", forward), ("decode_step", step)):
    times = common.interleaved(calls, args.rounds)
    out[what] = {"times": {n: common.summary(t) for n, t in times.items()},
                 "ratio": {n: common.ratio(t, times["unrouted"]) for n, t in times.items() if n != "unrouted"}}
  return out


def topology_case(size, experts, args):
  """{program: {'routed': report, 'unrouted': report}} of one model compiled for `args.topology`."""
  config = preset(size, dropout_rate=0.0, dtype="bfloat16", scan_layers=not args.unrolled)
  gin.parse_config([f"utils.lora_config.rank = {args.rank}", "utils.frozen_base_dtype.dtype = 'bfloat16'",
                    f"assembly.routing.impl = '{args.impls[0]}'"])
  devices = aot.target_devices(args.topology)
  data, model, expert = (int(n) for n in args.mesh.split(","))
  mesh, rules = utils.sharding(mesh=partitioning.make_mesh(data, model, expert, devices=devices))
  lengths = {"inputs": args.input_length, "targets": args.target_length}
  out = {}
  for variant, num_experts in (("routed", experts), ("unrouted", 0)):
    for program in stage_programs.eval_programs(config, mesh, rules, num_experts, args.top_k,
                                                batch_size=args.batch, lengths=lengths):
      out.setdefault(program.name, {})[variant] = aot.compile_program(program, devices).as_dict()
  gin.clear_config()
  return {"model": size, "experts": experts, "mesh": dict(mesh.shape), "programs": out}


def topology_table(result, args):
  header = ["model", "E", "program", "roofline routed / unrouted", "FLOPs ratio", "bytes ratio",
            "temp GiB routed (unrouted)", "compile s routed (unrouted)"]
  rows = []
  for c in result["cases"]:
    for name, r in c["programs"].items():
      a, b = r["routed"], r["unrouted"]
      rows.append([c["model"], c["experts"], name, f"{a['roofline_s'] / b['roofline_s']:.3f}",
                   f"{a['flops'] / b['flops']:.3f}", f"{a['bytes_accessed'] / b['bytes_accessed']:.2f}",
                   f"{a['temp_bytes'] / aot.GiB:.2f} ({b['temp_bytes'] / aot.GiB:.2f})",
                   f"{a['compile_s']:.0f} ({b['compile_s']:.0f})"])
  common.emit(result, args.json, header, rows)


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
  p.add_argument("--topology", default=None, help="compile for this TPU topology (e.g. v5e:4x4); nothing runs")
  p.add_argument("--mesh", default="1,4,4", help="with --topology: the mesh's (data, model, expert) sizes")
  p.add_argument("--unrolled", action="store_true", help="with --topology: layers unrolled, not under nn.scan")
  args = p.parse_args()
  args.impls = args.impls.split(",")
  if args.topology:
    result = {"benchmark": "routed_model", "machine": common.machine(), "topology": args.topology,
              "batch": args.batch, "input_length": args.input_length, "target_length": args.target_length,
              "top_k": args.top_k, "rank": args.rank, "impl": args.impls[0], "scan_layers": not args.unrolled,
              "cases": [topology_case(c.split(":")[0], int(c.split(":")[1]), args) for c in args.cases.split(",")]}
    return topology_table(result, args)
  result = {"benchmark": "routed_model", "machine": common.machine(), "batch": args.batch,
            "input_length": args.input_length, "target_length": args.target_length, "top_k": args.top_k,
            "rank": args.rank, "cases": []}
  for case in args.cases.split(","):
    size, experts = case.split(":")
    result["cases"].append(measure(size, int(experts), args))
  header = ["model", "E", "what", "unrouted ms", "GFLOP/s"] + [f"{i} ratio (spread)" for i in args.impls] + [
      "FLOP bound"]
  rows = []
  for c in result["cases"]:
    for what in ("forward", "decode_step"):
      t = c[what]["times"]
      base = t["unrouted"]["median_s"]
      forward = what == "forward"
      rows.append([c["model"], c["experts"], what, f"{base * 1e3:.1f}",
                   f"{c['unrouted_gflops'] / base:.1f}" if forward else "-"] +
                  [f"{c[what]['ratio'][i]:.3f} ({t[i]['min_s'] / base:.2f}-{t[i]['max_s'] / base:.2f})"
                   for i in args.impls] + [f"{c['forward_flop_bound']:.3f}" if forward else "-"])
  common.emit(result, args.json, header, rows)


if __name__ == "__main__":
  main()
