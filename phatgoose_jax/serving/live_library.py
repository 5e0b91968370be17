"""A library served by one program: its experts in a fixed number of slots, every per-token router over it.

The served model is the base with `capacity` routed experts whose score is 'per_row' (algorithm.md §4,
`routing.RowRouting`): each module's `experts` collection holds, per slot, the expert's LoRA factors and the
vectors of every per-token router that needs nothing beyond the library (`ROUTER_SCORES`): PHATGOOSE's gate
vectors (`router`), Arrow's singular vectors (`arrow`) and SpectR's bases (`spectr`, both cached in the
library by `routers.weight_derived`). A request for router R over experts S with top-k k is one row's
`routing(R, S, k)`: its score, a mask of S's slots and k, so rows of different routers, subsets and k share
one batch and one compiled program. Free slots hold zeros and are in no row's mask.

The variables are placed on the configured mesh with the logical axis rules (`utils.sharding`, as evaluation
places them). `add` writes a library entry into the lowest free slot and `remove` frees one; the arrays keep their shapes, so
neither recompiles. A slot stays out of reuse while requests that may route to it are in flight
(`acquire` / `release`). With no removal, slots follow the library's order, as a library model stacks its
experts (`routers.stack`).
"""
import threading
from typing import Optional, Sequence

import numpy as np

from phatgoose_jax import assembly
from phatgoose_jax import library as lib
from phatgoose_jax import routers, utils
from phatgoose_jax.checkpoints import names as ckpt_names
from phatgoose_jax.experts import routing
from phatgoose_jax.experts.config import ExpertConfig
from phatgoose_jax.models import EncoderDecoderModel
from phatgoose_jax.routers import arrow, spectr
from phatgoose_jax.t5 import layout

# The routers a live library serves, and the score (routing.ROW_SCORES) each routes by.
ROUTER_SCORES = {"phatgoose": "standardized", "arrow": "arrow", "spectr": "spectr"}


def _slot_shapes(expert: lib.Expert) -> dict:
  """The shape of one slot of each served array, '<module>/<part>': the LoRA factors ('lora_a', 'lora_b') as
  `expert` holds them and each router's vector ('router', 'arrow': [d_in]; 'spectr': [d_in, rank])."""
  shapes = {}
  for m in routers.modules_of(expert.lora):
    d_in, rank = expert.lora[f"{m}/lora_a"].shape
    shapes.update({f"{m}/lora_a": (d_in, rank), f"{m}/lora_b": expert.lora[f"{m}/lora_b"].shape})
    shapes.update({f"{m}/{v}": (d_in, rank) if v == "spectr" else (d_in,) for v in routing.ROW_VECTORS.values()})
  return shapes


class LiveLibrary:
  """Experts of `library` (default all its entries) in `capacity` slots over checkpoint `base`; `top_k`: the
  most experts a row may keep; `dtype`: a precision (`utils.PRECISIONS`)."""

  def __init__(self, base: str, library: str, capacity: int, top_k: int = 2, dtype: Optional[str] = "float32",
               names: Optional[Sequence[str]] = None):
    self.library = lib.ExpertLibrary(library)
    names = self.library.names() if names is None else list(names)
    if not names:
      raise lib.LibraryError(f"library {library} holds no experts; add some or serve the base alone")
    if capacity < len(names):
      raise ValueError(f"capacity {capacity} is under the library's {len(names)} experts; raise --capacity")
    self.config, self._base_params = assembly.routing_base(base, dtype=dtype)
    reference = self.library.load(names[0])
    manifest = reference.manifest
    self.experts = ExpertConfig(mode="routed", rank=manifest["rank"], targets=tuple(manifest["targets"]),
                                num_experts=capacity, top_k=min(top_k, capacity), score="per_row")
    self.model = EncoderDecoderModel(self.config, self.experts)
    self._host = {key: np.zeros((capacity, *shape), np.float32) for key, shape in _slot_shapes(reference).items()}
    self.slots = [None] * capacity  # the expert name in each slot
    self.gated = np.zeros(capacity, bool)
    self._in_flight = np.zeros(capacity, np.int64)
    self._lock = threading.Lock()
    self._mesh = utils.sharding()
    params = layout.for_model(utils.in_compute_dtype({"params": self._base_params}, self.config.dtype),
                              self.config)
    self.params = utils.place(self.model, params, *self._mesh)["params"]
    for name in names:
      self._write(self.slots.index(None), name)
    self._place()

  @property
  def capacity(self) -> int:
    return len(self.slots)

  def names(self) -> list:
    """The served experts, in slot order."""
    return [n for n in self.slots if n is not None]

  def _write(self, slot: int, name: str) -> None:
    assembly.check_base(self.library, [name], self.library.t5_config(), self._base_params)
    self.library.check_consistent([name] + self.names())
    expert = self.library.load(name)
    vectors = {"router": {k.rsplit("/", 1)[0]: v for k, v in expert.gates.items()},
               "arrow": routers.weight_derived(self.library, [expert], arrow.KIND, arrow.arrow_vectors)[0],
               "spectr": routers.weight_derived(self.library, [expert], spectr.KIND, spectr.spectral_bases)[0]}
    for key, array in self._host.items():
      module, part = key.rsplit("/", 1)
      source = expert.lora if part.startswith("lora") else vectors[part]
      value = source.get(key if part.startswith("lora") else module)
      array[slot] = 0.0 if value is None else np.asarray(value, np.float32)
    self.slots[slot], self.gated[slot] = name, bool(expert.gates)

  def _place(self) -> None:
    collection = utils.in_compute_dtype({"experts": ckpt_names.unflatten(dict(self._host))}, self.config.dtype)
    experts = utils.place(self.model, layout.for_model(collection, self.config), *self._mesh)["experts"]
    self.variables = {"params": self.params, "experts": experts}

  def add(self, name: str) -> int:
    """Serve library entry `name` in the lowest free slot out of flight; returns the slot."""
    with self._lock:
      if name in self.slots:
        raise ValueError(f"expert {name!r} is already served")
      free = [i for i, n in enumerate(self.slots) if n is None and not self._in_flight[i]]
      if not free:
        raise ValueError(f"all {self.capacity} expert slots are in use; remove an expert or restart with a "
                         f"larger --capacity")
      self._write(free[0], name)
      self._place()
      return free[0]

  def remove(self, name: str) -> None:
    with self._lock:
      if name not in self.slots:
        raise ValueError(f"expert {name!r} is not served; served are {self.names()}")
      if len(self.names()) == 1:
        raise ValueError("the last expert cannot be removed; a library model needs one")
      slot = self.slots.index(name)
      self.slots[slot], self.gated[slot] = None, False
      for array in self._host.values():
        array[slot] = 0.0
      self._place()

  def routing(self, router: str, experts: Sequence[str], top_k: int) -> routing.RowRouting:
    """One row's routing inputs (numpy): `router`'s score over `experts` (served names) keeping `top_k`."""
    with self._lock:
      slots = [self.slots.index(e) for e in experts]
      if router == "phatgoose" and not all(self.gated[slots]):
        ungated = [e for e, s in zip(experts, slots) if not self.gated[s]]
        raise ValueError(f"experts {ungated} have no gate vectors, so the phatgoose router cannot choose them; "
                         f"leave them out of experts or ask for arrow or spectr")
      mask = np.zeros(self.capacity, bool)
      mask[slots] = True
    return routing.RowRouting(np.int32(routing.ROW_SCORES.index(ROUTER_SCORES[router])), mask, np.int32(top_k))

  def acquire(self, mask: np.ndarray) -> None:
    """Hold the slots of `mask` out of reuse until `release(mask)`."""
    with self._lock:
      self._in_flight += mask

  def release(self, mask: np.ndarray) -> None:
    with self._lock:
      self._in_flight -= mask
