"""Logical axis rules, the mesh, and shardings of boxed variable trees."""
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from phatgoose_jax import partitioning
from phatgoose_jax.experts.config import ExpertConfig
from phatgoose_jax.t5.config import preset

RULES = partitioning.standard_logical_axis_rules()
MESH_2x2x2 = AbstractMesh((2, 2, 2), partitioning.MESH_AXES)


def test_standard_rules_follow_t5x_and_add_expert_and_rank():
  rules = dict(RULES)
  assert rules["batch"] == ("data", "expert") and rules["expert"] == "expert" and rules["rank"] is None
  assert all(rules[n] == "model" for n in ("vocab", "mlp", "heads", "joined_kv"))
  assert all(rules[n] is None for n in ("embed", "kv", "relpos_buckets", "length"))
  override = partitioning.standard_logical_axis_rules([("embed", "model")])
  assert nn.logical_to_mesh_axes(("embed",), override) == P("model")


def test_make_mesh_fills_and_checks_the_device_count():
  mesh = partitioning.make_mesh()
  assert mesh.axis_names == partitioning.MESH_AXES and mesh.devices.shape == (jax.device_count(), 1, 1)
  assert partitioning.make_mesh(1, -1, 1).devices.shape == (1, jax.device_count(), 1)
  n = jax.device_count()
  with pytest.raises(ValueError, match="needs"):
    partitioning.make_mesh(n + 1, 1, 1)
  with pytest.raises(ValueError, match="cannot fill"):
    partitioning.make_mesh(-1, n + 1, 1)
  with pytest.raises(ValueError, match="at most one"):
    partitioning.make_mesh(-1, -1, 1)


def test_spec_maps_logical_names_and_replicates_what_does_not_divide(caplog):
  spec = partitioning.logical_to_mesh_spec(("expert", "embed", "mlp"), (4, 6, 8), MESH_2x2x2, RULES)
  assert spec == P("expert", None, "model")
  with caplog.at_level(logging.WARNING):
    spec = partitioning.logical_to_mesh_spec(("vocab", "embed"), (259, 8), MESH_2x2x2, RULES, what="emb")
  assert spec == P(None, None) and "emb: dimension 0 ('vocab', size 259)" in caplog.text
  with pytest.raises(ValueError, match="not divisible"):
    partitioning.logical_to_mesh_spec(("vocab", "embed"), (259, 8), MESH_2x2x2, RULES, strict=True)
  with pytest.raises(ValueError, match="logical axis names"):
    partitioning.logical_to_mesh_spec(("vocab",), (4, 8), MESH_2x2x2, RULES)


def test_variables_shardings_follow_the_boxed_tree():
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      w = self.param("w", nn.with_logical_partitioning(nn.initializers.ones, ("embed", "mlp")), (4, 6))
      r = self.variable("experts", "router", jnp.zeros, (2, 4))
      return x @ w + 0 * r.value.sum()

  variables = jax.eval_shape(M().init, jax.random.key(0), jnp.ones((1, 4)))
  mesh = partitioning.make_mesh()
  shardings = partitioning.variables_shardings(variables, mesh, RULES)
  assert shardings["params"]["w"] == NamedSharding(mesh, P(None, "model"))
  assert shardings["experts"]["router"] == NamedSharding(mesh, P())
  assert jax.tree.structure(shardings) == jax.tree.structure(partitioning.unbox(variables))


def test_batch_sharding_and_divisibility():
  mesh = partitioning.make_mesh()
  assert partitioning.batch_sharding(mesh, RULES).spec == P(("data", "expert"))
  partitioning.check_batch_divisible(12, MESH_2x2x2, RULES)
  with pytest.raises(ValueError, match="batch size 6 is not divisible by the 4 devices"):
    partitioning.check_batch_divisible(6, MESH_2x2x2, RULES)  # data x expert = 4


def test_one_process_feeds_every_row():
  mesh = partitioning.make_mesh()
  assert partitioning.process_batch_rows(mesh, RULES, 8) == slice(0, 8)
  assert partitioning.data_shard(mesh, RULES) == (0, 1)


def _expected_bytes(config, expert_config, model, expert):
  """Per-device float32 bytes of a T5 with routed experts, counted from the architecture by hand."""
  d, kv, ff, r, e = config.d_model, config.joined_kv, config.d_ff, expert_config.rank, expert_config.num_experts
  attention = [(d, kv)] * 3 + [(kv, d)]           # query, key, value (d -> kv), out (kv -> d)
  mlp = [(d, ff), (d, ff), (ff, d)]                 # wi_0, wi_1, wo
  enc = config.num_encoder_layers * (attention + mlp)
  dec = config.num_decoder_layers * (2 * attention + mlp)
  split = lambda n: n // model if n in (kv, ff) else n  # joined_kv and mlp widths go over 'model'
  kernels = sum(split(i) * split(o) for i, o in enc + dec)
  vocab = config.vocab_size if config.vocab_size % model else config.vocab_size // model
  norms = d * (2 * config.num_encoder_layers + 3 * config.num_decoder_layers + 2)
  relpos = 2 * config.relative_attention_num_buckets * (config.num_heads // model)
  params = kernels + 2 * vocab * d + norms + relpos
  experts = sum((e // expert) * (split(i) * r + r * split(o) + split(i)) for i, o in enc + dec)
  return 4 * params, 4 * experts


def test_describe_reports_mesh_rules_and_per_device_bytes():
  config = preset("tiny", vocab_size=256, d_kv=4)  # joined_kv 16, d_model 32, d_ff 64: widths told apart
  experts = ExpertConfig(mode="routed", num_experts=4, rank=4)
  text = partitioning.describe(config, experts, MESH_2x2x2, RULES)
  assert text.startswith("mesh: data=2, model=2, expert=2 (8 x abstract devices)")
  assert "  expert           -> expert" in text and "  batch            -> ('data', 'expert')" in text
  rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("  ") and "->" not in line}
  params, expert_bytes = _expected_bytes(config, experts, model=2, expert=2)
  assert partitioning._bytes(params) == " ".join(rows["params"][4:6])
  assert partitioning._bytes(expert_bytes) == " ".join(rows["experts"][4:6])
  assert "replicated, not split" not in text
  odd = partitioning.describe(config, experts.replace(num_experts=3), MESH_2x2x2, RULES)
  assert "replicated, not split" in odd and "('expert', size 3)" in odd
