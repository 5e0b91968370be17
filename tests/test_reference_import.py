"""The reference implementation's stacked expert checkpoint (algorithm.md §7) -> per-expert lora and gates."""
import numpy as np
import pytest

from phatgoose_jax.checkpoints import reference
from phatgoose_jax.t5.config import ALL_TARGETS, preset

from random_trees import random_expert

torch = pytest.importorskip("torch")

CONFIG = preset("tiny")
RANK = 4


def make_experts(count, targets=ALL_TARGETS, seed=0):
  """(loras, gates): `count` random experts on `targets`."""
  experts = [random_expert(seed * 100 + i, RANK, targets, CONFIG, lora_scale=1.0) for i in range(count)]
  return [lora for lora, _ in experts], [gates for _, gates in experts]


def _bf16(x):
  return torch.from_numpy(x).to(torch.bfloat16).float().numpy()


def test_three_experts_from_safetensors_with_prefix(tmp_path):
  from safetensors.numpy import load_file
  loras, gates = make_experts(3)
  path = str(tmp_path / "experts.safetensors")
  reference.save_reference(path, loras, gates, prefix="model.")
  keys = load_file(path)
  assert keys["model.decoder.block.1.layer.2.DenseReluDense.wo._addons.expert_lora.layer1__2"].shape == (64, RANK)
  assert keys["model.encoder.block.0.layer.0.SelfAttention.q._addons.router.expert_embeddings__0"].dtype == np.float32
  assert str(keys["model.encoder.block.0.layer.0.SelfAttention.q._addons.expert_lora.layer2__1"].dtype) == "bfloat16"
  got = reference.load_reference(path, CONFIG)
  assert (got.rank, got.targets, got.prefix) == (RANK, ALL_TARGETS, "model.")
  assert len(got.loras) == len(got.gates) == 3
  for i in range(3):
    assert set(got.loras[i]) == set(loras[i]) and set(got.gates[i]) == set(gates[i])
    for k, v in loras[i].items():
      assert got.loras[i][k].dtype == np.float32
      np.testing.assert_array_equal(got.loras[i][k], _bf16(v))
    for k, v in gates[i].items():
      np.testing.assert_array_equal(got.gates[i][k], v)


def test_pytorch_file_subset_of_targets_and_base_weights_ignored(tmp_path):
  loras, gates = make_experts(3, targets=("query", "value", "wo"), seed=1)
  path = str(tmp_path / "best.pt")
  reference.save_reference(path, loras, gates)
  state = torch.load(path, weights_only=True)
  state["encoder.embed_tokens.weight"] = torch.zeros(259, 32)
  state["decoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(32, 32)
  torch.save(state, path)
  got = reference.load_reference(path)
  assert (got.rank, got.targets, got.prefix) == (RANK, ("query", "value", "wo"), "")
  np.testing.assert_array_equal(got.loras[2]["decoder/layers_1/mlp/wo/lora_b"],
                                _bf16(loras[2]["decoder/layers_1/mlp/wo/lora_b"]))
  np.testing.assert_array_equal(got.gates[1]["decoder/layers_0/encoder_decoder_attention/query/gate"],
                                gates[1]["decoder/layers_0/encoder_decoder_attention/query/gate"])


def test_lora_only_file_has_empty_gates(tmp_path):
  loras, _ = make_experts(2, targets=("wi_0",))
  path = str(tmp_path / "lora.safetensors")
  reference.save_reference(path, loras, lora_dtype="float32")
  got = reference.load_reference(path, CONFIG)
  assert got.gates == [{}, {}]
  for k, v in loras[1].items():
    np.testing.assert_array_equal(got.loras[1][k], v)


def _edit(path, edit):
  state = torch.load(path, weights_only=True)
  edit(state)
  torch.save(state, path)


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.pop("encoder.block.1.layer.1.DenseReluDense.wo._addons.expert_lora.layer2__2"),
     r"experts \[2\] do not have the same entries"),
    (lambda s: s.update({"module.encoder.block.0.layer.0.SelfAttention.q._addons.expert_lora.layer1__0":
                         s.pop("encoder.block.0.layer.0.SelfAttention.q._addons.expert_lora.layer1__0")}),
     "several module-name prefixes"),
    (lambda s: s.update({"decoder._addons.router.expert_embeddings__0": torch.zeros(32)}),
     "not on a T5 linear module"),
    (lambda s: s.update({k: torch.zeros(64, 8) for k in list(s) if k.endswith("wi_0._addons.expert_lora.layer1__1")}),
     "inconsistent reference experts"),
])
def test_malformed_files_are_refused(tmp_path, edit, words):
  loras, gates = make_experts(3, seed=2)
  path = str(tmp_path / "best.pt")
  reference.save_reference(path, loras, gates)
  _edit(path, edit)
  with pytest.raises(ValueError, match=words):
    reference.load_reference(path, CONFIG)
