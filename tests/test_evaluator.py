"""The evaluator: length-normalised scores equal to the model's own, per-example weights see the task, tables."""
import json

import jax
import numpy as np
import pytest
import seqio

from phatgoose_jax.demo import suite
from phatgoose_jax.evaluation import evaluator
from phatgoose_jax.models import EncoderDecoderModel, shift_right, unbox
from phatgoose_jax.t5.config import preset
from phatgoose_jax.experts.config import ExpertConfig

CONFIG = preset("tiny", dropout_rate=0.0)


@pytest.fixture(scope="module")
def runner():
  model = EncoderDecoderModel(CONFIG)
  variables = jax.device_get(model.module.init(jax.random.key(0), np.ones((1, 4), np.int32),
                                               np.ones((1, 4), np.int32)))
  suite.register(0, suite.SuiteSizes(train=8, validation=4, held_out=3))
  return evaluator.Runner(model, dict(variables), seqio.ByteVocabulary(), batch_size=8, input_length=24,
                          target_length=16)


def _direct_mean_logprob(runner, inputs, target):
  vocab = seqio.ByteVocabulary()
  enc = np.array([list(vocab.encode(inputs)) + [1]], np.int32)
  tgt = np.array([list(vocab.encode(target)) + [1]], np.int32)
  logits = runner.model.logits(runner.variables, {"encoder_input_tokens": enc, "decoder_input_tokens": shift_right(tgt),
                                                  "decoder_target_tokens": tgt})
  log_probs = jax.nn.log_softmax(np.asarray(logits, np.float64), -1)
  return float(np.mean(np.take_along_axis(np.asarray(log_probs), tgt[..., None], -1)))


def test_scores_are_mean_target_log_likelihoods(runner):
  pairs = [("reverse: cat", "tac"), ("upper: dog | upper: ab", "DOG AB"), ("x", "a longer one")]
  scores = runner.score(pairs * 4)  # more rows than one batch
  assert len(scores) == 12
  for (inputs, target), score in zip(pairs, scores):
    assert score == pytest.approx(_direct_mean_logprob(runner, inputs, target), abs=1e-4)


def test_generate_returns_one_string_per_input(runner):
  outputs = runner.generate(["reverse: cat"] * 9)
  assert len(outputs) == 9 and all(isinstance(o, str) for o in outputs)
  assert len(set(outputs)) == 1


def test_evaluate_a_mixture_by_name(runner):
  results = evaluator.evaluate(suite.HELD_OUT_MIXTURE, runner)
  assert set(results["tasks"]) == set(suite.HELD_OUT_TASKS)
  for task in results["tasks"].values():
    assert task["num_examples"] == 3 and set(task["metrics"]) == {"accuracy"}
  assert results["score"] == pytest.approx(np.mean([t["score"] for t in results["tasks"].values()]))


def test_per_example_weights_see_the_task_and_texts(runner):
  seen = []

  def weights(batch):
    seen.append((batch["task"][0], batch["inputs"][0], batch["encoder_input_tokens"].shape))
    return np.ones((len(batch["task"]), 2), np.float32) / 2

  routed = EncoderDecoderModel(CONFIG, ExpertConfig(mode="routed", rank=2, num_experts=2, top_k=2))
  variables = unbox(routed.get_initial_variables(jax.random.key(1)))
  run = evaluator.Runner(routed, variables, seqio.ByteVocabulary(), weights, 8, 24, 16)
  assert np.isfinite(run.score([("upper: ab", "AB")], task="demo_upper")).all()
  assert seen == [("demo_upper", "upper: ab", (8, 24))]


def test_markdown_table_and_files(tmp_path):
  results = {"m": {"name": "x", "score": 0.5, "tasks": {"a": {"score": 0.25}, "b": {"score": 0.75}}}}
  evaluator.write_results(results, str(tmp_path))
  with open(tmp_path / "results.json") as f:
    assert json.load(f) == results
  table = (tmp_path / "results.md").read_text().splitlines()
  assert table[0] == "| method | a | b | average |"
  assert table[2] == "| m | 25.0 | 75.0 | 50.0 |"
