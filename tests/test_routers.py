"""Routers by name: each formula against an independent numpy computation (algorithm.md §4, §5)."""
import sys

import jax
import numpy as np
import pytest

from phatgoose_jax import library as lib
from phatgoose_jax import routers
from phatgoose_jax.checkpoints import names
from phatgoose_jax.experts import lora as lora_lib
from phatgoose_jax.experts import routing
from phatgoose_jax.models import network, shift_right
from phatgoose_jax.routers import arrow, merging, retrieval
from phatgoose_jax.t5.config import preset
from phatgoose_jax.experts.config import ExpertConfig

from random_trees import random_expert as _random_expert, random_params

CFG = preset("tiny")
RANK = 4
NAMES = ["a", "b", "c"]


def random_expert(seed, gate_scale=1.0):
  return _random_expert(seed, RANK, gate_scale=gate_scale)


def batches(seed, count=2, batch=3, in_len=9, out_len=7):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    enc = rng.integers(2, CFG.vocab_size, (batch, in_len)).astype(np.int32)
    tgt = rng.integers(2, CFG.vocab_size, (batch, out_len)).astype(np.int32)
    enc[1, in_len - 3:] = 0
    enc[2, in_len - 1:] = 0
    tgt[1, out_len - 2:] = 0
    out.append({"encoder_input_tokens": enc, "decoder_input_tokens": shift_right(tgt), "decoder_target_tokens": tgt})
  return out


@pytest.fixture(scope="module")
def params():
  return random_params()


@pytest.fixture(scope="module")
def experts():
  return {n: random_expert(i) for i, n in enumerate(NAMES)}


@pytest.fixture
def library(tmp_path, params, experts):
  library = lib.ExpertLibrary(str(tmp_path / "lib"))
  fingerprint = lib.base_fingerprint(CFG, params)
  for n, (lora, gates) in experts.items():
    library.add(n, lora, base=fingerprint, gates=gates, dataset=f"{n}_data")
  return library


def test_registry_names_every_router_and_refuses_unknown_ones(library):
  assert sorted(routers.ROUTERS) == sorted(["phatgoose", "average_activation", "average_activation_pooled", "arrow",
                                            "spectr", "merged", "merged_products", "uniform", "oracle", "retrieval",
                                            "retrieval_t5"])
  assert routers.PER_TOKEN == ("phatgoose", "average_activation", "average_activation_pooled", "arrow", "spectr")
  assert {n for n, s in routers.ROUTERS.items() if s.needs} == {"average_activation", "average_activation_pooled",
                                                                "oracle", "retrieval", "retrieval_t5"}
  assert routers.options("retrieval_t5", top_k=3, params={}) == {"impl": "auto", "params": {}}
  assert routers.options("retrieval", top_k=3, params={}) == {"impl": "auto"}
  assert routers.options("arrow", top_k=3, params={}) == {"top_k": 3, "impl": "auto"}
  with pytest.raises(ValueError, match="unknown router 'moe'"):
    routers.build("moe", library, NAMES)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_top_k_is_any_value_from_one_to_e(library, top_k):
  assert routers.build("phatgoose", library, NAMES, top_k=top_k).expert_config.top_k == top_k


def test_top_k_above_e_is_refused(library):
  with pytest.raises(ValueError, match="top_k must be in"):
    routers.build("phatgoose", library, NAMES, top_k=4)


def test_phatgoose_refuses_experts_without_gates(tmp_path, params, experts):
  library = lib.ExpertLibrary(str(tmp_path))
  library.add("nogate", experts["a"][0], base=lib.base_fingerprint(CFG, params))
  with pytest.raises(ValueError, match=r"\['nogate'\] have no gate vectors"):
    routers.build("phatgoose", library, ["nogate"])


def test_zero_gate_vectors_give_finite_scores(tmp_path, params):
  library = lib.ExpertLibrary(str(tmp_path))
  lora, gates = random_expert(5, gate_scale=0.0)
  with pytest.warns(lib.UntrainedGateWarning):
    library.add("zero", lora, base=lib.base_fingerprint(CFG, params), gates=gates)
  _, collection = routers.build("phatgoose", library, ["zero"], top_k=1)[:2]
  router = collection["encoder"]["layers_0"]["attention"]["query"]["router"]
  u = np.random.default_rng(0).standard_normal((4, CFG.d_model)).astype(np.float32)
  assert np.all(np.isfinite(np.asarray(routing.phatgoose_scores(u, router))))


LORA_APPLY = jax.jit(network(CFG, ExpertConfig(mode="lora", rank=RANK)).apply, static_argnames="mutable")


def sown_inputs(params, lora, batch):
  """Every target module's input u <[b, L, d_in]>, from the `activations` collection of the lora model."""
  _, state = LORA_APPLY({"params": params, "lora": names.unflatten(lora)}, batch["encoder_input_tokens"],
                          batch["decoder_input_tokens"], batch["decoder_target_tokens"], mutable=("activations",))
  return {k.rsplit("/", 1)[0]: np.asarray(v[0], np.float64) for k, v in names.flatten(state["activations"]).items()}


def numpy_average_activations(params, lora, data):
  sums, counts = {}, {}
  for batch in data:
    enc_mask = batch["encoder_input_tokens"] > 0
    dec_mask = batch["decoder_target_tokens"] > 0
    for path, u in sown_inputs(params, lora, batch).items():
      encoder_side = path.startswith("encoder/") or path.endswith(("encoder_decoder_attention/key",
                                                                    "encoder_decoder_attention/value"))
      mask = enc_mask if encoder_side else dec_mask
      sums[path] = sums.get(path, 0) + u[mask].sum(axis=0)
      counts[path] = counts.get(path, 0) + mask.sum()
  return {p: sums[p] / counts[p] for p in sums}


def test_pooled_average_activation_is_the_masked_mean_of_sown_inputs_and_is_cached(library, params, experts):
  data = {"a": batches(1), "b": batches(2)}
  config, collection = routers.build("average_activation_pooled", library, ["a", "b"], params=params, data=data,
                                     top_k=1)[:2]
  assert config.score == "standardized" and config.num_experts == 2
  flat = names.flatten(collection)
  for e, name in enumerate(["a", "b"]):
    expected = numpy_average_activations(params, experts[name][0], data[name])
    assert set(expected) == set(names.module_paths(CFG))
    for path, vector in expected.items():
      np.testing.assert_allclose(flat[f"{path}/router"][e], vector, rtol=1e-4, atol=1e-5)
  assert "average_activation_pooled" in library.derived_kinds("a")
  _, cached = routers.build("average_activation_pooled", library, ["a", "b"], top_k=1)[:2]
  key = "decoder/layers_1/mlp/wo/router"
  np.testing.assert_array_equal(names.flatten(cached)[key], flat[key])
  with pytest.raises(ValueError, match="no cached average activations for expert 'c'"):
    routers.build("average_activation_pooled", library, ["c"], top_k=1)


def test_arrow_vector_is_the_top_input_singular_vector_of_the_update():
  rng = np.random.default_rng(0)
  lora_a, lora_b = rng.standard_normal((32, RANK)), rng.standard_normal((RANK, 64))
  update = lora_a @ lora_b  # u @ update = the expert's output change: Delta^T
  u_svd, s, _ = np.linalg.svd(update)
  vector = arrow.arrow_vector(lora_a, lora_b)
  assert abs(abs(vector @ u_svd[:, 0]) - 1.0) < 1e-5
  np.testing.assert_allclose(np.linalg.norm(vector @ update), s[0], rtol=1e-5)


def test_arrow_router_uses_arrow_scores_and_caches_vectors(library, experts):
  config, collection = routers.build("arrow", library, NAMES, top_k=2)[:2]
  assert config.score == "arrow" and config.top_k == 2
  flat = names.flatten(collection)
  path = "decoder/layers_0/encoder_decoder_attention/out"
  for e, name in enumerate(NAMES):
    lora = experts[name][0]
    left, _, _ = np.linalg.svd(lora[f"{path}/lora_a"].astype(np.float64) @ lora[f"{path}/lora_b"])
    assert abs(abs(flat[f"{path}/router"][e] @ left[:, 0]) - 1.0) < 1e-5
  assert library.derived_kinds("b") == ["arrow"]


def test_merged_variants(library, experts):
  u = np.random.default_rng(1).standard_normal((5, CFG.d_ff)).astype(np.float32)
  path = "encoder/layers_1/mlp/wo"
  loras = [experts[n][0] for n in NAMES]
  a = [l[f"{path}/lora_a"].astype(np.float64) for l in loras]
  b = [l[f"{path}/lora_b"].astype(np.float64) for l in loras]

  config, collection = routers.build("merged", library, NAMES)[:2]
  assert (config.mode, config.rank, config.lora_scale) == ("lora", RANK, 1 / RANK)
  leaf = names.flatten(collection)
  np.testing.assert_allclose(leaf[f"{path}/lora_a"], np.mean(a, axis=0), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(leaf[f"{path}/lora_b"], np.mean(b, axis=0), rtol=1e-6, atol=1e-7)

  config, collection = routers.build("merged_products", library, NAMES)[:2]
  assert (config.mode, config.rank, config.lora_scale) == ("lora", 3 * RANK, 1 / RANK)
  leaf = names.flatten(collection)
  got = lora_lib.lora_update(u, leaf[f"{path}/lora_a"], leaf[f"{path}/lora_b"], config.lora_scale)
  expected = np.mean([u @ a_e @ b_e / RANK for a_e, b_e in zip(a, b)], axis=0)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-5)
  products = np.mean([a_e @ b_e for a_e, b_e in zip(a, b)], axis=0)
  np.testing.assert_allclose(merging.average_products(loras)[f"{path}/lora_a"] @
                             merging.average_products(loras)[f"{path}/lora_b"], products, rtol=1e-4, atol=1e-5)


def test_uniform_weights_every_expert_equally(library):
  routing_ = routers.build("uniform", library, NAMES)
  assert routing_.expert_config.top_k == 3
  np.testing.assert_allclose(routing_.expert_weights(batches(0)[0]), np.full((3, 3), 1 / 3))


def test_oracle_maps_labels_to_experts(library):
  batch = {**batches(0)[0], "task": ["c_data", "a", "b_data"]}
  np.testing.assert_array_equal(routers.build("oracle", library, NAMES).expert_weights(batch), np.eye(3)[[2, 0, 1]])
  custom = routers.build("oracle", library, ["b", "a"], label_to_expert={"x": "a", "y": "b"}, label_key="family")
  np.testing.assert_array_equal(custom.expert_weights({"family": ["y", "x"]}), np.eye(2))
  with pytest.raises(KeyError, match="no expert for labels \\['zzz'\\]"):
    routers.build("oracle", library, NAMES).expert_weights({"task": ["zzz"]})


def test_t5_retrieval_picks_the_expert_of_the_nearest_stored_example(library, params):
  examples = {n: batches(10 + i, count=1) for i, n in enumerate(NAMES)}
  routing_ = routers.build("retrieval_t5", library, NAMES, examples=examples, params=params)
  assert library.derived_kinds("a") == ["retrieval_base"]
  stored = [examples[n][0]["encoder_input_tokens"] for n in NAMES]
  query = {"encoder_input_tokens": np.stack([stored[2][0], stored[0][1], stored[1][2]])}
  np.testing.assert_array_equal(routing_.expert_weights(query), np.eye(3)[[2, 0, 1]])
  embed = retrieval.base_embedder(CFG, params)
  keys = np.concatenate([embed(examples[n][0]) for n in NAMES])
  queries = np.random.default_rng(3).standard_normal((4, CFG.d_model))
  cosine = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
      keys / np.linalg.norm(keys, axis=1, keepdims=True)).T
  np.testing.assert_array_equal(retrieval.nearest_owner(queries, keys, np.repeat(np.arange(3), 3)),
                                np.argmax(cosine, axis=1) // 3)
  cached = routers.build("retrieval_t5", library, NAMES, params=params)
  np.testing.assert_array_equal(cached.expert_weights(query), np.eye(3)[[2, 0, 1]])


def test_minilm_retrieval_without_the_extra_gives_a_clear_error(library, monkeypatch):
  monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # as if the extra were not installed
  with pytest.raises(ImportError, match=r"phatgoose-jax\[retrieval\]"):
    routers.build("retrieval", library, NAMES, examples={})


def test_minilm_retrieval_routes_to_the_semantically_nearest_expert(library, monkeypatch):
  """The paper's retrieval encoder (all-MiniLM-L6-v2, offline from the `retrieval` extra) on example texts."""
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  texts = {"a": ["The striker scored a goal in the final minute of the match.", "The team won the league title."],
           "b": ["Bake the bread in a hot oven for forty minutes.", "Whisk the eggs with sugar and flour."],
           "c": ["The stock market fell sharply after the bank raised interest rates.", "Shares rallied on earnings."]}
  routing_ = routers.build("retrieval", library, NAMES, examples={n: [{"inputs": t}] for n, t in texts.items()})
  assert library.derived_kinds("a") == ["retrieval_minilm"]
  query = {"inputs": ["Investors sold bonds as inflation rose.", "The goalkeeper saved a penalty.",
                      "Knead the dough and let it rise."]}
  np.testing.assert_array_equal(routing_.expert_weights(query), np.eye(3)[[2, 0, 1]])


def test_fixed_mixture_routing_runs_in_the_model(library, params):
  """The uniform mixture through the model equals per-token routing over all-zero routers with k = E."""
  from phatgoose_jax.models import EncoderDecoderModel
  routing_ = routers.build("uniform", library, NAMES)
  model = EncoderDecoderModel(CFG, routing_.expert_config)
  batch = batches(4, count=1)[0]
  variables = routing_.variables(params)
  mixed = np.asarray(model.logits(variables, {**batch, "expert_weights": jax.numpy.asarray(routing_.expert_weights(batch))}))
  routed = np.asarray(model.logits(variables, batch))
  np.testing.assert_allclose(mixed, routed, atol=1e-4)
