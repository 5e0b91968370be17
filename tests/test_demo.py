"""`phatgoose demo --smoke`: the demo's whole code path at tiny size, its outputs, held-out guard, determinism;
the two suites' data."""
import json
import os

import gin
import numpy as np
import pytest

from phatgoose_jax import data, library, main, train
from phatgoose_jax.cli import main as cli_main
from phatgoose_jax.demo import diagnostics, run, suite, suite_tokens


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
  """The smoke demo twice with the same seed: once through the CLI (two training stages at a time, the
  default), once through `run_demo` one stage at a time."""
  root = tmp_path_factory.mktemp("demo")
  assert cli_main(["demo", "--smoke", "--seed", "3", "--workdir", str(root / "a")]) == 0
  main.parse(["demo_smoke.gin"], [])
  run.run_demo(workdir=str(root / "b"), seed=3, concurrency=1)
  yield root
  gin.clear_config()


def _results(path):
  with open(path) as f:
    return json.load(f)


def test_results_have_every_method_in_unit_range(two_runs):
  results = _results(two_runs / "a" / "results.json")
  assert results["suite"] == "tokens" and results["seed"] == 3
  assert results["num_examples"] == {t: 8 for t in suite_tokens.HELD_OUT_TASKS}
  assert set(results["methods"]) == {"base", "best_individual", "merged", "uniform", "average_activation", "arrow",
                                     "spectr", "retrieval", "phatgoose", "multitask", "oracle"}
  for method, scores in results["methods"].items():
    assert set(scores["heldout"]) == set(suite_tokens.HELD_OUT_TASKS)
    assert set(scores["heldin"]) == set(suite_tokens.HELD_IN_EVAL_TASKS)
    for value in list(scores["heldout"].values()) + [scores["heldout_avg"], scores["heldin_avg"]]:
      assert 0.0 <= value <= 1.0
    low, high = scores["heldout_avg_ci"]
    assert low <= scores["heldout_avg"] <= high
    if method in run.PER_TOKEN_METHODS:
      assert 0.0 <= scores["routing_accuracy"] <= 1.0 and scores["routing_chance"] == 2 / 6
    else:
      assert scores["routing_accuracy"] is None and scores["routing_chance"] is None
  assert results["seconds"] > 0


def test_figures_are_written(two_runs):
  for name in ("routing.png", "routing_heldout.png", "scores.png"):
    assert os.path.getsize(two_runs / "a" / name) > 1000


def test_same_seed_gives_the_same_results(two_runs):
  a, b = _results(two_runs / "a" / "results.json"), _results(two_runs / "b" / "results.json")
  a.pop("seconds"), b.pop("seconds")
  assert a == b


def test_concurrent_training_stores_the_same_weights(two_runs):
  for path in ("library", "multitask"):
    a, b = library.ExpertLibrary(str(two_runs / "a" / path)), library.ExpertLibrary(str(two_runs / "b" / path))
    assert a.names() == b.names()
    for name in a.names():
      x, y = a.load(name), b.load(name)
      for part in ("lora", "gates"):
        assert getattr(x, part).keys() == getattr(y, part).keys()
        assert all(np.array_equal(v, getattr(y, part)[k]) for k, v in getattr(x, part).items()), (path, name, part)


def test_library_holds_one_gated_expert_per_held_in_task(two_runs):
  lib = library.ExpertLibrary(str(two_runs / "a" / "library"))
  assert lib.names() == list(suite_tokens.HELD_IN_TASKS)  # the suite's pool order, whichever finished first
  assert all(m["gate"] and m["dataset"] in suite_tokens.HELD_IN_TASKS for m in lib.list())


def test_held_out_data_never_reaches_expert_building(two_runs):
  held_out = data.HeldOut(frozenset(suite_tokens.HELD_OUT_TASKS), suite_tokens.is_held_out)
  with pytest.raises(data.HeldOutError):
    train.train_expert(base=str(two_runs / "a" / "base"), task=suite_tokens.HELD_OUT_TASKS[0],
                       library=str(two_runs / "a" / "library"), workdir=str(two_runs / "leak"), num_steps=1,
                       held_out=held_out)
  sizes = suite.SuiteSizes(train=20, held_out=2)
  for task in (suite_tokens.REORDER_TASKS[0], suite_tokens.MIX_TASKS[0]):
    with pytest.raises(data.HeldOutError):
      held_out.check_texts([e["inputs"] for e in suite_tokens.eval_examples(task, 0, sizes)])
  held_out.check_tasks(list(suite_tokens.HELD_IN_TASKS))
  held_out.check_texts([e["inputs"] for e in suite_tokens.train_examples(suite_tokens.HELD_IN_TASKS[0], "train", 0, sizes)])


def test_unknown_suite_is_refused(tmp_path):
  with pytest.raises(ValueError, match="unknown demo suite 'words'"):
    run.run_demo(workdir=str(tmp_path), suite_name="words")


def test_token_suite_tasks_are_told_apart_by_their_alphabets():
  sizes = suite.SuiteSizes(train=50, validation=20, held_out=20)
  for task, alphabet in zip(suite_tokens.HELD_IN_TASKS, suite_tokens.ALPHABETS.values()):
    examples = suite_tokens.train_examples(task, "train", 0, sizes)
    chars = {c for e in examples for c in e["inputs"][1:-1] + e["targets"] if c != " "}
    assert chars <= set(alphabet) and {e["inputs"][0] + e["inputs"][-1] for e in examples} == {"[]"}
    assert not any(suite_tokens.is_held_out(e["inputs"]) for e in examples)
  for task in suite_tokens.HELD_OUT_TASKS:
    for example in suite_tokens.eval_examples(task, 0, sizes):
      assert suite_tokens.is_held_out(example["inputs"])
      assert len(set(example["choices"])) == 5 and example["correct"] == [True] + [False] * 4
  for task, (x, y) in zip(suite_tokens.MIX_TASKS, suite_tokens.MIX_PAIRS):
    example = suite_tokens.eval_examples(task, 0, sizes)[0]
    assert sorted(suite_tokens.alphabets_in(example["inputs"])) == sorted([x, y])


def test_token_suite_ciphers_are_distinct_derangements_fixed_by_the_seed():
  maps = suite_tokens.ciphers(0)
  assert maps == suite_tokens.ciphers(0) and maps != suite_tokens.ciphers(1)
  for name, (secret, *decoys) in maps.items():
    assert all(sorted(m) == sorted(m.values()) == sorted(suite_tokens.ALPHABETS[name]) for m in [secret] + decoys)
    assert all(c != secret[c] for c in secret) and secret not in decoys and decoys[0] != decoys[1]
  example = suite_tokens.eval_examples(suite_tokens.REORDER_TASKS[0], 0, suite.SuiteSizes(held_out=1))[0]
  words = example["inputs"][1:-1].split()
  assert example["target"] == " ".join("".join(maps["digits"][0][c] for c in w) for w in words[::-1])


def test_intervals_match_their_formulas():
  low, high = diagnostics.wilson_interval(0.5, 100)
  assert abs(low - 0.4038) < 1e-3 and abs(high - 0.5962) < 1e-3
  assert diagnostics.wilson_interval(0.0, 10)[0] == 0.0
  low, high = diagnostics.mean_interval({"a": 0.5, "b": 0.5}, {"a": 100, "b": 100})
  m = 100 + 1.96 ** 2  # Agresti-Coull: 50 + z^2/2 successes in m trials, q = 1/2
  assert abs(high - 0.5 - 1.96 * (2 * 0.25 / m) ** 0.5 / 2) < 1e-9 and abs(0.5 - low - (high - 0.5)) < 1e-12
  low, high = diagnostics.mean_interval({"a": 0.0, "b": 1.0}, {"a": 100, "b": 100})  # all wrong / all right
  q = 1.96 ** 2 / 2 / m
  assert low < 0.5 < high and abs(high - 0.5 - 1.96 * (2 * q * (1 - q) / m) ** 0.5 / 2) < 1e-9


def test_keyword_suite_held_out_examples_mix_two_skills_with_distinct_candidates():
  for task, pair in zip(suite.HELD_OUT_TASKS, suite.HELD_OUT_PAIRS):
    for example in suite.eval_examples(task, 0, suite.SuiteSizes(held_out=20)):
      assert sorted(suite.skills_in(example["inputs"])) == sorted(pair)
      assert len(set(example["choices"])) == 5 and example["correct"] == [True] + [False] * 4
  for task in suite.HELD_IN_TASKS:
    assert not any(suite.is_held_out(e["inputs"]) for e in suite.train_examples(task, "train", 0,
                                                                                suite.SuiteSizes(train=50)))
