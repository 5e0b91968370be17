"""Logical axis rules, the device mesh, and shardings for boxed variable trees (t5x style).

Every parameter carries LOGICAL axis names (`nn.with_logical_partitioning`), e.g. a query kernel is
`('embed', 'joined_kv')`. One list of `(logical, mesh)` rules maps them onto the physical mesh axes
`('data', 'model', 'expert')`, so the same model runs on one CPU or a pod by changing the mesh only:

  spec(leaf) = (rule(name_0), rule(name_1), ...),   rule(name) = first mesh axis the rules give `name`
  sharding(leaf) = NamedSharding(mesh, spec(leaf))

Divisibility policy: when a mesh axis of size n does not divide the array dimension it would split (a tiny
vocabulary of 259 over model=2, say), that dimension is REPLICATED and a warning is logged (`strict=False`,
the default); `strict=True` raises instead. A batch whose size the data axes do not divide always raises,
since replicating the batch would silently multiply the work.

Expert parallelism: the stacked experts' leading `expert` dimension goes over the 'expert' mesh axis (each
device holds E / n experts) and their LoRA dimensions follow the base kernel's (`mlp`, `joined_kv` over
'model'); inside the routed layer each device routes its own share of the tokens with the layer's experts
gathered (`experts/sharded.py`). Multi-host: each process feeds the rows of the batch its devices hold
(`process_batch_rows`, `data_shard`).
"""
import logging
import math
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from phatgoose_jax import models
from phatgoose_jax.experts.config import ExpertConfig
from phatgoose_jax.t5.config import T5Config

MESH_AXES = ("data", "model", "expert")

LogicalRules = Sequence[tuple]


@gin.configurable
def standard_logical_axis_rules(additional_rules: LogicalRules = ()) -> tuple:
  """t5x's 1-D data / 1-D model rules plus the expert axis (t5x `standard_logical_axis_rules`, MoE contrib).

  Activations shard `batch` over 'data' and 'expert' (as t5x's MoE rules do: outside the routed mix the
  expert axis is one more data axis); weights shard their wide dimension (`vocab`, `mlp`, `heads`,
  `joined_kv`) over 'model' and the `expert` dimension over 'expert'; `embed`, `kv`, `rank`, position
  buckets, `length` and the scanned stacks' `layers` stay replicated. `additional_rules` come first, so they override these.
  """
  rules = (
      ("batch", ("data", "expert")),
      ("vocab", "model"),
      ("embed", None),
      ("mlp", "model"),
      ("heads", "model"),
      ("kv", None),
      ("joined_kv", "model"),
      ("relpos_buckets", None),
      ("abspos_buckets", None),
      ("length", None),
      ("expert", "expert"),
      ("rank", None),
      ("layers", None),
  )
  return tuple(tuple(r) for r in additional_rules) + rules


@gin.configurable
def make_mesh(data: int = -1, model: int = 1, expert: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A `Mesh` with axes ('data', 'model', 'expert') of shape (data, model, expert) over `devices`.

  At most one size may be -1: it takes whatever the others leave, `len(devices) / prod(others)`.
  The product must equal the device count exactly (all devices are used; pass `devices` to use fewer).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = [data, model, expert]
  if shape.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got (data, model, expert) = {tuple(shape)}")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh axis sizes must be positive or -1, got {tuple(shape)}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"cannot fill the -1 mesh axis: {len(devices)} devices are not divisible by "
                       f"the other axes' product {known} (data, model, expert = {tuple(shape)})")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh (data, model, expert) = {tuple(shape)} needs {math.prod(shape)} devices, "
                     f"but {len(devices)} are given")
  # TPU: laid out along the physical torus (splitting physical axes where the shape needs it); GPU and CPU:
  # the devices in id order.
  grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  return Mesh(grid, MESH_AXES)


def _mesh_axes_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def _spec_and_misfits(names: Sequence[Optional[str]], shape: Sequence[int], mesh, rules: LogicalRules,
                      what: str) -> tuple:
  """(PartitionSpec, [why each replicated dimension was not split]) of one array."""
  if len(names) != len(shape):
    raise ValueError(f"{what}: {len(names)} logical axis names {tuple(names)} for a rank-{len(shape)} array")
  spec, misfits = [], []
  for dim, (name, axes, size) in enumerate(zip(names, nn.logical_to_mesh_axes(names, rules), shape)):
    n = _mesh_axes_size(mesh, axes)
    if size % n:
      misfits.append(f"{what}: dimension {dim} ({name!r}, size {size}) is not divisible by mesh axes {axes} "
                     f"of size {n}")
      axes = None
    spec.append(axes)
  return PartitionSpec(*spec), misfits


def logical_to_mesh_spec(names: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
                         rules: LogicalRules, strict: bool = False, what: str = "array") -> PartitionSpec:
  """The mesh `PartitionSpec` of one array of `shape` whose dimensions carry logical `names`.

  A dimension whose mesh axes do not divide it is replicated with a warning, or raises if `strict`.
  """
  spec, misfits = _spec_and_misfits(names, shape, mesh, rules, what)
  if misfits and strict:
    raise ValueError(misfits[0])
  for msg in misfits:
    logging.warning("%s; replicating that dimension", msg)
  return spec


def _is_boxed(x) -> bool:
  return isinstance(x, nn.Partitioned)


def variables_shardings(variables: Any, mesh: Mesh, rules: LogicalRules, strict: bool = False) -> Any:
  """A tree of `NamedSharding`s matching `unbox(variables)`, from each leaf's logical axis names.

  Boxed leaves (`nn.Partitioned`, as `nn.with_logical_partitioning` makes) follow the rules; plain arrays
  are replicated.
  """
  def one(path, leaf):
    if _is_boxed(leaf):
      value = leaf.value
      spec = logical_to_mesh_spec(leaf.names, np.shape(value), mesh, rules, strict,
                                  what=jax.tree_util.keystr(path))
      return NamedSharding(mesh, spec)
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree_util.tree_map_with_path(one, variables, is_leaf=_is_boxed)


def unbox(variables: Any) -> Any:
  """The plain-array tree of a (possibly) boxed variables tree."""
  return nn.meta.unbox(variables)


def batch_sharding(mesh: Mesh, rules: LogicalRules) -> NamedSharding:
  """The sharding of every batch array: leading (`batch`) dimension over the mesh axes `batch` maps to."""
  return NamedSharding(mesh, PartitionSpec(nn.logical_to_mesh_axes(("batch",), rules)[0]))


def check_batch_divisible(batch_size: int, mesh: Mesh, rules: LogicalRules):
  """Raise unless the batch's mesh axes divide `batch_size`."""
  n = _mesh_axes_size(mesh, nn.logical_to_mesh_axes(("batch",), rules)[0])
  if batch_size % n:
    raise ValueError(f"batch size {batch_size} is not divisible by the {n} devices of the data axes")


def process_batch_rows(mesh: Mesh, rules: LogicalRules, global_batch_size: int) -> slice:
  """The rows of a global batch that this process's devices hold: the part of the batch it feeds.

  With the batch over 'data' and the devices of each process contiguous along it, process i of P holds
  rows [i B / P, (i + 1) B / P); a process whose devices span the whole data axis holds every row.
  """
  check_batch_divisible(global_batch_size, mesh, rules)
  rows = {(s[0].start or 0, s[0].stop or global_batch_size)
          for s in batch_sharding(mesh, rules).addressable_devices_indices_map((global_batch_size,)).values()}
  lo, hi = min(r[0] for r in rows), max(r[1] for r in rows)
  if sum(stop - start for start, stop in rows) != hi - lo:
    raise ValueError(f"this process's devices hold the non-contiguous batch rows {sorted(rows)}; order the "
                     f"mesh's devices so that each process's devices are adjacent along the data axes")
  return slice(lo, hi)


def data_shard(mesh: Mesh, rules: LogicalRules) -> tuple:
  """(index, num_shards): which of the batch's equal row blocks this process feeds (t5x's data layout)."""
  n = _mesh_axes_size(mesh, nn.logical_to_mesh_axes(("batch",), rules)[0])
  rows = process_batch_rows(mesh, rules, n)
  size = rows.stop - rows.start
  return rows.start // size, n // size


def _bytes(num: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if num < 1024 or unit == "GiB":
      return f"{num:.1f} {unit}" if unit != "B" else f"{int(num)} B"
    num /= 1024


def _shard_size(shape: Sequence[int], spec: PartitionSpec, mesh: Union[Mesh, AbstractMesh]) -> int:
  """Elements of the largest shard of an array of `shape` laid out by `spec` on `mesh`."""
  return math.prod(-(-size // _mesh_axes_size(mesh, axes)) for size, axes in zip(shape, tuple(spec)))


def describe(config: T5Config, expert_config: ExpertConfig, mesh: Union[Mesh, AbstractMesh],
             rules: LogicalRules) -> str:
  """What a run would use, without allocating: the mesh, the rules, and parameter bytes per device.

  The variables' shapes come from `jax.eval_shape` of the model's initialisation; a leaf of shape s laid
  out by spec p takes `prod_d ceil(s_d / n(p_d))` elements on each device, n(p_d) the size of the mesh axes
  dimension d is split over (1 when replicated). `mesh` may be an `AbstractMesh`: a pod's mesh can be
  described from one machine.
  """
  model = models.EncoderDecoderModel(config, expert_config)
  variables = jax.eval_shape(model.get_initial_variables, jax.random.key(0))
  devices = ", ".join(f"{n} x {kind}" for kind, n in _device_kinds(mesh).items())
  lines = [f"mesh: {', '.join(f'{a}={n}' for a, n in mesh.shape.items())} ({devices})", "rules:"]
  lines += [f"  {name:16s} -> {axes}" for name, axes in rules]
  lines.append("parameters (per device = the largest shard one device holds):")
  lines.append(f"  {'collection':12s} {'arrays':>7s} {'total':>12s} {'per device':>12s}")
  totals, misfits = [0, 0, 0], []
  for collection, tree in variables.items():
    count, total, per_device = 0, 0, 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_boxed):
      value = leaf.value if _is_boxed(leaf) else leaf
      names = leaf.names if _is_boxed(leaf) else (None,) * len(value.shape)
      spec, why = _spec_and_misfits(names, value.shape, mesh, rules, collection + jax.tree_util.keystr(path))
      misfits += why
      count += 1
      total += value.size * value.dtype.itemsize
      per_device += _shard_size(value.shape, spec, mesh) * value.dtype.itemsize
    lines.append(f"  {collection:12s} {count:7d} {_bytes(total):>12s} {_bytes(per_device):>12s}")
    totals = [totals[0] + count, totals[1] + total, totals[2] + per_device]
  lines.append(f"  {'all':12s} {totals[0]:7d} {_bytes(totals[1]):>12s} {_bytes(totals[2]):>12s}")
  if misfits:
    lines.append(f"replicated, not split ({len(misfits)} dimensions; the first: {misfits[0]})")
  return "\n".join(lines)


def _device_kinds(mesh: Union[Mesh, AbstractMesh]) -> dict:
  """{device kind: count} of a concrete mesh; {'abstract devices': n} of an `AbstractMesh`."""
  if isinstance(mesh, AbstractMesh):
    return {"abstract devices": mesh.size}
  kinds = {}
  for d in mesh.devices.flat:
    kinds[d.device_kind] = kinds.get(d.device_kind, 0) + 1
  return kinds
