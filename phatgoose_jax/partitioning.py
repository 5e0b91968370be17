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
"""
import logging
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "model", "expert")

LogicalRules = Sequence[tuple]


@gin.configurable
def standard_logical_axis_rules(additional_rules: LogicalRules = ()) -> tuple:
  """t5x's 1-D data / 1-D model rules plus the expert axis (t5x `standard_logical_axis_rules`, MoE contrib).

  Activations shard `batch` over 'data'; weights shard their wide dimension (`vocab`, `mlp`, `heads`,
  `joined_kv`) over 'model' and the `expert` dimension over 'expert'; `embed`, `kv`, `rank`, position
  buckets and `length` stay replicated. `additional_rules` come first, so they override these.
  """
  rules = (
      ("batch", "data"),
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
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (AssertionError, ValueError, NotImplementedError):
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, MESH_AXES)


def _mesh_axes_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_mesh_spec(names: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
                         rules: LogicalRules, strict: bool = False, what: str = "array") -> PartitionSpec:
  """The mesh `PartitionSpec` of one array of `shape` whose dimensions carry logical `names`.

  A dimension whose mesh axes do not divide it is replicated with a warning, or raises if `strict`.
  """
  if len(names) != len(shape):
    raise ValueError(f"{what}: {len(names)} logical axis names {tuple(names)} for a rank-{len(shape)} array")
  mesh_axes = nn.logical_to_mesh_axes(names, rules)
  spec = []
  for dim, (name, axes, size) in enumerate(zip(names, mesh_axes, shape)):
    n = _mesh_axes_size(mesh, axes)
    if size % n:
      msg = (f"{what}: dimension {dim} ({name!r}, size {size}) is not divisible by mesh axes {axes} "
             f"of size {n}")
      if strict:
        raise ValueError(msg)
      logging.warning("%s; replicating that dimension", msg)
      axes = None
    spec.append(axes)
  return PartitionSpec(*spec)


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
