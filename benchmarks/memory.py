"""Parameter bytes of a routed T5 (default XL, E = 36 and 166), in total and per device under expert sharding.

Usage: python benchmarks/memory.py [--preset xl] [--experts 36,166] [--rank 16]
         [--meshes model=1:expert=2,model=2:expert=2,model=1:expert=8] [--json]

Shapes come from `jax.eval_shape` of the model's initialisation (nothing is allocated); each variable is
laid out by its logical axis names under `partitioning.standard_logical_axis_rules()` (stacked experts on
the 'expert' mesh axis, base and LoRA weights' wide dimensions on 'model') over an `AbstractMesh`, and one
device holds prod_d ceil(size_d / n_d) elements of it, n_d the size of the mesh axes dimension d is split
over (1 when replicated). The rules replicate a dimension its mesh axes do not divide: E = 36 or 166
experts stay whole on an 8-way 'expert' axis (36 = 4 x 9, 166 = 2 x 83), as the notes under the table say.
"""
import logging
import math

import flax.linen as nn
import jax
from jax.sharding import AbstractMesh

import common
from phatgoose_jax import partitioning
from phatgoose_jax.experts.config import ExpertConfig
from phatgoose_jax.models import EncoderDecoderModel
from phatgoose_jax.t5.config import preset


def mesh_of(spec: str) -> AbstractMesh:
  sizes = dict(item.split("=") for item in spec.split(":"))
  return AbstractMesh(tuple(int(sizes.get(a, 1)) for a in partitioning.MESH_AXES), partitioning.MESH_AXES)


def shard_elements(shape, spec, mesh) -> int:
  def split(axes):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)
  return math.prod(-(-size // split(axes)) for size, axes in zip(shape, tuple(spec) + (None,) * len(shape)))


def collection_bytes(variables, meshes, rules):
  """{collection: {"total": bytes, mesh name: bytes on one device}}."""
  out = {}
  for collection, tree in variables.items():
    row = {"total": 0, **{name: 0 for name in meshes}}
    for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
      value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
      names = leaf.names if isinstance(leaf, nn.Partitioned) else (None,) * value.ndim
      row["total"] += value.size * value.dtype.itemsize
      for name, mesh in meshes.items():
        spec = partitioning.logical_to_mesh_spec(names, value.shape, mesh, rules)
        row[name] += shard_elements(value.shape, spec, mesh) * value.dtype.itemsize
    out[collection] = row
  return out


def main():
  p = common.parser(__doc__)
  p.add_argument("--preset", default="xl")
  p.add_argument("--experts", default="36,166")
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--meshes", default="model=1:expert=2,model=2:expert=2,model=1:expert=8")
  args = p.parse_args()
  logging.getLogger().setLevel(logging.ERROR)  # replication of non-divisible dimensions: see the notes
  meshes = {spec: mesh_of(spec) for spec in args.meshes.split(",")}
  rules = partitioning.standard_logical_axis_rules()
  config = preset(args.preset)
  result = {"benchmark": "memory", "machine": common.machine(), "preset": args.preset, "rank": args.rank,
            "rules": [list(r) for r in rules], "cases": []}
  for experts in map(int, args.experts.split(",")):
    model = EncoderDecoderModel(config, ExpertConfig(mode="routed", rank=args.rank, num_experts=experts))
    variables = jax.eval_shape(model.get_initial_variables, jax.random.key(0))
    per = collection_bytes(variables, meshes, rules)
    per["all"] = {k: sum(row[k] for row in per.values()) for k in ["total", *meshes]}
    result["cases"].append({"experts": experts, "bytes": per})
  gib = lambda b: f"{b / 2 ** 30:.2f}"  # noqa: E731
  header = ["E", "collection", "total GiB"] + [f"per device GiB ({m})" for m in meshes]
  rows = [[c["experts"], coll, gib(row["total"])] + [gib(row[m]) for m in meshes]
          for c in result["cases"] for coll, row in c["bytes"].items()]
  notes = [f"E={c['experts']}: not divisible by the {m.shape['expert']}-way expert axis of {name}, experts "
           f"replicated" for c in result["cases"] for name, m in meshes.items() if c["experts"] % m.shape["expert"]]
  common.emit(result, args.json, header, rows, notes)


if __name__ == "__main__":
  main()
