"""Expert checkpoint selection by the task metric (algorithm.md §2): the training -> validation task rule, the
loss fallback, a tiny end-to-end `train_expert` that keeps its best-accuracy step, and process-0 library writes."""
import json
import logging

import gin
import jax
import numpy as np
import pytest

from phatgoose_jax import data, distributed, main, partitioning, train, utils
from phatgoose_jax import library as lib
from phatgoose_jax.checkpoints import names as ckpt_names
from phatgoose_jax.checkpoints import native
from phatgoose_jax.demo import suite, suite_tokens
from phatgoose_jax.tasks import seqio_tasks

SMALL = ["data.resolve.jsonl_vocabulary = 'byte'", "train.fit.eval_every = 2", "train.selection.batch_size = 16"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """The smoke demo's configuration, the keyword suite registered, and a randomly initialised tiny base."""
  main.parse(["demo_smoke.gin"], SMALL)
  suite.register(0, suite.SuiteSizes(train=32, validation=8, held_out=6))
  model = utils.get_model(utils.model_config())
  path = str(tmp_path_factory.mktemp("base") / "base")
  params = jax.device_get(utils.init_variables(model, 0))["params"]
  native.save_native(path, {"params": partitioning.unbox(params)}, utils.model_config())
  yield path
  gin.clear_config()


def test_each_training_task_maps_to_its_evaluation_task(base, tmp_path):
  assert data.validation_task("p3_ag_news") == "p3_ag_news_eval"
  assert data.validation_task("p3_held_in") == "p3_held_in_eval"
  assert data.validation_task(suite.HELD_IN_TASKS[0]) == suite.HELD_IN_EVAL_TASKS[0]
  suite_tokens.register(0, suite.SuiteSizes(train=8, validation=4, held_out=4))
  assert data.validation_task(suite_tokens.HELD_IN_TASKS[0]) == suite_tokens.HELD_IN_EVAL_TASKS[0]
  assert data.validation_task(suite.PRETRAIN_TASK) is None
  (tmp_path / "mine.jsonl").write_text(json.dumps({"inputs": "a", "targets": "b"}) + "\n")
  assert data.validation_task(str(tmp_path / "mine.jsonl")) is None
  # A registered `<name>_eval` that is not scored by a metric is no validation task.
  source = seqio_tasks.text_source(lambda split: iter([{"inputs": "a", "targets": "b"}]),
                                   seqio_tasks.TRAIN_SIGNATURE)
  seqio_tasks.add_task("selection_plain", source, evaluation=False)
  seqio_tasks.add_task("selection_plain_eval", source, evaluation=False)
  assert data.validation_task("selection_plain") is None


def test_without_an_evaluation_task_the_loss_selects_with_a_warning(base, tmp_path, caplog):
  model = utils.get_model(utils.model_config(), utils.lora_config())
  rows = "".join(json.dumps({"inputs": f"x{i}", "targets": f"y{i}"}) + "\n" for i in range(4))
  (tmp_path / "own.jsonl").write_text(rows)
  with caplog.at_level(logging.WARNING):
    assert train.selection(model, str(tmp_path / "own.jsonl"), data.NOTHING_HELD_OUT) is None
  assert "the last step is kept" in caplog.text
  (tmp_path / "own.validation.jsonl").write_text(rows)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    chosen = train.selection(model, str(tmp_path / "own.jsonl"), data.NOTHING_HELD_OUT)
  assert (chosen.key, chosen.mode) == ("loss", "min") and "validation loss" in caplog.text
  accuracy = train.selection(model, suite.HELD_IN_TASKS[0], data.NOTHING_HELD_OUT)
  assert (accuracy.key, accuracy.mode) == ("score", "max")


def test_train_expert_keeps_the_step_of_the_best_validation_accuracy(base, tmp_path, monkeypatch):
  """Every validation's accuracy and LoRA are recorded; the library entry holds the LoRA the official rule
  (a later result replaces the kept one when >=) picks from them."""
  seen = []
  evaluate = train.evaluator.evaluate

  def recording(name, runner, **kw):
    result = evaluate(name, runner, **kw)
    seen.append((name, kw["max_examples"], result["score"], jax.tree.map(np.asarray, runner.variables["lora"])))
    return result

  monkeypatch.setattr(train.evaluator, "evaluate", recording)
  task = suite.HELD_IN_TASKS[0]
  manifest = train.train_expert(base=base, task=task, library=str(tmp_path / "lib"), num_steps=5,
                                workdir=str(tmp_path / "w"), max_validation_examples=6)
  assert [(name, limit) for name, limit, _, _ in seen] == [(f"{task}_eval", 6)] * 4  # steps 0, 2, 4, 5
  kept = 0
  for i, (_, _, score, _) in enumerate(seen):
    kept = i if score >= seen[kept][2] else kept
  stored = lib.ExpertLibrary(str(tmp_path / "lib")).load(manifest["name"]).lora
  expected = ckpt_names.flatten(seen[kept][3])
  assert sorted(stored) == sorted(expected)
  assert all(np.array_equal(stored[k], expected[k]) for k in stored)


def test_only_process_0_writes_the_others_read_it_back(monkeypatch):
  writes = []
  assert train._written_once(lambda: writes.append(1) or "written", lambda: "read", "test 0") == "written"
  monkeypatch.setattr(distributed, "is_writer", lambda: False)
  assert train._written_once(lambda: writes.append(2) or "written", lambda: "read", "test 1") == "read"
  assert writes == [1]
