"""The routed layer's implementation chosen from the compiler's cost, for the device the program is compiled FOR.

For a TPU or GPU target each candidate path's routed update (scores, top-k and the mix: the fused path also
changes how the scores are made; for a layer given with its plain matmul, the layer's whole output, which the
fused path forms in its own kernel) is lowered and compiled for one device of the target (`compiled_cost`) and
the least roofline time is taken:

  t = max(flops / peak FLOP/s, bytes accessed / HBM bandwidth)         (`roofline_seconds`, chip table `aot.CHIPS`)

with flops and bytes from the compiled executable's `cost_analysis()`. The choice is cached per (platform,
device kind, layer shape), so a model pays one set of lowerings per distinct layer shape per process, and
logged once. The target is the context mesh's devices (`jax.set_mesh`: an ahead-of-time compile for a TPU
topology from a CPU host targets the TPU), else the default backend's.

XLA's cost analysis counts a while loop's body once, whatever its trip count: a candidate whose compiled
program keeps a loop over more than LOOP_STATE_BYTES of state (everything a loop body touches is in its
carried tuple) would look cheaper than it is, so `compiled_cost` refuses it. Loops over small state (a
searchsorted of group offsets) cost next to nothing and are kept.
"""
import contextlib
import contextvars
import dataclasses
import logging
import math
import re
from typing import Callable, Mapping, Optional

import jax
import numpy as np
from jax._src import config as jax_config
from jax._src import mesh as mesh_lib
from jax._src.pallas.mosaic import error_handling

from phatgoose_jax import aot
from phatgoose_jax.experts import kernels

@dataclasses.dataclass(frozen=True)
class LayerShape:
  """One routed layer's sizes: `tokens` rows of width `d_in` -> `d_out`, E `experts` of rank r, top `k`; `plain`:
  costed with the layer's plain matmul (the layer's output, not only its routed update)."""
  tokens: int
  d_in: int
  d_out: int
  experts: int
  rank: int
  k: int
  dtype: str
  plain: bool = False

  @property
  def pairs(self) -> int:
    return self.tokens * self.k

  def arguments(self, device) -> tuple:
    """Abstract (u, router, lora_a, lora_b[, kernel]) of a routed layer of this shape, placed on `device`."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    spec = lambda shape: jax.ShapeDtypeStruct(shape, self.dtype, sharding=sharding)  # noqa: E731
    return (spec((self.tokens, self.d_in)), spec((self.experts, self.d_in)), spec((self.experts, self.d_in, self.rank)),
            spec((self.experts, self.rank, self.d_out))) + ((spec((self.d_in, self.d_out)),) if self.plain else ())


def roofline_seconds(flops: float, bytes_accessed: float, device_kind: str) -> float:
  """max(flops / peak, bytes / bandwidth) on one chip of `device_kind` (a key of `aot.CHIPS`)."""
  if device_kind not in aot.CHIPS:
    raise ValueError(f"no peak FLOP/s and bandwidth known for device kind {device_kind!r} (known: "
                     f"{sorted(aot.CHIPS)}); set ExpertConfig.impl to a named implementation")
  chip = aot.CHIPS[device_kind]
  return max(flops / chip.peak_flops, bytes_accessed / chip.bandwidth)


_COSTED_FOR = contextvars.ContextVar("costed_for", default=None)


def target_device():
  """The device a candidate is being costed for (`compiled_cost`), else the first device of the context mesh
  (`jax.set_mesh`, also inside `jit`), else the default backend's."""
  if _COSTED_FOR.get() is not None:
    return _COSTED_FOR.get()
  mesh = mesh_lib.get_concrete_mesh()
  if mesh is not None and not mesh.empty:
    return mesh.devices.flat[0]
  return jax.devices()[0]


def targets_tpu() -> bool:
  """Whether the program being traced is for a TPU (`target_device`): Pallas TPU kernels are compiled there and
  interpreted elsewhere (exact, slow: for tests)."""
  return target_device().platform == "tpu"


LOOP_STATE_BYTES = 2 ** 20
_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
               "f64": 8, "s64": 8, "u64": 8}


def loop_state_bytes(hlo_text: str) -> list[int]:
  """Bytes of each while loop's carried tuple in compiled HLO text."""
  sizes = []
  for carried in re.findall(r"= \((.*?)\) while\(", hlo_text):
    arrays = re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", carried)
    sizes.append(sum(_ITEM_BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d) for t, dims in arrays))
  return sizes


@contextlib.contextmanager
def _on_one_device(device):
  """A context mesh of `device` alone, also inside a trace (`jax.set_mesh` refuses to run there): the candidates'
  programs are lowered while the routed layer of a program on a mesh is being traced. Pallas reads the chip it
  lowers a kernel for from the context mesh (else from the default backend: this host's CPU)."""
  mesh = mesh_lib.Mesh(np.array([device]), ("data",))
  abstract = jax_config.abstract_mesh_context_manager.swap_local(mesh.abstract_mesh)
  concrete = jax_config.device_context.swap_local(mesh)
  resources, mesh_lib.thread_resources.env = mesh_lib.thread_resources.env, mesh_lib.EMPTY_ENV
  try:
    yield
  finally:
    jax_config.abstract_mesh_context_manager.set_local(abstract)
    jax_config.device_context.set_local(concrete)
    mesh_lib.thread_resources.env = resources


def compiled_cost(layer_fn: Callable, layer: LayerShape, device) -> tuple[float, float]:
  """(flops, bytes accessed) of `layer_fn(u, router, lora_a, lora_b[, kernel])`, one candidate's routed update
  (scores, top-k and mix: a path may change how the scores are made; with `layer.plain`, plus the plain matmul,
  which a path may form in its own kernel), for `layer`, its Pallas kernels compiled as `kernels.stand_ins` (the
  same figures: XLA counts a kernel by its cost estimate), compiled for `device`
  (`target_device()` is `device` while it is traced)."""
  token = _COSTED_FOR.set(device)
  try:
    # compiled for one device, not for the caller's mesh; Pallas kernels as stand-ins of the same cost estimate
    with _on_one_device(device), kernels.stand_ins():
      compiled = jax.jit(layer_fn).lower(*layer.arguments(device)).compile()
  finally:
    _COSTED_FOR.reset(token)
  big = [b for b in loop_state_bytes(compiled.as_text()) if b > LOOP_STATE_BYTES]
  if big:
    raise ValueError(f"the compiled program keeps while loops over {big} bytes, whose cost the analysis counts once")
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]), float(cost["bytes accessed"])


_CHOICES: dict = {}


def cheapest(candidates: Mapping[str, Callable], layer: LayerShape, device, cost: Optional[Callable] = None) -> str:
  """The candidate (a routed layer's update by one path) of least roofline time for `layer` on `device`, cached
  per (platform, kind, layer).

  `cost(layer_fn, layer, device) -> (flops, bytes)`, default `compiled_cost`; a candidate it refuses
  (ValueError) or that does not compile for the device (a Pallas kernel Mosaic rejects, e.g. for its VMEM) is
  left out. A single candidate is taken without a lowering.
  """
  if len(candidates) == 1:  # nothing to compare: no lowering
    return next(iter(candidates))
  cost = cost or compiled_cost
  key = (device.platform, device.device_kind, layer)
  if key not in _CHOICES:
    roofline_seconds(0, 0, device.device_kind)  # an unknown chip fails here, before any lowering
    times = {}
    for name, layer_fn in candidates.items():
      try:
        times[name] = roofline_seconds(*cost(layer_fn, layer, device), device.device_kind)
      except (ValueError, jax.errors.JaxRuntimeError, error_handling.MosaicError) as e:
        logging.info("routing: %s left out for %s: %s", name, layer, e)
    if not times:
      raise ValueError(f"no routing implementation could be costed for {layer} on {device.device_kind}; "
                       "set ExpertConfig.impl to a named implementation")
    _CHOICES[key] = min(times, key=times.get)
    logging.info("routing: auto takes %s for %s on %s (roofline us: %s)", _CHOICES[key], layer,
                 device.device_kind, {n: round(t * 1e6, 1) for n, t in sorted(times.items(), key=lambda x: x[1])})
  return _CHOICES[key]


def clear_cache():
  _CHOICES.clear()
