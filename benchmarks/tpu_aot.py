"""Does a configuration fit its pod? Each stage's real programs AOT-compiled for TPU topologies from this host.

Usage: JAX_PLATFORMS=cpu python benchmarks/tpu_aot.py [--sizes xl,xxl] [--experts 36,166]
         [--stages train-expert,train-gate,evaluate] [--topologies v4:2x2x4,v5e:4x4,v5p:2x2x4]
         [--gin KEY=VALUE ...] [--json] [--out results.jsonl]

For every (size, E, stage, topology) the run file `gin/runs/<stage>.gin` and the model file are parsed
as the CLI does, with the mesh of the README's pod recipes (`MESHES`: training data=4 x model=4, routed
evaluation data=1 x model=4 x expert=4, 16 chips; model=8 x expert=2 where E does not divide 4, e.g. 166),
then `stage_programs.programs` are compiled for the topology (`aot.compile_program`): per chip argument / temporary / output bytes against the chip's memory,
the compiler's FLOPs and bytes accessed, the roofline time and the compile time. Nothing is allocated.
Each finished row is appended to `--out` at once (a long sweep keeps what it measured); `--json` prints
one JSON object at the end. Needs libtpu (`pip install "jax[tpu]==0.10.2"`).
"""
import argparse
import json
import os
import sys
import time

import gin

from phatgoose_jax import aot, main, partitioning, stage_programs, utils

MESHES = {"train-expert": (4, 4, 1), "train-gate": (4, 4, 1), "evaluate": (1, 4, 4)}


def mesh_shape(stage: str, experts: int) -> tuple:
  """(data, model, expert) of 16 chips: the recipe's mesh, with `expert` 2 (model 8) where E does not divide 4."""
  data, model, expert = MESHES[stage]
  if experts % expert:
    return data, model * expert // 2, 2
  return data, model, expert


def case(size: str, experts: int, stage: str, topology: str, extra: list) -> list:
  """The rows (one per program) of one configuration."""
  data, model, expert = mesh_shape(stage, experts if stage == "evaluate" else 1)
  bindings = [f"partitioning.make_mesh.data = {data}", f"partitioning.make_mesh.model = {model}",
              f"partitioning.make_mesh.expert = {expert}", f"main.dry_run.num_experts = {experts}"] + extra
  main.parse([f"models/t5_1_1_{size}.gin", f"runs/{stage.replace('-', '_')}.gin"], bindings, require=False)
  devices = aot.target_devices(topology)
  mesh, rules = utils.sharding(mesh=partitioning.make_mesh(devices=devices))
  rows = []
  for program in stage_programs.programs(utils.model_config(), mesh, rules, experts if stage == "evaluate" else 0):
    try:
      report = aot.compile_program(program, devices).as_dict()
    except aot.DoesNotFit as e:
      report = {"program": program.name, "fits": False, "error": str(e)}
    rows.append({"size": size, "experts": experts, "stage": stage, "topology": topology,
                 "mesh": dict(mesh.shape), **report})
  gin.clear_config()
  return rows


def _line(row: dict) -> str:
  if "error" in row:
    return f"{row['size']:4s} E={row['experts']:<4d} {row['stage']:13s} {row['topology']:10s} {row['program']:17s} " \
           f"does not fit: {row['error'][:90]}"
  gib = 1024 ** 3
  return (f"{row['size']:4s} E={row['experts']:<4d} {row['stage']:13s} {row['topology']:10s} {row['program']:17s} "
          f"args {row['argument_bytes'] / gib:6.2f} temp {row['temp_bytes'] / gib:6.2f} need "
          f"{row['needed_bytes'] / gib:6.2f} / {row['chip_memory_bytes'] / gib:5.1f} GiB "
          f"{'fits' if row['fits'] else 'NO':4s} {row['flops'] / 1e12:8.2f} TFLOP "
          f"roofline {row['roofline_s'] * 1e3:9.1f} ms compile {row['compile_s']:6.0f} s")


def main_(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="xl,xxl")
  parser.add_argument("--experts", default="36,166")
  parser.add_argument("--stages", default="train-expert,train-gate,evaluate")
  parser.add_argument("--topologies", default="v4:2x2x4,v5e:4x4,v5p:2x2x4")
  parser.add_argument("--gin", action="append", default=[], help="extra binding, e.g. train.fit.accum_steps=8")
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--out", help="append each row to this JSONL file as it is measured")
  args = parser.parse_args(argv)
  rows, started = [], time.time()
  counts = [int(e) for e in args.experts.split(",")]
  for size in args.sizes.split(","):
    for experts in counts:
      for stage in args.stages.split(","):
        if stage != "evaluate" and experts != counts[0]:
          continue  # a training stage holds one expert: the same programs for every E
        for topology in args.topologies.split(","):
          for row in case(size, experts, stage, topology, args.gin):
            rows.append(row)
            if args.out:
              with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            if not args.json:
              print(_line(row), flush=True)
  if args.json:
    print(json.dumps({"rows": rows, "seconds": round(time.time() - started, 1)}))
  return 0


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.exit(main_())
