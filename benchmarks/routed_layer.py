"""One routed linear layer at T5-XL sizes: time of `u W + route(u)` per implementation over the plain `u W`.

Usage: python benchmarks/routed_layer.py [--experts 36,166] [--shapes 2048x2048,5120x2048] [--tokens 2048]
         [--rank 16] [--top_k 2] [--rounds 9] [--impls blocks,gather,dense,ragged] [--json]
       JAX_PLATFORMS=cpu python benchmarks/routed_layer.py --topology v5e:2x2 [--impls tiles,fused,grouped,dense]
       JAX_PLATFORMS=cpu python benchmarks/routed_layer.py --topology v5e:4x4 --mesh 1,4,4 [--impls auto,grouped]

For each (E, d_in x d_out) it prints the median time of the plain layer and of each routed implementation
(router scores + top-k + mixed LoRA outputs + the plain layer), their ratio, the min-max spread, the FLOP
bound of that ratio, and the plain matmul's achieved GFLOP/s. FLOP bound (multiply-adds per token):

  plain d_in d_out;  router E d_in;  top-k LoRA k r (d_in + d_out);
  bound = 1 + E / d_out + k r (d_in + d_out) / (d_in d_out).

An implementation whose largest intermediate exceeds --max_gib (dense: tokens E d_out floats; gather:
tokens k d_in r) is skipped and marked so; ragged and the other slow paths get at most --slow_rounds rounds.

With --topology (e.g. v5e:2x2, v4:2x2x1; libtpu, JAX_PLATFORMS=cpu) nothing runs: each layer is compiled for
one chip of the topology (bf16 by default, --tokens 16384) and the compiler's cost analysis gives its
roofline time, max(FLOPs / peak, bytes accessed / bandwidth) (`cost.roofline_seconds`); the table reports
routed / plain roofline, FLOP and byte ratios and compile seconds per implementation (names of
`routing.mixer`: blocks@128 is the one-chunk blocks path with 128-row blocks, grouped the megablox kernel,
fused the Pallas kernels of experts/kernels.py).
A program that keeps a while loop over more than 1 MiB of state is marked "loop": XLA counts a loop body
once, so its figures are a lower bound. --max_gib does not apply (nothing is allocated). With --mesh D,M,E
the model's own linear layer (`ExpertDense`, plain and routed, logical rules in context) is compiled on a
(data, model, expert) mesh of all the topology's chips, --tokens split as the batch is: per-chip figures of the
routed layer as the model runs on that mesh (`experts/sharded.py`).
"""
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import common
from phatgoose_jax import aot, partitioning, utils
from phatgoose_jax.experts import cost, routing
from phatgoose_jax.experts.config import ExpertConfig
from phatgoose_jax.experts.lora import ExpertDense

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
    calls[impl] = common.compiled(routed_layer(impl, args.top_k, args.rank), u, kernel, router, lora_a, lora_b)[0]
  times = common.interleaved(calls, args.rounds, {i: args.slow_rounds for i in SLOW})
  plain = np.median(times["plain"])
  return {"experts": experts, "d_in": d_in, "d_out": d_out,
          "flop_bound": flop_bound(d_in, d_out, args.rank, experts, args.top_k),
          "plain_gflops": 2 * args.tokens * d_in * d_out / plain / 1e9,
          "times": {name: common.summary(t) for name, t in times.items()},
          "ratio": {name: common.ratio(t, times["plain"]) for name, t in times.items() if name != "plain"},
          "skipped": skipped}


def routed_layer(impl, top_k, rank):
  """u W + route(u): the plain layer plus the routed LoRA update by `impl` (`route` given W: the fused path forms
  both in its combine kernel)."""
  return lambda u, w, r, a, b: routing.route(u, r, a, b, top_k=top_k, scale=1 / rank, impl=impl, kernel=w)[0]


def compiled_figures(fn, args, device_kind):
  """FLOPs, bytes accessed, roofline seconds, compile seconds and whether a large loop is kept."""
  started = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  seconds = time.perf_counter() - started
  figures = compiled.cost_analysis()
  figures = figures[0] if isinstance(figures, (list, tuple)) else figures
  flops, nbytes = float(figures["flops"]), float(figures["bytes accessed"])
  loop = any(b > cost.LOOP_STATE_BYTES for b in cost.loop_state_bytes(compiled.as_text()))
  return {"flops": flops, "bytes": nbytes, "roofline_s": cost.roofline_seconds(flops, nbytes, device_kind),
          "compile_s": seconds, "loop": loop}


def estimate(experts, d_in, d_out, device, args):
  """The compiler's figures of the plain and routed layers for one chip `device` (nothing runs), compiled under
  a context mesh of it: the program's target, for `auto` and the grouped kernel."""
  with jax.set_mesh(jax.sharding.Mesh(np.array([device]), ("data",))):
    return _estimate(experts, d_in, d_out, device, args)


def _estimate(experts, d_in, d_out, device, args):
  sharding = jax.sharding.SingleDeviceSharding(device)
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, args.dtype, sharding=sharding)  # noqa: E731
  u, kernel = spec(args.tokens, d_in), spec(d_in, d_out)
  plain = compiled_figures(lambda u, w: u @ w, (u, kernel), device.device_kind)
  routed, refused = {}, {}
  for impl in args.impls:
    operands = (u, kernel, spec(experts, d_in), spec(experts, d_in, args.rank), spec(experts, args.rank, d_out))
    try:
      routed[impl] = compiled_figures(routed_layer(impl, args.top_k, args.rank), operands, device.device_kind)
    except ValueError as e:  # e.g. the tiles kernel where the chip's VMEM does not hold the experts
      refused[impl] = str(e)
      print(f"# E={experts} {d_in}->{d_out} {impl}: refused: {e}", file=sys.stderr, flush=True)
      continue
    print(f"# E={experts} {d_in}->{d_out} {impl}: {routed[impl]['roofline_s'] / plain['roofline_s']:.2f} "
          f"({routed[impl]['compile_s']:.0f} s)", file=sys.stderr, flush=True)
  return {"experts": experts, "d_in": d_in, "d_out": d_out, "plain": plain, "routed": routed, "refused": refused,
          "flop_bound": flop_bound(d_in, d_out, args.rank, experts, args.top_k),
          "ratio": {i: f["roofline_s"] / plain["roofline_s"] for i, f in routed.items()},
          "least": min(routed, key=lambda i: (routed[i]["loop"], routed[i]["roofline_s"]))}


def kernel_axes(d_in, d_out):
  """An XL layer's logical kernel axes: a wider output splits over 'model' (wi), a wider input too (wo)."""
  return ("mlp", "embed") if d_in > d_out else ("embed", "mlp")


def estimate_on_mesh(experts, d_in, d_out, devices, args):
  """The compiler's per-chip figures of the model's own linear layer (`ExpertDense`, plain and routed) on the
  (data, model, expert) mesh of --mesh over the topology's devices, laid out by the standard logical rules:
  the routed layer as the model runs it there (`experts/sharded.py`)."""
  mesh, rules = utils.sharding(mesh=partitioning.make_mesh(*map(int, args.mesh.split(",")), devices=devices))
  length = min(args.tokens, 512)
  shape = (args.tokens // length, length, d_in)
  figures = {}
  for mode, impls in (("none", ["plain"]), ("routed", args.impls)):
    for impl in impls:
      config = ExpertConfig(mode=mode, num_experts=experts, top_k=args.top_k, rank=args.rank,
                            impl="auto" if mode == "none" else impl, targets=("query",))
      layer = ExpertDense(features=d_out, kernel_axes=kernel_axes(d_in, d_out), experts=config, dtype=args.dtype,
                          name="query")
      boxed = jax.eval_shape(lambda: layer.init(jax.random.key(0), jnp.zeros(shape, args.dtype)))
      variables = aot.abstract(partitioning.unbox(boxed), partitioning.variables_shardings(boxed, mesh, rules))
      variables["params"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, args.dtype, sharding=x.sharding),
                                         variables["params"])
      spec = nn.logical_to_mesh_axes(("batch", "length", kernel_axes(d_in, d_out)[0]), rules)
      u = jax.ShapeDtypeStruct(shape, args.dtype, sharding=jax.sharding.NamedSharding(mesh, spec))
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        figures[impl] = compiled_figures(layer.apply, (variables, u), devices[0].device_kind)
  plain = figures.pop("plain")
  return {"experts": experts, "d_in": d_in, "d_out": d_out, "mesh": dict(mesh.shape), "plain": plain,
          "routed": figures, "flop_bound": flop_bound(d_in, d_out, args.rank, experts, args.top_k),
          "ratio": {i: f["roofline_s"] / plain["roofline_s"] for i, f in figures.items()}}


def topology_table(result, args):
  header = ["E", "layer", "plain us"] + [f"{i} (FLOPs, bytes, compile s)" for i in args.impls] + ["FLOP bound",
                                                                                                   "target"]
  rows = []
  for c in result["cases"]:
    plain = c["plain"]
    cells = [f"{c['ratio'][i]:.2f}{' loop' if f['loop'] else ''} ({f['flops'] / plain['flops']:.3f}, "
             f"{f['bytes'] / plain['bytes']:.1f}, {f['compile_s']:.0f})" if f else "does not fit"
             for i, f in ((i, c["routed"].get(i)) for i in args.impls)]
    rows.append([c["experts"], f"{c['d_in']}->{c['d_out']}", f"{plain['roofline_s'] * 1e6:.0f}"] + cells
                + [f"{c['flop_bound']:.3f}", "1.15" if c["experts"] <= 36 else "1.25"])
  return header, rows


def main():
  p = common.parser(__doc__)
  p.add_argument("--experts", default="36,166")
  p.add_argument("--shapes", default="2048x2048,5120x2048")
  p.add_argument("--tokens", type=int, default=None, help="default 2048 (CPU), 16384 (--topology)")
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--top_k", type=int, default=2)
  p.add_argument("--rounds", type=int, default=9)
  p.add_argument("--slow_rounds", type=int, default=3)
  p.add_argument("--impls", default=None, help="default blocks,gather,dense,ragged (CPU), "
                                               "fused,grouped,ragged,blocks@128,dense (--topology)")
  p.add_argument("--max_gib", type=float, default=2.0)
  p.add_argument("--topology", default=None, help="compile for one chip of this TPU topology, e.g. v5e:2x2")
  p.add_argument("--dtype", default=None, help="default float32 (CPU), bfloat16 (--topology)")
  p.add_argument("--mesh", default=None, help="with --topology: the (data, model, expert) sizes of a mesh over all "
                                              "its chips; the model's layer is compiled there (default: one chip)")
  args = p.parse_args()
  on_tpu = args.topology is not None
  args.tokens = args.tokens or (16384 if on_tpu else 2048)
  args.dtype = jnp.dtype(args.dtype or ("bfloat16" if on_tpu else "float32"))
  default_impls = "tiles,fused,grouped,ragged,blocks@128,dense" if on_tpu else "blocks,gather,dense,ragged"
  args.impls = (args.impls or default_impls).split(",")
  names = sorted({**routing.MIXERS, **routing.VARIANTS}) + ["auto"]
  unknown = [i for i in args.impls if i not in names]
  if unknown:
    p.exit(2, f"routed_layer.py: unknown --impls {unknown}; choose from {names}\n")
  try:
    devices = aot.target_devices(args.topology) if on_tpu else None
  except aot.TopologyError as e:
    p.exit(2, f"routed_layer.py: {e}\n")
  device = devices[0] if on_tpu else None
  result = {"benchmark": "routed_layer", "machine": common.machine(), "tokens": args.tokens, "rank": args.rank,
            "top_k": args.top_k, "dtype": args.dtype.name, "topology": args.topology,
            "device_kind": device.device_kind if on_tpu else None,
            "auto": None if on_tpu else routing.resolve_impl("auto", args.tokens * args.top_k), "cases": []}
  for experts in map(int, args.experts.split(",")):
    for shape in args.shapes.split(","):
      d_in, d_out = map(int, shape.split("x"))
      if args.mesh:
        result["cases"].append(estimate_on_mesh(experts, d_in, d_out, devices, args))
      else:
        result["cases"].append(estimate(experts, d_in, d_out, device, args) if on_tpu
                               else measure(experts, d_in, d_out, args))
  if on_tpu:
    header, rows = topology_table(result, args)
    where = f"per chip of the mesh {args.mesh} (data, model, expert)" if args.mesh else "for one chip"
    common.emit(result, args.json, header, rows, [f"compiled {where} of {args.topology} ({device.device_kind}), "
                                                  f"{args.dtype.name}, {args.tokens} tokens; ratios of roofline time"])
    return
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
