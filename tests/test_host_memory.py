"""Host memory: the allocator's free pages handed back, the training step compiled ahead and run as `jax.jit`
would run it, and a scanned base stacked without a second copy of the per-layer one."""
import sys

import gin
import jax
import numpy as np
import pytest

from phatgoose_jax import host_memory, models, partitioning, utils
from phatgoose_jax.checkpoints import names, native
from phatgoose_jax.t5 import layout
from phatgoose_jax.t5.config import preset
from phatgoose_jax.training import data, trainer as trainer_lib

import test_trainer


def test_release_free_memory_is_glibc_malloc_trim_or_nothing():
  trim = host_memory._malloc_trim()  # pylint: disable=protected-access
  assert host_memory.release_free_memory() == (trim is not None)
  if sys.platform.startswith("linux"):
    assert host_memory.release_free_memory()  # the test machines run glibc


def test_the_step_compiled_ahead_is_the_jitted_step_bitwise():
  """Steps run through `Trainer._compiled_step` (compiled once per batch shapes) give what calling the jitted
  step gives, bit for bit."""
  variables, loss_fn = test_trainer.make_model(dropout_rate=0.3)
  batches = data.DeterministicBatches(test_trainer.make_examples(), batch_size=8, seed=3)
  kw = dict(trainable=["lora/.*", "gates/.*"], seed=5, log_every=1)
  ahead = trainer_lib.Trainer(loss_fn, variables, **kw)
  got = ahead.train(batches, 3)
  assert len(ahead._compiled) == 1  # pylint: disable=protected-access
  plain = trainer_lib.Trainer(loss_fn, variables, **kw)
  with jax.set_mesh(plain.mesh):
    for step in range(3):
      batch = plain.global_batch(batches(step))
      plain.state, _ = plain._train_step(plain.state, plain.frozen, batch)  # pylint: disable=protected-access
  assert test_trainer.leaves_equal(got, plain.variables())


@pytest.fixture
def scanned_gin():
  gin.clear_config()
  gin.parse_config(["utils.model_config.scan_layers = True", "utils.model_config.dropout_rate = 0.0"])
  yield
  gin.clear_config()


# pylint: disable-next=redefined-outer-name,unused-argument
def test_a_scanned_base_is_stacked_without_keeping_the_per_layer_arrays(tmp_path, scanned_gin, monkeypatch):
  """While the restored base is stacked, the live arrays never exceed the base plus one stacked parameter."""
  config = preset("tiny", num_encoder_layers=3, num_decoder_layers=2)
  params = partitioning.unbox(models.EncoderDecoderModel(config).get_initial_variables(jax.random.key(0)))["params"]
  native.save_native(str(tmp_path / "base"), {"params": params}, config)
  host = jax.device_get(params)
  base_bytes, largest = sum(x.nbytes for x in jax.tree.leaves(host)), max(x.nbytes for x in jax.tree.leaves(host))
  del params
  alive = jax.live_arrays()  # held, so that no new array can take one of their ids
  before = {id(x) for x in alive}
  live = []
  stack_layers = layout.stack_layers

  def recorded(*args, **kwargs):
    out = stack_layers(*args, **kwargs)
    live.append(sum(x.nbytes for x in jax.live_arrays() if id(x) not in before))
    return out
  monkeypatch.setattr(layout, "stack_layers", recorded)
  loaded = utils.restore_base(str(tmp_path / "base"))
  assert live and max(live) <= base_bytes + config.num_encoder_layers * largest, (live, base_bytes)
  new = [x for x in jax.live_arrays() if id(x) not in before]
  stacked = loaded.variables["params"]
  assert sorted(map(id, new)) == sorted(map(id, jax.tree.leaves(stacked)))  # no per-layer array left alive
  want = names.flatten(layout.stack_layers({"params": host}, config)["params"])
  got = names.flatten(stacked)
  assert sorted(got) == sorted(want)
  for k, v in got.items():
    np.testing.assert_array_equal(np.asarray(v), want[k])
