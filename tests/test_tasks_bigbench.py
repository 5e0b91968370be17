"""BIG-bench zero-shot tasks (algorithm.md §6): every shared task loads through seqio and matches its JSON; the
`phatgoose tasks inspect --json` output on a task directory built here in the official layout."""
import json
import pathlib

import pytest

from phatgoose_jax import cli
from phatgoose_jax import tasks


def _expected(task_dir: pathlib.Path) -> list:
  """(inputs, choices, target) read independently from the task's JSON files."""
  subtasks = sorted(task_dir.glob("*/task.json"))
  expected = []
  for path in subtasks or [task_dir / "task.json"]:
    data = json.loads(path.read_text(encoding="utf-8"))
    for ex in data["examples"]:
      inputs = data.get("task_prefix", "") + ex["input"] + "\nAnswer:"
      if "target_scores" in ex:
        top = max(ex["target_scores"].values())
        choices = list(ex["target_scores"])
        expected.append((inputs, choices, next(c for c in choices if ex["target_scores"][c] == top)))
      else:
        target = ex["target"][0] if isinstance(ex["target"], list) else ex["target"]
        expected.append((inputs, [], target))
  return expected


def _names(bigbench: pathlib.Path) -> list:
  tasks_ = sorted(p.name for p in bigbench.iterdir() if p.is_dir())
  subtasks = sorted(f"{p.parent.parent.name}/{p.parent.name}" for p in bigbench.glob("*/*/task.json"))
  return tasks_ + subtasks


def test_every_shared_task_and_subtask_matches_its_json(shared_data):
  bigbench = shared_data / "bigbench"
  names = _names(bigbench)
  assert len([n for n in names if "/" not in n]) == 17
  for name in names:
    (examples,) = tasks.get_eval_examples(f"bigbench/{name}", bigbench_dir=bigbench).values()
    got = [(e["inputs"], e["choices"], e["target"]) for e in examples]
    assert got == _expected(bigbench / name), name


def test_registered_lite_task_reads_the_bigbench_dir(shared_data):
  (examples,) = tasks.get_eval_examples("bbl_known_unknowns", bigbench_dir=shared_data / "bigbench").values()
  assert len(examples) == 46
  assert all(e["metric"] == "accuracy" and sum(e["correct"]) >= 1 for e in examples)


def _write(path: pathlib.Path, data: dict):
  path.mkdir(parents=True, exist_ok=True)
  (path / "task.json").write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture
def toy_bigbench(tmp_path) -> pathlib.Path:
  """A task `toy` with a multiple-choice subtask (task prefix) and a generative one, plus a flat task."""
  root = tmp_path / "benchmark_tasks"
  _write(root / "toy", {"name": "toy", "examples": []})
  _write(root / "toy" / "a_choice", {"task_prefix": "Pick one.\n", "examples": [
      {"input": "2+2?", "target_scores": {"3": 0, "4": 1, "5": 0}},
      {"input": "Sky?", "target_scores": {"blue": 1, "green": 0}}]})
  _write(root / "toy" / "b_gen", {"preferred_score": "exact_str_match", "examples": [
      {"input": "Say hi", "target": ["hi", "hello"]}]})
  _write(root / "flat", {"preferred_score": "rougeLsum", "examples": [{"input": "Copy: x y", "target": "x y"}]})
  return root


def _inspect_json(capfd, *args) -> dict:
  assert cli.main(["tasks", "inspect", *args, "--json"]) == 0
  out = capfd.readouterr().out
  assert out.count("\n") == 1
  return json.loads(out)


def test_cli_inspect_json_on_task_with_subtasks(toy_bigbench, capfd):
  report = _inspect_json(capfd, "bigbench/toy", "--bigbench_dir", str(toy_bigbench), "--n", "5")
  assert report == {"task": "bigbench/toy", "num_examples": 3, "examples": [
      {"inputs": "Pick one.\n2+2?\nAnswer:", "choices": ["3", "4", "5"], "target": "4"},
      {"inputs": "Pick one.\nSky?\nAnswer:", "choices": ["blue", "green"], "target": "blue"},
      {"inputs": "Say hi\nAnswer:", "choices": [], "target": "hi"}]}


def test_cli_inspect_json_on_subtask_and_flat_task(toy_bigbench, capfd):
  report = _inspect_json(capfd, "bigbench/toy/b_gen", "--bigbench_dir", str(toy_bigbench))
  assert report == {"task": "bigbench/toy/b_gen", "num_examples": 1,
                    "examples": [{"inputs": "Say hi\nAnswer:", "choices": [], "target": "hi"}]}
  report = _inspect_json(capfd, "bigbench/flat", "--bigbench_dir", str(toy_bigbench), "--n", "0")
  assert report == {"task": "bigbench/flat", "num_examples": 1, "examples": []}


def test_generative_metrics_follow_the_task(toy_bigbench):
  by_task = tasks.get_eval_examples("bigbench/toy", bigbench_dir=toy_bigbench)
  assert [e["metric"] for e in by_task["bigbench:toy"]] == ["accuracy", "accuracy", "multi_answer_exact_match"]
  (flat,) = tasks.get_eval_examples("bigbench/flat", bigbench_dir=toy_bigbench).values()
  assert flat[0]["metric"] == "rouge_l"


def test_cli_inspect_missing_task_is_a_usage_error(tmp_path, capfd):
  assert cli.main(["tasks", "inspect", "bigbench/nope", "--bigbench_dir", str(tmp_path), "--json"]) == 2
  captured = capfd.readouterr()
  assert captured.out == ""
  assert "missing data: BIG-bench task nope" in captured.err and str(tmp_path / "nope") in captured.err


def test_seqio_dataset_and_rank_classification_rows(toy_bigbench):
  from phatgoose_jax.tasks import sources
  task = tasks.get_task_or_mixture("bigbench/toy")
  with sources.using_dirs(bigbench_dir=toy_bigbench):
    dataset = task.source.get_dataset("validation", shuffle=False)
    served = [(r["inputs"].decode(), [c.decode() for c in r["choices"]], r["target"].decode(), int(r["idx"]))
              for r in dataset.as_numpy_iterator()]
    rows = list(task.preprocess_precache(dataset).as_numpy_iterator())
    python_view = tasks.task_examples(task)
  assert served == [(e["inputs"], e["choices"], e["target"], i) for i, e in enumerate(python_view)]
  assert [(int(r["idx"]), int(r["choice_idx"]), r["targets"].decode(), bool(r["is_correct"])) for r in rows] == [
      (0, 0, "3", False), (0, 1, "4", True), (0, 2, "5", False),
      (1, 0, "blue", True), (1, 1, "green", False), (2, 0, "hi", True)]
