"""Logical axis rules, the mesh, and shardings of boxed variable trees."""
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from phatgoose_jax import partitioning

RULES = partitioning.standard_logical_axis_rules()
MESH_2x2x2 = AbstractMesh((2, 2, 2), partitioning.MESH_AXES)


def test_standard_rules_follow_t5x_and_add_expert_and_rank():
  rules = dict(RULES)
  assert rules["batch"] == "data" and rules["expert"] == "expert" and rules["rank"] is None
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
  assert partitioning.batch_sharding(mesh, RULES).spec == P("data")
  partitioning.check_batch_divisible(6, MESH_2x2x2, RULES)
  with pytest.raises(ValueError, match="batch size 5"):
    partitioning.check_batch_divisible(5, MESH_2x2x2, RULES)
