"""`auto` from the compiler's cost (experts/cost.py): the roofline argmin, its cache, the override, the target
device, and the loop-free candidates' exactness."""
import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phatgoose_jax.experts import cost, routing

V5E = "TPU v5 lite"
LAYER = cost.LayerShape(tokens=64, d_in=192, d_out=256, experts=4, rank=8, k=2, dtype="bfloat16")  # not fused
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (jax[tpu])")


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  platform: str
  device_kind: str


@pytest.fixture(autouse=True)
def empty_cache():
  cost.clear_cache()
  yield
  cost.clear_cache()


class FakeCost:
  """(flops, bytes) per candidate path from a table, counting the lowerings asked for."""

  def __init__(self, table):
    self.table = table
    self.calls = []

  def __call__(self, candidate, layer, device):
    self.calls.append((candidate.name, layer))
    if candidate.name not in self.table:
      raise ValueError("not costed")
    return self.table[candidate.name]


def tpu_table():
  # roofline ms on v5e: ragged 50.8 (least bytes), grouped 9.8 (least FLOPs), dense 7.6 (least max).
  return {"ragged": (10e12, 1e9), "grouped": (1e12, 8e9), "dense": (1.5e12, 5e9),
          "blocks@128": (0.1e12, 0.1e9)}  # not a TPU candidate: never asked for


def test_roofline_is_the_larger_of_compute_and_memory_time():
  assert cost.roofline_seconds(197e12, 0, V5E) == pytest.approx(1.0)
  assert cost.roofline_seconds(1.0, 819e9 * 2, V5E) == pytest.approx(2.0)
  with pytest.raises(ValueError, match="no peak FLOP/s and bandwidth known for device kind 'TPU v9'"):
    cost.roofline_seconds(1.0, 1.0, "TPU v9")


def test_auto_takes_the_least_roofline_time_not_the_least_flops_or_bytes(monkeypatch):
  fake = FakeCost(tpu_table())
  monkeypatch.setattr(cost, "compiled_cost", fake)
  assert routing.resolve_impl("auto", layer=LAYER, device=FakeDevice("tpu", V5E)) == "dense"
  assert {name for name, _ in fake.calls} == set(routing.candidates(LAYER, "tpu"))


def test_choice_is_cached_per_platform_kind_and_shape_and_logged_once(monkeypatch, caplog):
  fake = FakeCost(tpu_table())
  monkeypatch.setattr(cost, "compiled_cost", fake)
  tpu = FakeDevice("tpu", V5E)
  with caplog.at_level("INFO"):
    routing.resolve_impl("auto", layer=LAYER, device=tpu)
    lowered = len(fake.calls)
    assert lowered == len(routing.candidates(LAYER, "tpu"))
    routing.resolve_impl("auto", layer=LAYER, device=tpu)
  assert len(fake.calls) == lowered  # one lowering per candidate per shape
  logged = [r.getMessage() for r in caplog.records if "auto takes" in r.getMessage()]
  assert len(logged) == 1 and logged[0].startswith(f"routing: auto takes dense for {LAYER} on {V5E}")
  routing.resolve_impl("auto", layer=dataclasses.replace(LAYER, tokens=128), device=tpu)
  routing.resolve_impl("auto", layer=LAYER, device=FakeDevice("tpu", "TPU v4"))
  assert len(fake.calls) == 3 * lowered


def test_an_explicit_impl_overrides_the_cost_and_cpu_keeps_its_measured_table(monkeypatch):
  fake = FakeCost(tpu_table())
  monkeypatch.setattr(cost, "compiled_cost", fake)
  assert routing.resolve_impl("ragged", layer=LAYER, device=FakeDevice("tpu", V5E)) == "ragged"
  cpu = FakeDevice("cpu", "cpu")
  assert routing.resolve_impl("auto", layer=LAYER, device=cpu) == "blocks"
  assert routing.resolve_impl("auto", layer=dataclasses.replace(LAYER, tokens=8), device=cpu) == "gather"
  assert fake.calls == []


def test_decoding_steps_and_few_experts_add_gather_and_dense_candidates():
  assert "gather" in routing.candidates(dataclasses.replace(LAYER, tokens=8), "tpu")
  assert "gather" not in routing.candidates(LAYER, "tpu")
  assert "dense" in routing.candidates(LAYER, "gpu")
  xl = cost.LayerShape(tokens=16384, d_in=2048, d_out=2048, experts=36, rank=16, k=2, dtype="bfloat16")
  assert xl.tokens * xl.experts * xl.d_out * 2 > routing.DENSE_MAX_BYTES
  assert list(routing.candidates(xl, "tpu")) == ["tiles"]
  assert "grouped" not in routing.candidates(xl, "gpu")


def test_a_candidate_that_does_not_compile_for_the_chip_is_left_out(monkeypatch):
  """A candidate whose kernel Mosaic rejects for the chip (e.g. for its VMEM) is left out (logged), not fatal."""
  layer = cost.LayerShape(tokens=1024, d_in=2048, d_out=2048, experts=36, rank=16, k=2, dtype="bfloat16", plain=True)
  assert list(routing.candidates(layer, "tpu", V5E)) == ["tiles", "dense"]

  def no_vmem(candidate, layer, device):
    if candidate.name == "tiles":
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: scoped VMEM")
    return (4e11, 2e9)
  monkeypatch.setattr(cost, "compiled_cost", no_vmem)
  assert routing.resolve_impl("auto", layer=layer, device=FakeDevice("tpu", V5E)) == "dense"


def test_a_single_candidate_is_taken_without_a_lowering(monkeypatch):
  fake = FakeCost(tpu_table())
  monkeypatch.setattr(cost, "compiled_cost", fake)
  xl = cost.LayerShape(tokens=16384, d_in=2048, d_out=2048, experts=36, rank=16, k=2, dtype="bfloat16")
  assert routing.resolve_impl("auto", layer=xl, device=FakeDevice("tpu", V5E)) == "tiles" and fake.calls == []


def test_unknown_chip_and_no_shape_fail_with_the_fix(monkeypatch):
  monkeypatch.setattr(cost, "compiled_cost", FakeCost(tpu_table()))
  with pytest.raises(ValueError, match="set ExpertConfig.impl"):
    routing.resolve_impl("auto", layer=LAYER, device=FakeDevice("tpu", "TPU v9"))
  with pytest.raises(ValueError, match="needs the layer's shape"):
    routing.resolve_impl("auto", 128, device=FakeDevice("tpu", V5E))


def test_target_is_the_context_mesh_device_inside_jit():
  seen = []
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))

  @jax.jit
  def f(x):
    seen.append(cost.target_device())
    return x

  with jax.set_mesh(mesh):
    f(1.0)
  assert seen == [jax.devices()[0]]


def test_compiled_cost_on_cpu_refuses_a_loop_over_large_state():
  layer = cost.LayerShape(tokens=512, d_in=256, d_out=256, experts=4, rank=8, k=2, dtype="float32")
  cpu = jax.devices("cpu")[0]
  flops, nbytes = cost.compiled_cost(routing.Candidate("blocks@128", 2), layer, cpu)
  lora_flops = 2 * layer.pairs * layer.rank * (layer.d_in + layer.d_out)
  score_flops = 2 * layer.tokens * layer.d_in * layer.experts
  assert lora_flops + score_flops <= flops < 3 * (lora_flops + score_flops) and nbytes > 4 * layer.tokens * layer.d_in
  with pytest.raises(ValueError, match="while loops"):
    cost.compiled_cost(routing.Candidate("blocks", 2), layer, cpu)  # a scan over 512-row chunks


@needs_libtpu
def test_aot_topology_mesh_targets_the_tpu_and_costs_real_candidates(monkeypatch):
  """Under a context mesh of v5e topology devices on this CPU host, `auto` is costed for the TPU (one real
  lowering per candidate, then cached: every candidate is costed, the Pallas kernels lowered for the chip, not
  for this host) and the program compiles for it."""
  from jax.experimental import topologies
  devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
  counted = []
  real = cost.compiled_cost
  costed = []

  def counting(*args):
    counted.append(args[0])
    figures = real(*args)
    costed.append(args[0].name)
    return figures
  monkeypatch.setattr(cost, "compiled_cost", counting)
  layer = cost.LayerShape(tokens=256, d_in=256, d_out=256, experts=4, rank=8, k=2, dtype="bfloat16", plain=True)
  mesh = jax.sharding.Mesh(np.array(devices[:1]), ("data",))
  sharding = jax.sharding.SingleDeviceSharding(devices[0])
  u = jax.ShapeDtypeStruct((layer.tokens, layer.d_in), jnp.bfloat16, sharding=sharding)
  router = jax.ShapeDtypeStruct((layer.experts, layer.d_in), jnp.bfloat16, sharding=sharding)
  a = jax.ShapeDtypeStruct((layer.experts, layer.d_in, layer.rank), jnp.bfloat16, sharding=sharding)
  b = jax.ShapeDtypeStruct((layer.experts, layer.rank, layer.d_out), jnp.bfloat16, sharding=sharding)
  w = jax.ShapeDtypeStruct((layer.d_in, layer.d_out), jnp.bfloat16, sharding=sharding)
  fn = jax.jit(lambda u, r, a, b, w: routing.route(u, r, a, b, top_k=2, scale=0.5, kernel=w)[0])
  with jax.set_mesh(mesh):
    fn.lower(u, router, a, b, w).compile()
    assert sorted(costed) == sorted(routing.candidates(layer, "tpu")) == ["dense", "tiles"]
    assert len(counted) == len(routing.candidates(layer, "tpu"))
    choice = routing.resolve_impl("auto", layer=layer)
  assert choice in routing.candidates(layer, "tpu") and len(counted) == len(routing.candidates(layer, "tpu"))
  assert routing.resolve_impl("auto", layer=layer) == "blocks"  # no mesh: this CPU host's own table


@pytest.mark.parametrize("name", ["grouped", "grouped@256", "blocks@128", "blocks@256", "fused", "tiles"])
def test_loop_free_and_grouped_paths_equal_the_dense_reference_with_gradients(name):
  """Exact against the dense reference, values and gradients (the Pallas kernels interpreted on this CPU; 39
  tokens over 5 experts leave padding slots in every blocked layout; the fused combine pads them to 128)."""
  rng = np.random.default_rng(0)
  u = jnp.asarray(rng.normal(size=(3, 13, 128)), jnp.float32)
  lora_a = jnp.asarray(rng.normal(size=(5, 128, 4)), jnp.float32) * 0.3
  lora_b = jnp.asarray(rng.normal(size=(5, 4, 256)), jnp.float32)
  weights, index = routing.top_k_weights(routing.phatgoose_scores(u, jnp.asarray(rng.normal(size=(5, 128)))), 2)
  loss = lambda mix: lambda u, a, b, w: jnp.sum(jnp.sin(mix(u, a, b, w, index, 0.5)))  # noqa: E731
  np.testing.assert_allclose(routing.mixer(name)(u, lora_a, lora_b, weights, index, 0.5),
                             routing.mix_dense(u, lora_a, lora_b, weights, index, 0.5), rtol=1e-5, atol=1e-5)
  got = jax.grad(loss(routing.mixer(name)), argnums=(0, 1, 2, 3))(u, lora_a, lora_b, weights)
  want = jax.grad(loss(routing.mix_dense), argnums=(0, 1, 2, 3))(u, lora_a, lora_b, weights)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)
