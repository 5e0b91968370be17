"""Our orbax checkpoints: round trip with configs, clear errors for corrupt or foreign checkpoints."""
import json
import os
import shutil

import numpy as np
import pytest

from phatgoose_jax.checkpoints import native
from phatgoose_jax.t5.config import preset
from phatgoose_jax.experts.config import ExpertConfig

CONFIG = preset("tiny")
EXPERTS = ExpertConfig(mode="routed", rank=4, num_experts=3, targets=("query", "wo"))


def _state():
  rng = np.random.default_rng(0)
  return {"params": {"encoder": {"encoder_norm": {"scale": rng.standard_normal(32).astype(np.float32)}}},
          "lora": {"encoder/layers_0/attention/query/lora_a": rng.standard_normal((32, 4)).astype(np.float32),
                   "encoder/layers_0/attention/query/lora_b": rng.standard_normal((4, 32)).astype(np.float32)},
          "gates": {"encoder/layers_0/attention/query/gate": rng.standard_normal(32).astype(np.float32)}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("native") / "ckpt")
  native.save_native(path, _state(), CONFIG, EXPERTS)
  return path


def _assert_same(got, expected):
  if isinstance(expected, dict):
    assert set(got) == set(expected)
    for k in expected:
      _assert_same(got[k], expected[k])
  else:
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_round_trip_with_configs(saved, tmp_path):
  restored = native.load_native(saved, expect=CONFIG)
  _assert_same(restored.state, _state())
  assert restored.t5_config == CONFIG
  assert restored.expert_config == EXPERTS
  assert native.read_configs(saved) == (CONFIG, EXPERTS)
  path = str(tmp_path / "again")
  native.save_native(path, {"params": {"x": np.zeros(2, np.float32)}}, CONFIG, EXPERTS)
  native.save_native(path, _state(), CONFIG, overwrite=True)
  again = native.load_native(path)
  _assert_same(again.state, _state())
  assert again.expert_config is None


def test_refuses_a_different_base_model(saved):
  other = CONFIG.replace(d_model=64, num_decoder_layers=4, dropout_rate=0.0)
  with pytest.raises(ValueError) as err:
    native.load_native(saved, expect=other)
  message = str(err.value)
  assert "different base model" in message and saved in message
  assert "d_model: checkpoint 32, expected 64" in message
  assert "num_decoder_layers: checkpoint 2, expected 4" in message
  assert "dropout_rate" not in message  # does not change the weights


def _damaged(saved, tmp_path, damage):
  path = str(tmp_path / "damaged")
  shutil.copytree(saved, path)
  damage(path)
  return path


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage, words", [
    (lambda p: os.remove(os.path.join(p, "config.json")), "config.json is missing"),
    (lambda p: _truncate(os.path.join(p, "config.json")), "corrupt checkpoint config .*config.json"),
    (lambda p: os.rename(os.path.join(p, "state"), os.path.join(p, "state.orbax-checkpoint-tmp-1700000000")),
     "unfinished orbax directory 'state.orbax-checkpoint-tmp-1700000000'"),
    (lambda p: shutil.rmtree(os.path.join(p, "state")), "no state/ directory"),
    (lambda p: os.remove(os.path.join(p, "state", "_METADATA")), "_METADATA is missing"),
    (lambda p: _truncate(os.path.join(p, "state", "_METADATA")), "orbax could not restore it"),
    (lambda p: os.remove(os.path.join(p, "state", "manifest.ocdbt")), "orbax could not restore it"),
])
def test_corrupt_checkpoints_are_named(saved, tmp_path, damage, words):
  path = _damaged(saved, tmp_path, damage)
  with pytest.raises(ValueError, match=words) as err:
    native.load_native(path)
  assert path in str(err.value)


def test_not_our_format_and_missing_directory(saved, tmp_path):
  def foreign(p):
    with open(os.path.join(p, "config.json"), "w") as f:
      json.dump({"format": "something-else"}, f)

  with pytest.raises(ValueError, match="format is 'something-else'"):
    native.load_native(_damaged(saved, tmp_path, foreign))
  with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
    native.load_native(str(tmp_path / "nowhere"))
