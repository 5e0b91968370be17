"""A start-up that scales: fresh collections drawn inside jit with their shardings (the same values as an eager
initialisation), the base never drawn, and every checkpoint format restored straight into its shardings."""
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from phatgoose_jax import partitioning, utils
from phatgoose_jax.experts.config import ExpertConfig
from phatgoose_jax.t5 import config as t5_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_a_base_drawn_inside_jit_equals_an_eager_initialisation_array_for_array():
  """Base pretraining from scratch (nothing given) draws the same weights as an eager initialisation."""
  model = utils.get_model(t5_config.preset("tiny"), ExpertConfig(mode="lora", rank=4))
  eager = partitioning.unbox(model.get_initial_variables(jax.random.key(5)))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), eager,
               partitioning.unbox(utils.init_variables(model, 5)))


@pytest.mark.parametrize("mode", ["lora", "gated"])
def test_fresh_collections_equal_an_eager_initialisation_array_for_array(mode):
  model = utils.get_model(t5_config.preset("tiny"), ExpertConfig(mode=mode, rank=4))
  eager = partitioning.unbox(model.get_initial_variables(jax.random.key(7)))
  given = {"params": jax.tree.map(np.zeros_like, eager["params"])}
  if mode == "gated":
    given["lora"] = eager["lora"]
  variables = partitioning.unbox(utils.init_variables(model, 7, **given))
  assert sorted(variables) == sorted(eager)
  for name in eager:
    want = given[name] if name in given else eager[name]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), variables[name], want)


SHARDED_START = r'''
import gc, os, sys, tempfile
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import gin, jax, numpy as np
from phatgoose_jax import checkpoints, partitioning, utils
from phatgoose_jax import main  # noqa: F401 (gin registrations)
from phatgoose_jax.checkpoints import hf, native, names, t5x
from phatgoose_jax.t5 import config as t5_config, layout

config = t5_config.preset("tiny").replace(vocab_size=256, d_ff=128)
gin.parse_config(["partitioning.make_mesh.data = 2", "partitioning.make_mesh.model = 4"])
model = utils.get_model(config)
params = jax.tree.map(np.array, partitioning.unbox(model.get_initial_variables(jax.random.key(1)))["params"])
tmp = tempfile.mkdtemp()
hf.save_hf(f"{tmp}/hf", config, params)
t5x.save_t5x(f"{tmp}/t5x", params, 0)
native.save_native(f"{tmp}/native", {"params": params}, config)
mesh, rules = utils.sharding()
shardings = utils.params_shardings(config, mesh, rules)
full = sum(x.nbytes for x in jax.tree.leaves(params))
per_device = sum(partitioning._shard_size(x.shape, s.spec, mesh) * x.dtype.itemsize
                 for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)))
assert per_device < full / 2, (per_device, full)

def single_device_arrays():
  gc.collect()
  return {id(a) for a in jax.live_arrays() if len(a.sharding.device_set) == 1}

before = single_device_arrays()
for kind in ("hf", "t5x/checkpoint_0", "native"):
  for dtype in ("float32", "bfloat16"):
    loaded = checkpoints.load(f"{tmp}/{kind}", expect=config, shardings=shardings, dtype=dtype)
    assert single_device_arrays() <= before, kind  # no whole array was placed on one device on the way
    flat, want = names.flatten(loaded.variables["params"]), names.flatten(params)
    assert sorted(flat) == sorted(want), kind
    for k, v in flat.items():
      assert v.dtype == np.dtype(dtype) and v.sharding == names.flatten(shardings)[k], (kind, k, v.sharding)
      np.testing.assert_array_equal(np.asarray(v, np.float32), want[k].astype(dtype).astype(np.float32))
    held = [sum(s.data.nbytes for a in flat.values() for s in a.addressable_shards if s.device == d)
            for d in jax.devices()]
    assert held == [per_device // (2 if dtype == "bfloat16" else 1)] * 8, (kind, dtype, held, per_device)
    del loaded, flat
    before = single_device_arrays()

gin.parse_config(["utils.frozen_base_dtype.dtype = 'bfloat16'"])
base = utils.restore_base(f"{tmp}/hf")
assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(base.variables["params"]))
lora_model = utils.get_model(config, utils.lora_config())
variables = partitioning.unbox(utils.init_variables(lora_model, 3, params=base.variables["params"]))
eager = partitioning.unbox(lora_model.get_initial_variables(jax.random.key(3)))["lora"]
jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), variables["lora"], eager)
lora_sh = partitioning.unbox(partitioning.variables_shardings(
    {"lora": jax.eval_shape(lora_model.get_initial_variables, jax.random.key(0))["lora"]}, mesh, rules))["lora"]
assert jax.tree.leaves(jax.tree.map(lambda a, s: a.sharding == s, variables["lora"], lora_sh)) and all(
    jax.tree.leaves(jax.tree.map(lambda a, s: a.sharding == s, variables["lora"], lora_sh)))

gin.parse_config(["utils.model_config.scan_layers = True"])  # stacked one parameter at a time, in its sharding
before = single_device_arrays()  # the eager LoRA above lives on one device
scanned = utils.restore_base(f"{tmp}/t5x/checkpoint_0")
assert scanned.config.scan_layers and single_device_arrays() <= before
stacked_sh = names.flatten(utils.params_shardings(scanned.config, mesh, rules))
want = names.flatten(layout.stack_layers({"params": params}, config)["params"])
flat = names.flatten(scanned.variables["params"])
assert sorted(flat) == sorted(want) and any("/layers/" in k for k in flat)
for k, v in flat.items():
  assert v.sharding == stacked_sh[k], (k, v.sharding)
  np.testing.assert_array_equal(np.asarray(v, np.float32), np.asarray(want[k]).astype(jax.numpy.bfloat16).astype(np.float32))
held = [sum(s.data.nbytes for a in flat.values() for s in a.addressable_shards if s.device == d) for d in jax.devices()]
assert held == [per_device // 2] * 8, held
print("OK", full, per_device)
'''


def test_a_sharded_start_up_on_8_devices_never_holds_a_whole_base(tmp_path):
  """Each format restores into its shardings equal to the checkpoint's arrays, in float32 or bfloat16, each
  device holding exactly its shards (under half the base) and no whole array placed on one device on the way
  (`jax.live_arrays()`); the base from
  `restore_base` is bf16 when configured, the fresh LoRA equals an eager initialisation, and under
  `scan_layers` the base is restored stacked into the scanned model's shardings with the same bytes per device."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  done = subprocess.run([sys.executable, "-c", SHARDED_START], capture_output=True, text=True, env=env,
                        timeout=600, cwd=tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.startswith("OK")
