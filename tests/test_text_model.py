"""`phatgoose_jax.load` and the TextModel on the tiny model: scores against a direct `jit_score` and a numpy
log-softmax, rank classification, greedy decoding against `predict_batch_with_aux`, seeded temperature / top-p
sampling (`models.sample_step` against its equation), stop strings and one-line refusals of bad arguments."""
import subprocess
import sys

import jax
import numpy as np
import pytest

import phatgoose_jax
from phatgoose_jax import text_model
from phatgoose_jax.checkpoints import hf
from phatgoose_jax.models import pad_tokens, sample_step, shift_right

import random_trees as trees

PROMPTS = ["the cat sat", "on a mat", "x", "a longer prompt than the others"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("base"))
  hf.save_hf(path, trees.TINY, trees.random_params())
  return path


@pytest.fixture(scope="module")
def library_dir(tmp_path_factory, base_dir):
  """A library of two gated experts, x and y."""
  return trees.imported_library(tmp_path_factory.mktemp("library"), base_dir, "x,y")


@pytest.fixture(scope="module")
def model(base_dir):
  return phatgoose_jax.load(base_dir, batch_size=4)


@pytest.fixture(scope="module")
def routed(base_dir, library_dir):
  return phatgoose_jax.load(base_dir, library_dir, router="phatgoose", top_k=1, batch_size=4)


def test_package_import_stays_free_of_jax_and_load_is_the_text_models():
  code = "import sys, phatgoose_jax; assert 'jax' not in sys.modules and 'tensorflow' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True)
  assert phatgoose_jax.load is text_model.load


def test_score_equals_jit_score_and_a_numpy_log_softmax(routed):
  inputs, targets = PROMPTS, ["an answer", "b", "", "yes"]
  scores = routed.score(inputs, targets)
  enc = pad_tokens(routed.tokenize(inputs), 32)
  tgt = pad_tokens(routed.tokenize(targets), 16)
  batch = {"encoder_input_tokens": enc, "decoder_input_tokens": shift_right(tgt), "decoder_target_tokens": tgt}
  _, aux = routed.model.jit_score(routed.variables, batch, return_intermediates=True)
  logits = np.asarray(routed.model.logits(routed.variables, batch), np.float64)
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  token = np.take_along_axis(log_probs, tgt[..., None], -1)[..., 0] * (tgt > 0)
  assert [s["num_tokens"] for s in scores] == [len(t) + 1 for t in targets] == list((tgt > 0).sum(-1))
  np.testing.assert_allclose([s["sum_logprob"] for s in scores], aux["sum_logprob"], rtol=1e-5)
  np.testing.assert_allclose([s["mean_logprob"] for s in scores], aux["mean_logprob"], rtol=1e-5)
  np.testing.assert_allclose([s["sum_logprob"] for s in scores], token.sum(-1), rtol=1e-4)
  assert routed.score(inputs, targets) == scores  # batched and bucketed the same way on every call


def test_choose_picks_the_highest_mean_log_likelihood(model):
  choices = ["yes", "no", "maybe so", "q"]
  chosen = model.choose("is it?", choices)
  assert chosen["scores"] == model.score(["is it?"] * 4, choices)
  index = int(np.argmax([s["mean_logprob"] for s in chosen["scores"]]))
  assert (chosen["index"], chosen["choice"]) == (index, choices[index])


def test_greedy_generation_equals_predict_batch_with_aux(routed):
  outputs = routed.generate(PROMPTS, max_new_tokens=8)
  batch = {"encoder_input_tokens": pad_tokens(routed.tokenize(PROMPTS), 32),
           "decoder_input_tokens": np.zeros((len(PROMPTS), 8), np.int32)}
  tokens, aux = routed.model.jit_predict(routed.variables, batch)
  for out, row, total in zip(outputs, np.asarray(tokens), np.asarray(aux["scores"])):
    row = list(row)
    ended = 1 in row
    assert out["token_ids"] == [t for t in row[:row.index(1) if ended else 8] if t > 0]
    assert out["finish_reason"] == ("stop" if ended else "length")
    assert out["text"] == routed.detokenize(out["token_ids"])
    if not ended and 0 not in row:  # pad ids are dropped with their log-probabilities
      np.testing.assert_allclose(sum(out["logprobs"]), total, rtol=1e-5)


def test_generated_logprobs_are_the_models_own(model):
  """Sampled at temperature 2, each token's log-probability is still log p(token) of the model, as scored."""
  outputs = model.generate(PROMPTS, max_new_tokens=8, temperature=2.0, seed=0)
  ended = [o for o in outputs if o["finish_reason"] == "length"]
  assert ended
  prompts = [model.tokenize([p])[0] for p, o in zip(PROMPTS, outputs) if o["finish_reason"] == "length"]
  scores = model.score_ids(prompts, [o["token_ids"] for o in ended])
  np.testing.assert_allclose([sum(o["logprobs"]) for o in ended], [s["sum_logprob"] for s in scores], rtol=1e-4)


def assert_same_generations(outputs, expected):
  """The same texts, tokens and finish reasons; log-probabilities to float rounding (other batch shapes)."""
  assert [(o["text"], o["token_ids"], o["finish_reason"]) for o in outputs] == [
      (o["text"], o["token_ids"], o["finish_reason"]) for o in expected]
  for out, exp in zip(outputs, expected):
    np.testing.assert_allclose(out["logprobs"], exp["logprobs"], rtol=1e-5)


def test_sampling_is_reproducible_per_seed_and_independent_of_batch_mates(model):
  sample = lambda prompts, **kw: model.generate(prompts, max_new_tokens=8, temperature=1.0, **kw)
  first = sample(PROMPTS, seed=0)
  assert sample(PROMPTS, seed=0) == first
  assert [o["token_ids"] for o in sample(PROMPTS, seed=1)] != [o["token_ids"] for o in first]
  one_at_a_time = text_model.TextModel(model.loaded, model.vocabulary, batch_size=1)
  assert_same_generations(one_at_a_time.generate(PROMPTS, max_new_tokens=8, temperature=1.0, seed=0), first)
  assert_same_generations(sample(PROMPTS[:1] + ["other mates", "z"], seed=0)[:1], first[:1])
  assert sample(PROMPTS, seed=3, top_p=1e-6) == model.generate(PROMPTS, max_new_tokens=8)


def test_sample_step_draws_from_the_nucleus_at_temperature():
  """Frequencies of 4000 draws against q = softmax(logits / T) on the nucleus of top_p, renormalised."""
  logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
  n, temperature, top_p = 4000, 0.5, 0.8
  p = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
  nucleus = (np.cumsum(p) - p) < top_p  # p is in decreasing order
  q = np.where(nucleus, p, 0.0) / p[nucleus].sum()
  keys = np.asarray(jax.random.split(jax.random.PRNGKey(0), n))
  tokens, log_probs = sample_step(np.tile(logits, (n, 1)).astype(np.float32), keys, np.zeros(n, np.int32),
                                  np.full(n, temperature, np.float32), np.full(n, top_p, np.float32))
  counts = np.bincount(np.asarray(tokens), minlength=5) / n
  assert set(np.flatnonzero(counts)) == set(np.flatnonzero(q))
  np.testing.assert_allclose(counts, q, atol=0.03)
  np.testing.assert_allclose(log_probs, logits[np.asarray(tokens)], rtol=1e-5)


def test_stop_strings_cut_the_text(model):
  full = next(o for o in model.generate(PROMPTS, max_new_tokens=8) if len(o["text"]) >= 4)
  prompt = PROMPTS[[o["text"] for o in model.generate(PROMPTS, max_new_tokens=8)].index(full["text"])]
  stop = full["text"][2:4]
  cut = model.generate([prompt], max_new_tokens=8, stop=[stop, "\uffff"])[0]
  assert cut["text"] == full["text"][:full["text"].find(stop)] and cut["finish_reason"] == "stop"
  n = len(cut["token_ids"])
  assert cut["token_ids"] == full["token_ids"][:n] and stop in model.detokenize(cut["token_ids"])
  assert stop not in model.detokenize(cut["token_ids"][:-1]) and len(cut["logprobs"]) == n


@pytest.mark.parametrize("call, argument", [
    (lambda m: m.score("a text", ["b"]), "inputs"),
    (lambda m: m.score(["a"], [3]), "targets[0]"),
    (lambda m: m.score(["a", "b"], ["c"]), "inputs and targets"),
    (lambda m: m.choose(["a"], ["b"]), "input"),
    (lambda m: m.choose("a", []), "choices"),
    (lambda m: m.generate([]), "prompts"),
    (lambda m: m.generate([None]), "prompts[0]"),
    (lambda m: m.generate(["a"], max_new_tokens=0), "max_new_tokens"),
    (lambda m: m.generate(["a"], max_new_tokens=10_000), "max_new_tokens"),
    (lambda m: m.generate(["a"], temperature=-0.5), "temperature"),
    (lambda m: m.generate(["a"], top_p=0.0), "top_p"),
    (lambda m: m.generate(["a"], top_p=1.5), "top_p"),
    (lambda m: m.generate(["a"], seed="s"), "seed"),
    (lambda m: m.generate(["a"], stop=[""]), "stop"),
    (lambda m: m.tokenize(["a" * 600], truncate=False), "texts[0]"),
    (lambda m: m.check_ids([5, 900]), "outside the vocabulary"),
    (lambda m: m.check_ids([]), "ids"),
])
def test_bad_arguments_raise_one_line_naming_them(model, call, argument):
  with pytest.raises(ValueError) as raised:
    call(model)
  message = str(raised.value)
  assert message.startswith(argument) or argument in message
  assert "\n" not in message


def test_over_length_texts_are_truncated_keeping_eos(model):
  ids = model.tokenize(["a" * 600, "b"])
  assert [len(i) for i in ids] == [model.max_length, 2] and ids[0][-1] == 1
