"""The baselines as the official code computes them (algorithm.md §5): average activation and retrieval
against independent recomputations of r-three/phatgoose's rules (src/data/p3.py, src/models/addons/moe.py,
src/procedures/retriever.py)."""
import sys

import jax
import numpy as np
import pytest
import seqio

from phatgoose_jax import assembly
from phatgoose_jax import library as lib
from phatgoose_jax import routers
from phatgoose_jax.checkpoints import names, native
from phatgoose_jax.experts.config import ExpertConfig
from phatgoose_jax.models import EOS_ID, EncoderDecoderModel, network, unbox
from phatgoose_jax.evaluation import evaluator
from phatgoose_jax.routers import average_activation as aa
from phatgoose_jax.routers import retrieval
from phatgoose_jax.tasks import jsonl, seqio_tasks

from random_trees import TINY, random_expert, random_params

RANK = 4
LORA = ExpertConfig(mode="lora", rank=RANK)
LORA_APPLY = jax.jit(network(TINY, LORA).apply, static_argnames="mutable")


@pytest.fixture(scope="module")
def params():
  """Random base weights whose EOS logit is scaled up, so that greedy generation stops early in some rows."""
  flat = names.flatten(random_params())
  flat["decoder/logits_dense/kernel"][:, EOS_ID] *= 3.0
  return names.unflatten(flat)


@pytest.fixture
def library(tmp_path, params):
  library = lib.ExpertLibrary(str(tmp_path / "lib"))
  for i, name in enumerate(["a", "b"]):
    lora, gates = random_expert(i, RANK)
    library.add(name, lora, base=lib.base_fingerprint(TINY, params), gates=gates, dataset=f"{name}_data")
  return library


def greedy_rows(model, variables, tokens, steps=aa.MAX_GEN_LENGTH - 1):
  """Each row's greedy tokens <int>[b, steps], one cached step at a time, pad after EOS (rows are independent)."""
  encoded = model.encode(variables, tokens)
  cache = model.init_cache(variables, encoded, tokens, steps)
  token, done, out = np.zeros(len(tokens), np.int32), np.zeros(len(tokens), bool), []
  for _ in range(steps):
    logits, cache = model.decode_step(variables, cache, encoded, tokens, token[:, None])
    token = np.where(done, 0, np.argmax(np.asarray(logits[:, 0]), axis=-1)).astype(np.int32)
    done |= token == EOS_ID
    out.append(token)
  return np.stack(out, axis=1)


def hf_decoder_inputs(rows):
  """The decoder inputs of every step Hugging Face's greedy `generate(max_length=20)` runs on a batch of these
  rows: it stops once every row has emitted EOS, after at most 19 steps. -> <int>[b, steps run]."""
  steps = rows.shape[1]
  for step in range(steps):
    if np.all(np.any(rows[:, :step + 1] == EOS_ID, axis=1)):
      steps = step + 1
      break
  return np.concatenate([np.zeros((len(rows), 1), np.int32), rows[:, :steps - 1]], axis=1)


def numpy_official_average(params, lora, tokens, rows, batch_size=32):
  """src/models/addons/moe.py:865-888 per example, analysis_processors.py:208-233 over examples; `rows` are
  the examples' greedy generations."""
  variables = {"params": params, "lora": names.unflatten(lora)}
  sums, steps = {}, []
  for start in range(0, len(tokens), batch_size):
    enc = tokens[start:start + batch_size]
    dec = hf_decoder_inputs(rows[start:start + batch_size])
    steps.append(dec.shape[1])
    _, state = LORA_APPLY(variables, enc, dec, np.ones_like(dec), mutable=("activations",))
    for key, (u,) in names.flatten(state["activations"]).items():
      path, u = key.rsplit("/", 1)[0], np.asarray(u, np.float64)
      if path.startswith("encoder/") or path.endswith(("encoder_decoder_attention/key",
                                                         "encoder_decoder_attention/value")):
        weights = (enc > 0).astype(np.float64)
        means = np.einsum("bld,bl->bd", u, weights) / (weights.sum(axis=1, keepdims=True) + 1e-6)
      else:
        means = u[:, -1] / (1 + 1e-6)
      sums[path] = sums.get(path, 0.0) + means.sum(axis=0)
  return {p: s / len(tokens) for p, s in sums.items()}, steps


def test_sampled_pairs_follow_the_official_seeded_draw():
  official = np.random.default_rng(42).choice(list(range(5000)), 1000, replace=False)  # src/data/p3.py:104-108
  np.testing.assert_array_equal(seqio_tasks.drawn(5000, 1000), official)
  assert len(set(seqio_tasks.drawn(5000, 1000).tolist())) == 1000
  np.testing.assert_array_equal(seqio_tasks.drawn(1000, 1000), np.arange(1000))  # P <= 1000: every pair, in order


def test_generation_steps_run_until_every_row_has_emitted_eos():
  assert aa.generation_steps(np.array([[5, 1, 0, 0], [7, 8, 1, 0]])) == 3
  assert aa.generation_steps(np.array([[1, 0, 0, 0], [7, 8, 9, 4]])) == 4
  assert aa.generation_steps(np.array([[1, 0], [1, 0]])) == 1


def test_average_activation_is_the_official_mean_of_per_example_means(library, params):
  lora = library.load("a").lora
  model, variables = EncoderDecoderModel(TINY, LORA), {"params": params, "lora": names.unflatten(lora)}
  rng = np.random.default_rng(0)
  pool = rng.integers(2, TINY.vocab_size, (30, 9)).astype(np.int32)
  pool[::3, 6:] = 0
  generated = greedy_rows(model, variables, pool)
  finished = np.any(generated == EOS_ID, axis=1)  # rows whose generation emits EOS
  tokens, generated = pool[finished], generated[finished]
  sample = {"a": [{"encoder_input_tokens": tokens[i:i + 8]} for i in range(0, len(tokens), 8)]}
  collection = routers.build("average_activation", library, ["a"], params=params, sample=sample, top_k=1)[1]
  expected, steps = numpy_official_average(params, lora, tokens, generated, batch_size=8)
  assert steps[0] < aa.MAX_GEN_LENGTH - 1  # the decoder vectors come from an early last step
  flat = names.flatten(collection)
  assert set(expected) == set(names.module_paths(TINY))
  for path, vector in expected.items():
    np.testing.assert_allclose(flat[f"{path}/router"][0], vector, rtol=1e-4, atol=1e-5)
  assert library.derived_kinds("a") == ["average_activation"]
  cached = names.flatten(routers.build("average_activation", library, ["a"], top_k=1)[1])
  np.testing.assert_array_equal(cached["decoder/layers_0/mlp/wo/router"], flat["decoder/layers_0/mlp/wo/router"])


def official_text(example):
  """src/procedures/retriever.py:76-84 (include_answer_choices=True), verbatim."""
  if "answer_choices" in example:
    answer_choices = example["answer_choices"]
    answer_choice_str = ", ".join(answer_choices)
  else:
    answer_choice_str = "None"
  return f"Answer Choices: {answer_choice_str}, Instance: {example['input_str']}"


def test_retrieval_text_follows_the_official_rule():
  examples = [{"input_str": "Is the sky blue?", "answer_choices": ["yes", "no"]},
              {"input_str": "Summarize: a, b.", "answer_choices": []},
              {"input_str": "Translate: hello"}]
  for example in examples:
    assert retrieval.retrieval_text(example["input_str"], example.get("answer_choices")) == official_text(example)
  batch = {"inputs": [e["input_str"] for e in examples[:2]], "answer_choices": [e["answer_choices"] for e in examples[:2]]}
  assert retrieval.batch_texts(batch) == [official_text(e) for e in examples[:2]]
  assert retrieval.batch_texts({"inputs": ["Translate: hello"]}) == [official_text(examples[2])]


def official_query_texts(batch_input):
  """src/models/addons/retriever.py:27-45 (include_answer_choices=True), verbatim: the test batch's texts."""
  input_strings = batch_input["input_str"]
  answer_choice_strings = batch_input["answer_choices"] if "answer_choices" in batch_input else None
  texts = []
  for i in range(len(input_strings)):
    answer_choice_str = ", ".join(answer_choice_strings[i]) if answer_choice_strings else "None"
    texts.append(f"Answer Choices: {answer_choice_str}, Instance: {input_strings[i]}")
  return texts


def test_retrieval_embeds_each_test_examples_answer_choices(library):
  """The evaluator's batches give the router each example's answer choices: a multiple-choice example (one row
  per choice) and a generative one ([], as a P3 template without choices or a generative BIG-bench task)."""
  examples = [dict(inputs="Is it red?", target="yes", choices=["yes", "no", "maybe"], correct=[True, False, False],
                   references=["yes"], metric="accuracy"),
              dict(inputs="Name a colour.", target="red", choices=[], correct=[], references=["red"],
                   metric="exact_match")]
  source = seqio_tasks.text_source(lambda split: iter(examples), seqio_tasks.EVAL_SIGNATURE, splits=("validation",))
  seqio_tasks.add_task("test_retrieval_choices", source, evaluation=True, features=jsonl.output_features("byte"))
  seen = []

  def weights(batch):
    seen.extend(zip(retrieval.batch_texts(batch), batch["inputs"]))
    return np.ones((len(batch["inputs"]), 2), np.float32) / 2

  routed = EncoderDecoderModel(TINY, ExpertConfig(mode="routed", rank=RANK, num_experts=2, top_k=2))
  variables = unbox(routed.get_initial_variables(jax.random.key(1)))
  runner = evaluator.Runner(routed, variables, seqio.ByteVocabulary(), weights, batch_size=8, input_length=16,
                            target_length=8)
  evaluator.evaluate("test_retrieval_choices", runner)
  official = official_query_texts({"input_str": [e["inputs"] for e in examples],
                                   "answer_choices": [e["choices"] for e in examples]})
  assert {text for text, inputs in seen if inputs} == set(official)  # every row of an example: its texts
  assert official == ["Answer Choices: yes, no, maybe, Instance: Is it red?", "Answer Choices: , Instance: Name a colour."]


def test_retrieval_stores_the_first_1000_rows_zero_padded(library):
  """A fake embedder (row -> its `key`) shows which rows are stored and how an expert with fewer rows pads."""
  def embed(batch):
    return np.asarray(batch["key"], np.float32)
  a_rows = np.tile([[1.0, 0.0]], (1100, 1))
  a_rows[1000:] = [0.0, 1.0]  # rows past the first 1000 are never stored
  examples = {"a": [{"key": a_rows[:600]}, {"key": a_rows[600:]}], "b": [{"key": [[-1.0, 0.2]]}]}
  routing_ = retrieval.nearest_expert_routing(library, ["a", "b"], embed, "fake", examples, "dense")
  assert len(library.load_derived("a", "fake", lib.data_key(retrieval.first_rows(examples["a"], 1000)))["embeddings"]) == 1000
  query = {"key": [[0.9, 0.1], [0.0, 1.0], [-1.0, 0.1], [-1.0, -0.3]]}
  # [0, 1] is nearest to no stored row of 'a' (rows 1000+ are dropped); b's zero padding scores cos 0 > -0.95
  np.testing.assert_array_equal(routing_.expert_weights(query), np.eye(2)[[0, 1, 1, 1]])


def test_retrieval_variants_by_name(library, params, tmp_path, monkeypatch):
  assert routers.spec("retrieval").needs == ("examples",)
  assert routers.spec("retrieval_t5").needs == ("params", "examples")
  assert routers.spec("average_activation_pooled").builder == "average_activation:build_pooled"
  rng = np.random.default_rng(1)
  examples = {n: [{"encoder_input_tokens": rng.integers(2, TINY.vocab_size, (3, 9)).astype(np.int32)}]
              for n in ("a", "b")}
  base = str(tmp_path / "base")
  native.save_native(base, {"params": params}, TINY)
  monkeypatch.setattr(assembly, "stored_examples", lambda *args: examples)
  monkeypatch.setattr(assembly.data, "vocabulary", lambda task: None)  # the fixture's datasets are unregistered
  monkeypatch.setattr(assembly.data, "check_vocabulary", lambda *args: None)
  loaded = assembly.load(base, library.path, "retrieval_t5")
  query = {"encoder_input_tokens": np.stack([examples["b"][0]["encoder_input_tokens"][1],
                                             examples["a"][0]["encoder_input_tokens"][2]])}
  np.testing.assert_array_equal(loaded.expert_weights(query), np.eye(2)[[1, 0]])
  assert "retrieval_base" in library.derived_kinds("a")


def test_retrieval_without_sentence_transformers_names_the_extra_and_the_alternative(library, monkeypatch):
  monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # as if the extra were not installed
  with pytest.raises(ImportError, match=r"pip install 'phatgoose-jax\[retrieval\]', or choose router 'retrieval_t5'"):
    routers.build("retrieval", library, ["a"], examples={})
