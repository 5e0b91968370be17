"""t5x checkpoint layout: write -> read round trip, bf16 storage, optimizer state, inferred config, errors."""
import os

import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts
from flax import serialization

from phatgoose_jax.checkpoints import names, t5x
from phatgoose_jax.t5.config import preset

CONFIG = preset("tiny", relative_attention_max_distance=128, num_decoder_layers=3)


def random_params(config, seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s).astype(np.float32) for k, s in names.param_shapes(config).items()}


def test_round_trip_layout_and_inferred_config(tmp_path):
  flat = random_params(CONFIG)
  adafactor = {"encoder": {"layers_0": {"mlp": {"wo": {"kernel": {"v_row": np.ones(64, np.float32),
                                                                  "v_col": np.ones(32, np.float32)}}}}}}
  ckpt = t5x.save_t5x(str(tmp_path), names.unflatten(flat), 1100000, param_states=adafactor)
  assert ckpt == os.path.join(str(tmp_path), "checkpoint_1100000")
  assert os.path.isfile(os.path.join(ckpt, "checkpoint"))
  array_dir = os.path.join(ckpt, "target.encoder.layers_0.attention.query.kernel")
  assert os.path.isfile(os.path.join(array_dir, ".zarray"))
  assert os.path.isdir(os.path.join(ckpt, "state.param_states.encoder.layers_0.mlp.wo.kernel.v_row"))
  with open(os.path.join(ckpt, "checkpoint"), "rb") as f:
    contents = serialization.msgpack_restore(f.read())
  assert contents["version"] == 3 and int(contents["optimizer"]["state"]["step"]) == 1100000
  spec = contents["optimizer"]["target"]["encoder"]["layers_0"]["attention"]["query"]["kernel"]
  assert spec["driver"] == "zarr" and spec["kvstore"]["driver"] == "file"
  assert spec["kvstore"]["path"].rstrip("/") == "target.encoder.layers_0.attention.query.kernel"
  assert spec["metadata"]["shape"] == [32, 32]

  config, params = t5x.load_t5x(str(tmp_path))  # the parent directory: latest checkpoint_N
  assert config == CONFIG
  got = names.flatten(params)
  assert set(got) == set(flat)
  for k, v in flat.items():
    np.testing.assert_array_equal(got[k], v)


def test_bfloat16_storage_is_cast_to_float32(tmp_path):
  flat = random_params(CONFIG, seed=1)
  ckpt = t5x.save_t5x(str(tmp_path), names.unflatten(flat), 7, dtype="bfloat16")
  stored = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": os.path.join(
      ckpt, "target.decoder.logits_dense.kernel")}}).result()
  assert stored.dtype.numpy_dtype == ml_dtypes.bfloat16
  _, params = t5x.load_t5x(ckpt, CONFIG)
  for k, v in names.flatten(params).items():
    assert v.dtype == np.float32
    np.testing.assert_array_equal(v, flat[k].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_msgpack_arrays_and_old_spec_format(tmp_path):
  """Small arrays stored in the msgpack itself and pre-tensorstore-0.1.14 specs (top-level 'path') load too."""
  flat = random_params(CONFIG, seed=2)
  ckpt = t5x.save_t5x(str(tmp_path), names.unflatten(flat), 3)
  path = os.path.join(ckpt, "checkpoint")
  with open(path, "rb") as f:
    contents = serialization.msgpack_restore(f.read())
  target = contents["optimizer"]["target"]
  target["encoder"]["encoder_norm"]["scale"] = flat["encoder/encoder_norm/scale"]
  spec = target["token_embedder"]["embedding"]
  spec["path"] = spec["kvstore"].pop("path")
  with open(path, "wb") as f:
    f.write(serialization.msgpack_serialize(contents))
  _, params = t5x.load_t5x(ckpt, CONFIG)
  for k, v in names.flatten(params).items():
    np.testing.assert_array_equal(v, flat[k])


def test_config_mismatch_lists_names_and_shapes(tmp_path):
  t5x.save_t5x(str(tmp_path), names.unflatten(random_params(CONFIG)), 1)
  with pytest.raises(ValueError) as err:
    t5x.load_t5x(str(tmp_path), CONFIG.replace(d_ff=48, num_encoder_layers=3))
  message = str(err.value)
  assert "shape of encoder/layers_0/mlp/wi_0/kernel: expected (32, 48), found (32, 64)" in message
  assert "missing encoder/layers_2/attention/query/kernel: expected shape (32, 32)" in message


def test_missing_array_and_not_a_checkpoint(tmp_path):
  ckpt = t5x.save_t5x(str(tmp_path / "run"), names.unflatten(random_params(CONFIG)), 1)
  os.rename(os.path.join(ckpt, "target.decoder.decoder_norm.scale"), os.path.join(ckpt, "moved"))
  with pytest.raises(ValueError, match="cannot read parameter decoder/decoder_norm/scale"):
    t5x.load_t5x(ckpt)
  with pytest.raises(FileNotFoundError, match="not a t5x checkpoint"):
    t5x.load_t5x(str(tmp_path))
  tf_index = tmp_path / "tf"
  tf_index.mkdir()
  (tf_index / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-100"')
  with pytest.raises(ValueError, match="TensorFlow checkpoint"):
    t5x.load_t5x(str(tf_index))
