"""The per-layer <-> stacked layout conversion: exact round trip over every collection, shapes, bad input."""
import jax
import numpy as np
import pytest

from phatgoose_jax.checkpoints import layout
from phatgoose_jax.t5.config import preset


def _tree(rng, n_enc, n_dec):
  def layer():
    return {"mlp": {"wi_0": {"kernel": rng.normal(size=(4, 6)).astype(np.float32)}}}
  return {
      "params": {"token_embedder": {"embedding": rng.normal(size=(5, 4)).astype(np.float32)},
                 "encoder": {**{f"layers_{i}": layer() for i in range(n_enc)}, "encoder_norm": {"scale": np.ones(4)}},
                 "decoder": {f"layers_{i}": layer() for i in range(n_dec)}},
      "experts": {"encoder": {f"layers_{i}": {"mlp": {"wo": {"A": rng.normal(size=(3, 4, 2)).astype(np.float32)}}}
                              for i in range(n_enc)}},
  }


def test_round_trip_is_exact_for_every_collection():
  cfg = preset("tiny", num_encoder_layers=3, num_decoder_layers=2)
  tree = _tree(np.random.default_rng(0), 3, 2)
  stacked = layout.stack_layers(tree, cfg)
  assert stacked["params"]["encoder"]["layers"]["mlp"]["wi_0"]["kernel"].shape == (3, 4, 6)
  assert stacked["params"]["decoder"]["layers"]["mlp"]["wi_0"]["kernel"].shape == (2, 4, 6)
  assert stacked["experts"]["encoder"]["layers"]["mlp"]["wo"]["A"].shape == (3, 3, 4, 2)
  assert "layers_0" not in stacked["params"]["encoder"] and "encoder_norm" in stacked["params"]["encoder"]
  back = layout.unstack_layers(stacked, cfg)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
  for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree)):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_wrong_depth_is_named():
  cfg = preset("tiny", num_encoder_layers=3, num_decoder_layers=2)
  with pytest.raises(ValueError, match="lacks"):
    layout.stack_layers(_tree(np.random.default_rng(0), 2, 2), cfg)
  stacked = layout.stack_layers(_tree(np.random.default_rng(0), 3, 2), cfg)
  with pytest.raises(ValueError, match="leading axes"):
    layout.unstack_layers(stacked, cfg.replace(num_encoder_layers=4))
