"""The evaluator (seqio.Evaluator): length-normalised scores equal to the model's own, generative rows decoded
greedily and scored by their metric, per-example weights see the task and texts, tables."""
import json

import jax
import numpy as np
import pytest
import seqio

from phatgoose_jax import tasks
from phatgoose_jax import vocab as vocab_lib
from phatgoose_jax.demo import suite
from phatgoose_jax.evaluation import evaluator
from phatgoose_jax.tasks import jsonl, seqio_tasks
from phatgoose_jax.models import EncoderDecoderModel, shift_right, unbox
from phatgoose_jax.t5.config import preset
from phatgoose_jax.experts.config import ExpertConfig
from text_runner import TextRunner

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
  """Unpadded, unbatched, inputs trimmed to the runner's length keeping EOS."""
  vocab = seqio.ByteVocabulary()
  enc = np.array([vocab_lib.encode(vocab, inputs, runner.input_length)], np.int32)
  tgt = np.array([vocab_lib.encode(vocab, target, runner.target_length)], np.int32)
  logits = runner.model.logits(runner.variables, {"encoder_input_tokens": enc, "decoder_input_tokens": shift_right(tgt),
                                                  "decoder_target_tokens": tgt})
  log_probs = jax.nn.log_softmax(np.asarray(logits, np.float64), -1)
  return float(np.mean(np.take_along_axis(np.asarray(log_probs), tgt[..., None], -1)))


def _rows_and_outputs(task, runner, fn_name):
  seqio_eval, rows = evaluator.seqio_evaluator(task, runner)
  outputs = getattr(runner, fn_name)(task, rows)(seqio_eval.cached_model_datasets[task])
  return rows, dict(outputs)


def test_seqio_scores_are_mean_target_log_likelihoods(runner):
  task = suite.HELD_OUT_TASKS[0]
  rows, scores = _rows_and_outputs(task, runner, "score_fn")
  assert sorted(scores) == list(range(len(rows))) and len(rows) > runner.batch_size  # more rows than a batch
  for i, row in enumerate(rows):
    direct = _direct_mean_logprob(runner, row["inputs_pretokenized"].decode(), row["targets_pretokenized"].decode())
    assert scores[i] == pytest.approx(direct, abs=1e-4)


def _register_generative(name, examples):
  def examples_fn(split):
    del split
    return iter([dict(inputs=i, target=t, choices=[], correct=[], references=[t], metric="exact_match")
                 for i, t in examples])
  source = seqio_tasks.text_source(examples_fn, seqio_tasks.EVAL_SIGNATURE, splits=("validation",))
  seqio_tasks.add_task(name, source, evaluation=True, features=jsonl.output_features("byte"))


def test_generative_task_scored_by_its_metric_on_greedy_outputs(runner):
  examples = [("reverse: cat", "tac"), ("upper: ab", "AB"), ("x", "y")] * 3
  _register_generative("test_generative", examples)
  rows, outputs = _rows_and_outputs("test_generative", runner, "predict_fn")
  vocab = seqio.ByteVocabulary()
  for i, (inputs, _) in enumerate(examples):  # the greedy decoding of each input on its own
    enc = np.array([list(vocab.encode(inputs)) + [1] + [0] * 8], np.int32)
    alone = runner.model.predict_batch(runner.variables, {"encoder_input_tokens": enc,
                                                          "decoder_input_tokens": np.zeros((1, 16), np.int32)})
    np.testing.assert_array_equal(outputs[i], np.asarray(alone)[0])
  decoded = [vocab_lib.decode(vocab, outputs[i]) for i in range(len(rows))]
  expected = np.mean([d == t for d, (_, t) in zip(decoded, examples)])
  result = evaluator.evaluate("test_generative", runner)
  assert result["tasks"]["test_generative"] == {"num_examples": 9, "metrics": {"exact_match": expected},
                                                "score": expected}


@pytest.mark.parametrize("task,length", [("flan_Niv2zsPaperreview_eval", 2), ("bbl_operators", 4)])
def test_protocol_generation_length_decodes_one_token_less(runner, task, length):
  """A task's official `max_gen_length` L is `generate(max_length=L)`, which counts the decoder start token:
  L - 1 new tokens (src/models/interface_mixin.py:254-259), the greedy decoding of each input at that count."""
  examples = [("reverse: cat", "tac"), ("x", "y")]
  shadowed = seqio.TaskRegistry._REGISTRY.get(task)  # the real task of that name, restored after
  _register_generative(task, examples)
  try:
    _, outputs = _rows_and_outputs(task, runner, "predict_fn")
  finally:
    seqio.TaskRegistry.remove(task)
    if shadowed is not None:
      seqio.TaskRegistry.add_provider(task, shadowed)
  vocab = seqio.ByteVocabulary()
  for i, (inputs, _) in enumerate(examples):
    enc = np.array([list(vocab.encode(inputs)) + [1]], np.int32)
    alone = runner.model.predict_batch(runner.variables, {"encoder_input_tokens": enc,
                                                          "decoder_input_tokens": np.zeros((1, length - 1), np.int32)})
    np.testing.assert_array_equal(outputs[i], np.asarray(alone)[0])


class _FixedOutputs(TextRunner):
  """Generates the given text (byte ids, then EOS, padded to 16) for each input."""

  def __init__(self, outputs):
    super().__init__(lambda inputs, target: 0.0)
    self.outputs = outputs

  def predict_fn(self, task, rows):
    del task
    ids = lambda i: list(seqio.ByteVocabulary().encode(self.outputs[rows[i]["inputs_pretokenized"].decode()]))
    return lambda dataset: [(int(i), np.asarray((ids(int(i)) + [1] + [0] * 16)[:16], np.int32))
                            for i, _ in dataset.as_numpy_iterator()]


def test_exact_match_reads_outputs_as_the_official_tokenizer_decodes_them():
  """Generated ids become text as `batch_decode(skip_special_tokens=True)` does (spaces before . and n't
  cleaned up, src/models/interface_mixin.py:260), compared to the reference unchanged (src/data/metrics.py)."""
  examples = [("q1", "it's."), ("q2", "don't"), ("q3", "a b")]
  _register_generative("test_official_text", examples)
  runner = _FixedOutputs({"q1": "it 's .", "q2": "do n't", "q3": "a  b"})
  result = evaluator.evaluate("test_official_text", runner)
  assert result["tasks"]["test_official_text"]["metrics"] == {"exact_match": pytest.approx(2 / 3)}


def test_rank_classification_rows_are_not_decoded(runner):
  task = suite.HELD_OUT_TASKS[0]
  rows, outputs = _rows_and_outputs(task, runner, "predict_fn")
  assert sorted(outputs) == list(range(len(rows))) and all(len(tokens) == 0 for tokens in outputs.values())


def test_evaluate_a_mixture_by_name(runner):
  results = evaluator.evaluate(suite.HELD_OUT_MIXTURE, runner)
  assert set(results["tasks"]) == set(suite.HELD_OUT_TASKS)
  for task in results["tasks"].values():
    assert task["num_examples"] == 3 and set(task["metrics"]) == {"accuracy"}
  assert results["score"] == pytest.approx(np.mean([t["score"] for t in results["tasks"].values()]))


def test_first_examples_caps_examples_not_rows(runner):
  result = evaluator.evaluate(suite.HELD_OUT_TASKS[0], runner, max_examples=2)
  assert result["tasks"][suite.HELD_OUT_TASKS[0]]["num_examples"] == 2


def test_per_example_weights_see_the_task_and_texts(runner):
  seen = []

  def weights(batch):
    seen.append((batch["task"][0], batch["inputs"][0], batch["encoder_input_tokens"].shape))
    return np.ones((len(batch["task"]), 2), np.float32) / 2

  routed = EncoderDecoderModel(CONFIG, ExpertConfig(mode="routed", rank=2, num_experts=2, top_k=2))
  variables = unbox(routed.get_initial_variables(jax.random.key(1)))
  run = evaluator.Runner(routed, variables, seqio.ByteVocabulary(), weights, 8, 24, 16)
  task = suite.HELD_OUT_TASKS[0]
  result = evaluator.evaluate(task, run, max_examples=1)
  first = tasks.get_eval_examples(task, 1)[task][0]["inputs"]
  assert np.isfinite(result["score"]) and seen[0] == (task, first, (8, 24))


def test_markdown_table_and_files(tmp_path):
  results = {"m": {"name": "x", "score": 0.5, "tasks": {"a": {"score": 0.25}, "b": {"score": 0.75}}}}
  evaluator.write_results(results, str(tmp_path))
  with open(tmp_path / "results.json") as f:
    assert json.load(f) == results
  table = (tmp_path / "results.md").read_text().splitlines()
  assert table[0] == "| method | a | b | average |"
  assert table[2] == "| m | 25.0 | 75.0 | 50.0 |"
