"""Programs compiled ahead of time for a target (a TPU topology this host need not own, or the local devices),
from shapes only, with the compiler's memory and cost figures (MaxText `train_compile.py` style).

A program is a jitted function with abstract arguments (`jax.ShapeDtypeStruct`s carrying `NamedSharding`s
on a mesh of the target's devices): `lower(...).compile()` builds the real executable and nothing is
allocated. Per chip:

  needed     = argument + temporary + output - alias bytes          (`compiled.memory_analysis()`)
  roofline_s = max(flops / peak_flops, bytes_accessed / bandwidth)   (`compiled.cost_analysis()`, `CHIPS`)

XLA counts a while loop's body once (a scan over 24 layers reports one layer's FLOPs), so a program whose
layers run under `nn.scan`, or whose gradient accumulates over micro-batches, carries `cost_terms`: loop-free
programs whose weighted sum of counts is its own (`stage_programs.loop_free_costs`). Its memory is its own.

A program fits when `needed` <= the chip's memory. Compiling for a TPU topology needs libtpu
(`pip install "phatgoose-jax[tpu]"`, i.e. `jax[tpu]`); with JAX_PLATFORMS=cpu it compiles on any host.
"""
import dataclasses
import math
import time
from typing import Any, Callable, Optional, Sequence

import jax

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip: HBM bytes, peak dense bf16 FLOP/s and HBM bytes/s, with where the figures are from."""
  name: str
  memory: float
  peak_flops: float
  bandwidth: float
  source: str


_TPU_DOCS = "cloud.google.com/tpu/docs/"
CHIPS = {  # by `device.device_kind`
    "TPU v4": Chip("TPU v4", 32 * GiB, 275e12, 1228e9, _TPU_DOCS + "v4"),
    "TPU v5 lite": Chip("TPU v5e", 16 * GiB, 197e12, 819e9, _TPU_DOCS + "v5e"),
    "TPU v5": Chip("TPU v5p", 95 * GiB, 459e12, 2765e9, _TPU_DOCS + "v5p"),
    "TPU v6 lite": Chip("TPU v6e", 32 * GiB, 918e12, 1640e9, _TPU_DOCS + "v6e"),
    "NVIDIA H100 80GB HBM3": Chip("H100 SXM", 80 * GiB, 989e12, 3350e9, "nvidia.com/en-us/data-center/h100"),
    "NVIDIA H200": Chip("H200", 141e9, 989e12, 4800e9, "nvidia.com/en-us/data-center/h200"),
}


class TopologyError(ValueError):
  """A topology that cannot be had here (no libtpu, an unknown name)."""


class DoesNotFit(ValueError):
  """A program whose memory the compiler itself refuses for the target chip."""


_ADVICE = "use more chips on the model/expert axes, a smaller batch or gradient accumulation"


def target_devices(topology: Optional[str] = None) -> list:
  """The devices programs are compiled for: a TPU topology's (`v5e:4x4`, `v4:2x2x4`, `v5p:2x2x4`, ...), or
  this process's `jax.devices()` without one."""
  if topology is None:
    return list(jax.devices())
  try:
    import libtpu  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise TopologyError(f"--topology {topology} compiles for TPU and needs libtpu: pip install "
                        f"'jax[tpu]==0.10.2' (phatgoose-jax[tpu]), then rerun with JAX_PLATFORMS=cpu") from e
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    description = topologies.get_topology_desc(topology_name=topology, platform="tpu", **_chip_config(topology))
    return list(description.devices)
  except Exception as e:  # libtpu reports a bad name as several error types
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise TopologyError(f"unknown or unsupported TPU topology {topology!r} ({first}); names look like "
                        f"v5e:2x2, v5e:4x4, v4:2x2x2, v5p:2x2x4") from e


def _chip_config(topology: str) -> dict:
  """How libtpu is to lay out a slice of `topology`: v4 and v5p chips hold two TensorCores that JAX drives as one
  device (megacore; without it libtpu gives a device per core, twice the chips at half their memory), their hosts
  2 x 2 x 1 chips, the torus wrapped from 4 x 4 x 4 on (MaxText's accelerator_to_spec_map.py)."""
  generation, _, shape = topology.partition(":")
  if generation not in ("v4", "v5p", "v5"):
    return {}
  dims = [int(n) for n in shape.split("x") if n.isdigit()]
  return {"chip_config_name": "megacore", "chips_per_host_bounds": (2, 2, 1), "num_slices": 1,
          "wrap": (len(dims) == 3 and min(dims) >= 4,) * 3}


def chip_of(devices: Sequence[jax.Device]) -> Optional[Chip]:
  """The `Chip` of the devices (None for a kind without published figures, e.g. a CPU)."""
  kind = devices[0].device_kind
  if kind in CHIPS:
    return CHIPS[kind]
  stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
  if stats and "bytes_limit" in stats:
    return Chip(kind, float(stats["bytes_limit"]), math.nan, math.nan, "the runtime's bytes_limit")
  return None


@dataclasses.dataclass(frozen=True)
class Program:
  """A stage's jitted function and the abstract arguments it runs on; `cost_terms` ((weight, Program), ...),
  when given, count its FLOPs and bytes (module docstring)."""
  name: str
  fn: Callable
  args: tuple
  kwargs: dict = dataclasses.field(default_factory=dict)
  cost_terms: tuple = ()


@dataclasses.dataclass(frozen=True)
class Report:
  """What the compiler says of one program on one chip (bytes per chip)."""
  name: str
  argument: int
  temp: int
  output: int
  alias: int
  flops: float
  bytes_accessed: float
  compile_s: float
  chip: Optional[Chip]

  @property
  def needed(self) -> int:
    return self.argument + self.temp + self.output - self.alias

  @property
  def roofline_s(self) -> float:
    if self.chip is None or math.isnan(self.chip.peak_flops):
      return math.nan
    return max(self.flops / self.chip.peak_flops, self.bytes_accessed / self.chip.bandwidth)

  @property
  def fits(self) -> bool:
    return self.chip is None or self.needed <= self.chip.memory

  def as_dict(self) -> dict:
    return {"program": self.name, "argument_bytes": self.argument, "temp_bytes": self.temp,
            "output_bytes": self.output, "alias_bytes": self.alias, "needed_bytes": self.needed,
            "chip": None if self.chip is None else self.chip.name,
            "chip_memory_bytes": None if self.chip is None else self.chip.memory, "fits": self.fits,
            "flops": self.flops, "bytes_accessed": self.bytes_accessed, "roofline_s": self.roofline_s,
            "compile_s": self.compile_s}


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


def compile_program(program: Program, devices: Sequence[jax.Device]) -> Report:
  """Compile `program` (nothing runs, nothing is allocated) and read its per-chip memory and cost."""
  started = time.perf_counter()
  try:
    compiled = program.fn.lower(*program.args, **program.kwargs).compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    why = str(e).split("RESOURCE_EXHAUSTED:", 1)[-1].strip().splitlines()[0]
    raise DoesNotFit(f"program {program.name!r} does not fit a {devices[0].device_kind} chip: {why}; "
                     f"{_ADVICE}") from e
  seconds = time.perf_counter() - started
  memory, cost = compiled.memory_analysis(), _cost(compiled)
  flops, moved = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  if program.cost_terms:
    terms = [(weight, compile_program(term, devices)) for weight, term in program.cost_terms if weight]
    flops, moved = (sum(w * getattr(r, field) for w, r in terms) for field in ("flops", "bytes_accessed"))
  return Report(program.name, int(memory.argument_size_in_bytes), int(memory.temp_size_in_bytes),
                int(memory.output_size_in_bytes), int(memory.alias_size_in_bytes), flops, moved, seconds,
                chip_of(devices))


def shortfall(reports: Sequence[Report]) -> Optional[str]:
  """One line naming the first program that does not fit and by how much; None when all fit."""
  for r in reports:
    if not r.fits:
      return (f"program {r.name!r} needs {r.needed / GiB:.2f} GiB per chip (arguments {r.argument / GiB:.2f} + "
              f"temporaries {r.temp / GiB:.2f} + outputs {r.output / GiB:.2f} - aliased {r.alias / GiB:.2f}) but a "
              f"{r.chip.name} has {r.chip.memory / GiB:.2f} GiB: {(r.needed - r.chip.memory) / GiB:.2f} GiB short; "
              f"{_ADVICE}")
  return None


def _mib(num: float) -> str:
  return f"{num / 2 ** 20:.1f}"


def format_reports(reports: Sequence[Report], devices: Sequence[jax.Device], topology: Optional[str]) -> str:
  """The per-chip table of `reports`, with the chip's figures and their source."""
  chip = chip_of(devices)
  where = topology or f"local {devices[0].platform} devices"
  head = f"compiled for {where}: {len(devices)} x {devices[0].device_kind}"
  if chip is not None and not math.isnan(chip.peak_flops):
    head += (f" ({chip.memory / GiB:.1f} GiB, {chip.peak_flops / 1e12:.0f} TFLOP/s bf16, "
             f"{chip.bandwidth / 1e9:.0f} GB/s; {chip.source})")
  lines = [head, f"  {'program':24s} {'args MiB':>9s} {'temp MiB':>9s} {'out MiB':>9s} {'need MiB':>9s} "
                 f"{'fits':>5s} {'GFLOP':>10s} {'GB moved':>9s} {'roofline ms':>11s} {'compile s':>9s}"]
  for r in reports:
    lines.append(f"  {r.name:24s} {_mib(r.argument):>9s} {_mib(r.temp):>9s} {_mib(r.output):>9s} "
                 f"{_mib(r.needed):>9s} {('yes' if r.fits else 'NO'):>5s} {r.flops / 1e9:10.2f} "
                 f"{r.bytes_accessed / 1e9:9.3f} {r.roofline_s * 1e3:11.3f} {r.compile_s:9.1f}")
  return "\n".join(lines)


def abstract(tree: Any, shardings: Any) -> Any:
  """`jax.ShapeDtypeStruct`s of `tree`'s leaves (arrays or shape structs) carrying `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
