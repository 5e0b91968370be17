"""The expert library on disk: round trip, refusals, atomic writes, verification, and routed numerics."""
import json
import os
import warnings

import numpy as np
import pytest

from phatgoose_jax import cli, routers, tasks
from phatgoose_jax import library as lib
from phatgoose_jax.checkpoints import names, peft
from phatgoose_jax.models import EncoderDecoderModel
from phatgoose_jax.t5.config import ALL_TARGETS, preset
from phatgoose_jax.experts.config import ExpertConfig

from random_trees import random_batch, random_expert, random_params

CFG = preset("tiny")
RANK = 4


@pytest.fixture(scope="module")
def base():
  params = random_params()
  return params, lib.base_fingerprint(CFG, params)


@pytest.fixture
def filled(tmp_path, base):
  """A library of three gated experts e0, e1, e2."""
  library = lib.ExpertLibrary(str(tmp_path / "lib"))
  experts = {f"e{i}": random_expert(i) for i in range(3)}
  for name, (lora, gates) in experts.items():
    library.add(name, lora, base=base[1], gates=gates, dataset=f"data_{name}", training={"steps": 1000})
  return library, experts


def test_round_trip_add_list_remove_assemble(filled, base):
  library, experts = filled
  assert library.names() == ["e0", "e1", "e2"]
  manifest = library.manifest("e1")
  assert (manifest["rank"], manifest["targets"], manifest["gate"], manifest["dtype"]) == (
      RANK, list(ALL_TARGETS), True, "float32")
  assert manifest["dataset"] == "data_e1" and manifest["training"] == {"steps": 1000}
  assert manifest["base"] == json.loads(json.dumps(base[1]))
  assert manifest["weights"]["sha256"] == lib.file_sha256(os.path.join(library.path, "e1", lib.WEIGHTS))

  config, collection = routers.build("phatgoose", library, ["e2", "e0"], top_k=1)[:2]
  assert config == ExpertConfig(mode="routed", rank=RANK, targets=ALL_TARGETS, num_experts=2, top_k=1)
  flat = names.flatten(collection)
  for module in names.module_paths(CFG):
    for e, name in enumerate(["e2", "e0"]):
      lora, gates = experts[name]
      np.testing.assert_array_equal(flat[f"{module}/lora_a"][e], lora[f"{module}/lora_a"])
      np.testing.assert_array_equal(flat[f"{module}/lora_b"][e], lora[f"{module}/lora_b"])
      np.testing.assert_array_equal(flat[f"{module}/router"][e], gates[f"{module}/gate"])

  library.remove("e1")
  assert library.names() == ["e0", "e2"] and [m["name"] for m in library.list()] == ["e0", "e2"]
  assert sorted(os.listdir(library.path)) == ["e0", "e2"]
  with pytest.raises(lib.LibraryError, match=r"has no experts \['e1'\]"):
    routers.build("phatgoose", library, ["e1"])


def test_bfloat16_storage_rounds_and_keeps_float32_interface(tmp_path, base):
  library = lib.ExpertLibrary(str(tmp_path))
  lora, gates = random_expert(7)
  library.add("half", lora, base=base[1], gates=gates, dtype="bfloat16")
  loaded = library.load("half")
  key = "decoder/layers_1/mlp/wo/lora_b"
  assert loaded.lora[key].dtype == np.float32
  np.testing.assert_allclose(loaded.lora[key], lora[key], rtol=1e-2)


@pytest.mark.parametrize("case", ["weights", "architecture", "rank", "targets", "duplicate"])
def test_incompatible_experts_are_refused(filled, base, case):
  library, _ = filled
  fingerprint, lora = base[1], random_expert(9)[0]
  if case == "weights":
    fingerprint = lib.base_fingerprint(CFG, random_params(seed=1))
    pattern = "another base model.*base weights differ"
  elif case == "architecture":
    other = CFG.replace(d_ff=48)
    fingerprint = lib.base_fingerprint(other, random_params(other))
    lora = random_expert(9, config=other)[0]
    pattern = "another base model.*d_ff: 48 vs 64"
  elif case == "rank":
    lora = random_expert(9, rank=2)[0]
    pattern = "have rank 4.*its LoRA rank is 2"
  elif case == "targets":
    lora = random_expert(9, targets=("query", "value"))[0]
    pattern = r"target \['query', 'key'.*it targets \['query', 'value'\]"
  name = "e0" if case == "duplicate" else "new"
  with pytest.raises(lib.LibraryError, match="already has an expert named 'e0'" if case == "duplicate" else pattern):
    library.add(name, lora, base=fingerprint)
  assert library.names() == ["e0", "e1", "e2"]


def test_expert_that_does_not_fit_its_own_base_is_refused(tmp_path, base):
  lora, _ = random_expert(0)
  del lora["encoder/layers_1/mlp/wo/lora_a"]
  lora["decoder/layers_0/mlp/wi_0/lora_b"] = np.zeros((RANK, 3), np.float32)
  with pytest.raises(lib.LibraryError, match=r"missing encoder/layers_1/mlp/wo/lora_a(.|\n)*"
                     r"|shape of decoder/layers_0/mlp/wi_0/lora_b"):
    lib.ExpertLibrary(str(tmp_path)).add("bad", lora, base=base[1])


@pytest.mark.parametrize("failure", ["rename", "weights", "manifest"])
def test_a_crash_mid_write_leaves_the_library_as_it_was(filled, base, monkeypatch, failure):
  library, _ = filled

  def crash(*args, **kwargs):
    raise OSError("simulated crash")

  def half_weights(path, *args, **kwargs):
    with open(path, "wb") as f:
      f.write(b"\x00" * 10)
    crash()

  target = {"rename": (lib.os, "rename", crash), "weights": (lib, "_save_safetensors", half_weights),
            "manifest": (lib, "_write_json", crash)}[failure]
  monkeypatch.setattr(*target)
  with pytest.raises(OSError, match="simulated crash"):
    library.add("new", random_expert(5)[0], base=base[1])
  monkeypatch.undo()
  assert library.names() == ["e0", "e1", "e2"]
  assert sorted(os.listdir(library.path)) == ["e0", "e1", "e2"]
  assert not [p for p in library.verify() if p.level == "error"]


def test_replace_swaps_an_entry_and_a_failed_replace_keeps_the_old_one(filled, base, monkeypatch):
  library, _ = filled
  old = library.load("e1")
  lora, gates = random_expert(6)

  def crash(*args, **kwargs):
    raise OSError("simulated crash")

  monkeypatch.setattr(lib, "_write_json", crash)
  with pytest.raises(OSError, match="simulated crash"):
    library.add("e1", lora, base=base[1], gates=gates, replace=True)
  monkeypatch.undo()
  for key, value in old.lora.items():
    np.testing.assert_array_equal(library.load("e1").lora[key], value)
  library.add("e1", lora, base=base[1], gates=gates, replace=True)
  assert library.names() == ["e0", "e1", "e2"] and sorted(os.listdir(library.path)) == ["e0", "e1", "e2"]
  for key, value in lib._flat_float32(gates).items():
    np.testing.assert_array_equal(library.load("e1").gates[key], value)


def test_leftovers_of_a_killed_write_are_ignored_and_reported(filled):
  library, _ = filled
  half = os.path.join(library.path, ".tmp-new-abc123")
  os.makedirs(half)
  with open(os.path.join(half, lib.WEIGHTS), "wb") as f:
    f.write(b"truncated")
  assert library.names() == ["e0", "e1", "e2"]
  problems = library.verify()
  assert [(p.entry, p.level) for p in problems] == [(".tmp-new-abc123", "warning")]
  assert "interrupted" in problems[0].message


def test_verify_detects_a_corrupt_weights_file(filled):
  library, _ = filled
  path = os.path.join(library.path, "e1", lib.WEIGHTS)
  data = bytearray(open(path, "rb").read())
  data[-5] ^= 0xFF
  open(path, "wb").write(bytes(data))
  problems = library.verify()
  assert [(p.entry, p.level) for p in problems] == [("e1", "error")]
  assert "corrupt" in problems[0].message
  with pytest.raises(lib.LibraryError, match="corrupt"):
    library.load("e1")
  library.load("e0")


def test_zero_gates_warn_on_add_and_are_reported_by_verify(tmp_path, base):
  library = lib.ExpertLibrary(str(tmp_path))
  lora, gates = random_expert(3, gate_scale=0.0)
  with pytest.warns(lib.UntrainedGateWarning, match="untrained gate"):
    library.add("zero", lora, base=base[1], gates=gates)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    library.add("trained", *random_expert(4)[:1], base=base[1], gates=random_expert(4)[1])
  assert [(p.entry, p.level) for p in library.verify()] == [("zero", "warning")]


@pytest.fixture(scope="module")
def models():
  return {"lora": EncoderDecoderModel(CFG, ExpertConfig(mode="lora", rank=RANK)),
          "routed1": EncoderDecoderModel(CFG, ExpertConfig(mode="routed", rank=RANK, num_experts=1, top_k=1)),
          "none": EncoderDecoderModel(CFG)}


def test_routed_model_of_one_expert_top1_equals_the_single_expert_model(tmp_path, base, models):
  library = lib.ExpertLibrary(str(tmp_path))
  lora, gates = random_expert(11)
  library.add("only", lora, base=base[1], gates=gates)
  routing = routers.build("phatgoose", library, ["only"], top_k=1)
  assert routing.expert_config == models["routed1"].experts
  batch = random_batch(1)
  routed = np.asarray(models["routed1"].logits(routing.variables(base[0]), batch))
  single = np.asarray(models["lora"].logits({"params": base[0], "lora": names.unflatten(lora)}, batch))
  np.testing.assert_allclose(routed, single, atol=1e-4)


def test_experts_follow_the_official_pool_order_then_the_order_added(tmp_path, base, models, capsys):
  """P3 pool experts in scripts/concatenate.py:8-45 order (ag_news, amazon_polarity, cosmos_qa, ...) whatever
  order they were added in, the others after them as added; equal gates make every PHATGOOSE score tie, and a
  tie goes to the first expert in that order."""
  library = lib.ExpertLibrary(str(tmp_path / "lib"))
  gates, loras = random_expert(0)[1], {}
  added = [("z_mine", None), ("cosmos", "p3_cosmos_qa"), ("b_mine", "mine.jsonl"), ("news", "p3_ag_news"),
           ("amazon", "p3_amazon_polarity")]
  for i, (name, dataset) in enumerate(added):
    loras[name] = random_expert(20 + i)[0]
    library.add(name, loras[name], base=base[1], gates=gates, dataset=dataset)
  library.add("cosmos", loras["cosmos"], base=base[1], gates=gates, dataset="p3_cosmos_qa", replace=True)
  library.add("z_mine", loras["z_mine"], base=base[1], gates=gates, replace=True)  # keeps its place
  order = ["news", "amazon", "cosmos", "z_mine", "b_mine"]
  assert library.names() == order and [m["name"] for m in library.list()] == order
  assert cli.main(["library", "list", "--library", library.path]) == 0
  assert [line.split()[0] for line in capsys.readouterr()[0].splitlines()[1:]] == order  # the per-expert table
  routing = routers.build("phatgoose", library, library.names(), top_k=1)
  batch = random_batch(1)
  routed = np.asarray(EncoderDecoderModel(CFG, routing.expert_config).logits(routing.variables(base[0]), batch))
  first = np.asarray(models["lora"].logits({"params": base[0], "lora": names.unflatten(loras["news"])}, batch))
  np.testing.assert_allclose(routed, first, atol=1e-4)


def test_a_registered_pool_lists_in_its_order_whatever_finished_first(tmp_path, base, monkeypatch):
  """A suite's pool (`tasks.register_pool`, as the demo's contributors train concurrently) lists its experts in
  the pool's order after the experts outside any pool; a taken group is refused."""
  monkeypatch.setattr(tasks, "POOLS", {})
  tasks.register_pool(3, ["s_one", "s_two", "s_three"])
  with pytest.raises(ValueError, match="pool group 2 is taken"):
    tasks.register_pool(2, ["x"])
  library = lib.ExpertLibrary(str(tmp_path / "lib"))
  for i, (name, dataset) in enumerate([("three", "s_three"), ("mine", None), ("one", "s_one"), ("two", "s_two")]):
    library.add(name, random_expert(40 + i)[0], base=base[1], gates=random_expert(40 + i)[1], dataset=dataset)
  assert library.names() == ["mine", "one", "two", "three"]


def test_a_library_written_without_an_order_keeps_listing_by_name(filled, base):
  """Entries from before the recorded order list by name, as they always did; experts added later follow them."""
  library, _ = filled
  for name in ("e0", "e1", "e2"):
    path = os.path.join(library.path, name, lib.MANIFEST)
    with open(path) as f:
      manifest = json.load(f)
    manifest.pop("order")
    with open(path, "w") as f:
      json.dump(manifest, f)
  library.add("a_new", random_expert(5)[0], base=base[1], dataset="p3_ag_news")
  assert library.names() == ["e0", "e1", "e2", "a_new"]
  assert library.verify() == []


def test_peft_expert_routed_equals_numpy(tmp_path, base, models):
  """A PEFT adapter (alpha 8, r 4: scale 2) through the library: routed model == base model with every
  kernel replaced, in numpy, by W + 2 (B A)^T."""
  rng = np.random.default_rng(12)
  alpha, weights = 8.0, {}
  merged = names.flatten(base[0])
  for path in names.module_paths(CFG):
    d_in, d_out = names.linear_shape(CFG, path)
    a = (0.3 * rng.standard_normal((RANK, d_in))).astype(np.float32)
    b = (0.3 * rng.standard_normal((d_out, RANK))).astype(np.float32)
    key = f"base_model.model.{names.to_hf_module(path)}"
    weights.update({f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b})
    merged[f"{path}/kernel"] = (merged[f"{path}/kernel"].astype(np.float64) + (alpha / RANK) * (b @ a).T).astype(
        np.float32)
  adapter = tmp_path / "adapter"
  adapter.mkdir()
  (adapter / peft.CONFIG_FILE).write_text(json.dumps(
      {"peft_type": "LORA", "r": RANK, "lora_alpha": alpha,
       "target_modules": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]}))
  from safetensors.numpy import save_file
  save_file(weights, str(adapter / peft.WEIGHTS_FILES[0]))

  library = lib.ExpertLibrary(str(tmp_path / "lib"))
  library.add("peft", peft.load_peft(str(adapter), CFG).lora, base=base[1])
  routing = routers.build("uniform", library, ["peft"])
  assert routing.expert_config == models["routed1"].experts
  batch = random_batch(2)
  routed = np.asarray(models["routed1"].logits(routing.variables(base[0]), batch))
  expected = np.asarray(models["none"].logits({"params": names.unflatten(merged)}, batch))
  np.testing.assert_allclose(routed, expected, atol=2e-4, rtol=1e-4)


def test_data_key_hashes_texts_by_their_characters():
  """The cache key of router inputs: equal for equal data in fresh arrays (texts included), else different."""
  def batches(texts):
    return [{"encoder_input_tokens": np.arange(6, dtype=np.int32).reshape(2, 3),
             "inputs": np.array([str(t) for t in texts], dtype=object)}]
  assert lib.data_key(batches(["a b", "c"])) == lib.data_key(batches(["a b", "c"]))
  assert lib.data_key(batches(["a b", "c"])) == lib.data_key([{**batches([])[0], "inputs": ["a b", "c"]}])
  assert lib.data_key(batches(["a b", "c"])) != lib.data_key(batches(["a b", "d"]))
