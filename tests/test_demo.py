"""`phatgoose demo --smoke`: the demo's whole code path at tiny size, its outputs, held-out guard, determinism."""
import json
import os
import tempfile

import gin
import pytest

from phatgoose_jax import main, pipeline
from phatgoose_jax.cli import main as cli_main
from phatgoose_jax.demo import run, suite

# Set while tests are collected, before anything compiles: the smoke demo's runs share compiled programs.
run.enable_compilation_cache(os.path.join(tempfile.gettempdir(), "phatgoose_jax_test_cache"))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
  """The smoke demo twice with the same seed: once through the CLI, once through `run_demo`."""
  root = tmp_path_factory.mktemp("demo")
  assert cli_main(["demo", "--smoke", "--seed", "3", "--workdir", str(root / "a")]) == 0
  main.parse(["demo_smoke.gin"], [])
  run.run_demo(workdir=str(root / "b"), seed=3)
  yield root
  gin.clear_config()


def _results(path):
  with open(path) as f:
    return json.load(f)


def test_results_have_every_method_in_unit_range(two_runs):
  results = _results(two_runs / "a" / "results.json")
  assert set(results["methods"]) == {"base", "best_individual", "merged", "uniform", "average_activation", "arrow",
                                     "retrieval", "phatgoose", "multitask", "oracle"}
  for scores in results["methods"].values():
    assert set(scores["heldout"]) == set(suite.HELD_OUT_TASKS)
    assert all(0.0 <= v <= 1.0 for v in scores["heldout"].values())
    assert 0.0 <= scores["heldout_avg"] <= 1.0
  assert results["seconds"] > 0


def test_routing_figure_is_written(two_runs):
  assert os.path.getsize(two_runs / "a" / "routing.png") > 1000


def test_same_seed_gives_the_same_results(two_runs):
  a, b = _results(two_runs / "a" / "results.json"), _results(two_runs / "b" / "results.json")
  a.pop("seconds"), b.pop("seconds")
  assert a == b


def test_library_holds_one_gated_expert_per_held_in_skill(two_runs):
  from phatgoose_jax import library  # pylint: disable=import-outside-toplevel
  lib = library.ExpertLibrary(str(two_runs / "a" / "library"))
  assert lib.names() == sorted(suite.HELD_IN_TASKS)
  assert all(m["gate"] and m["dataset"] in suite.HELD_IN_TASKS for m in lib.list())


def test_held_out_data_never_reaches_expert_building(two_runs):
  with pytest.raises(pipeline.HeldOutError):
    pipeline.train_expert(base=str(two_runs / "a" / "base"), task=suite.HELD_OUT_TASKS[0],
                          library=str(two_runs / "a" / "library"), workdir=str(two_runs / "leak"), num_steps=1)
  held_out = suite.eval_examples(suite.HELD_OUT_TASKS[1], 0, suite.SuiteSizes(held_out=2))
  with pytest.raises(pipeline.HeldOutError):
    pipeline.check_held_in([], held_out)
  pipeline.check_held_in(list(suite.HELD_IN_TASKS),
                         suite.train_examples(suite.HELD_IN_TASKS[0], "train", 0, suite.SuiteSizes(train=20)))


def test_suite_held_out_examples_mix_two_skills_with_distinct_candidates():
  for task, pair in zip(suite.HELD_OUT_TASKS, suite.HELD_OUT_PAIRS):
    for example in suite.eval_examples(task, 0, suite.SuiteSizes(held_out=20)):
      assert sorted(suite.skills_in(example["inputs"])) == sorted(pair)
      assert len(set(example["choices"])) == 5 and example["correct"] == [True] + [False] * 4
  for task in suite.HELD_IN_TASKS:
    assert not any(suite.is_held_out(e["inputs"]) for e in suite.train_examples(task, "train", 0,
                                                                                suite.SuiteSizes(train=50)))
