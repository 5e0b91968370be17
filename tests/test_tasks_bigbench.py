"""BIG-bench zero-shot tasks (algorithm.md §6) equal the official PHATGOOSE prompts: every shared task.json
against a derivation written from BIG-bench 1.0.0's `json_task.py` / `bbseqio` rules; hand-written prompts on a
toy task in the official layout; the official label rule; BBH release tasks; generation lengths; the CLI."""
import json
import pathlib
import random

import numpy as np
import pytest

from phatgoose_jax import cli
from phatgoose_jax import tasks
from phatgoose_jax.tasks import bigbench, sources


_PERMUTATIONS = {}


def _permute(items: list) -> list:
  """np.random.RandomState(seed=42).permutation(items); memoised by length, as a permutation of a list moves
  its items as the permutation of its indices (test_permutation_of_items_follows_indices)."""
  if len(items) not in _PERMUTATIONS:
    _PERMUTATIONS[len(items)] = np.random.RandomState(seed=42).permutation(len(items))
  return [items[i] for i in _PERMUTATIONS[len(items)]]


def test_permutation_of_items_follows_indices():
  for n in range(1, 12):
    items = sorted(f"choice {i}" for i in range(n))
    assert list(np.random.RandomState(seed=42).permutation(items)) == _permute(items)


def _formatted(data: dict, sample: dict) -> dict:
  """BIG-bench's default_format_fn (api/json_task.py), step by step on a copy of the sample."""
  sample = dict(sample)
  if "target_scores" in sample:
    if data.get("append_choices_to_input", True):
      prefix = data.get("choice_prefix", "\n  choice: ")
      permuted = _permute(sorted(list(sample["target_scores"].keys())))
      sample["input"] = sample["input"] + prefix + prefix.join(permuted)
    if "target" not in sample:
      top = max(sample["target_scores"].values())
      sample["target"] = [k for k, v in sample["target_scores"].items() if v == top][0]
  sample["input"] = data.get("example_input_prefix", "\nQ: ") + sample["input"] + data.get(
      "example_output_prefix", "\nA: ")
  if not isinstance(sample["target"], list):
    sample["target"] = [sample["target"]]
  return sample


def _derived(task_dir: pathlib.Path) -> list:
  """(prompt, choices, target) of the official "train_validation" split, derived from the rules."""
  files = sorted(task_dir.glob("*/task.json")) or [task_dir / "task.json"]
  num_subtasks = len(list(task_dir.parent.glob("*/task.json"))) if task_dir.parent.name != "bigbench" else len(files)
  train, validation = [], []
  for path in files:
    data = json.loads(path.read_text(encoding="utf-8"))
    seen, samples = set(), []
    for x in data["examples"]:
      if json.dumps(x) not in seen:
        seen.add(json.dumps(x))
        samples.append(_formatted(data, x))
    random.seed(42)
    random.shuffle(samples)
    num_validation = max(int(0.2 * len(samples)), 16 // num_subtasks)
    assert num_validation < len(samples)
    rows = [((str(data.get("task_prefix", "")) + s["input"]).strip(), [c.strip() for c in s.get("target_scores", {})],
             max([t.strip() for t in s["target"]], key=len)) for s in samples]
    train += rows[:len(rows) - num_validation]
    validation += rows[len(rows) - num_validation:]
  return [(prompt + "\nAnswer:", choices, target) for prompt, choices, target in train + validation]


LARGE = ("formal_fallacies_syllogisms_negation", "vitaminc_fact_verification")  # 69k of the 95k examples
# vitaminc (54668 examples: a task prefix and custom prefixes, no choices appended, as operators and winowhy) is
# left out for time.


def test_every_shared_task_and_small_subtask_matches_bigbench_formatting(shared_data):
  bigbench_dir = shared_data / "bigbench"
  names = sorted(p.name for p in bigbench_dir.iterdir() if p.is_dir())
  assert len(names) == 17
  names = [name for name in names if name not in LARGE]
  small = ("conceptual_combinations", "conlang_translation", "strange_stories")
  names += sorted(f"{p.parent.parent.name}/{p.parent.name}" for name in small
                  for p in (bigbench_dir / name).glob("*/task.json"))
  for name in names:
    (examples,) = tasks.get_eval_examples(f"bigbench/{name}", bigbench_dir=bigbench_dir).values()
    assert [(e["inputs"], e["choices"] or [], e["target"]) for e in examples] == [
        (p, c if e["metric"] == "accuracy" else [], t) for (p, c, t), e in zip(_derived(bigbench_dir / name),
                                                                                examples)], name


def test_real_prompts_show_prefixes_and_choices(shared_data):
  by_task = tasks.get_eval_examples("bbl_known_unknowns", bigbench_dir=shared_data / "bigbench")
  examples = by_task["bbl_known_unknowns"]
  assert len(examples) == 46
  assert examples[0]["inputs"] == ("Q: Who will be elected president of the United States 100 years from now?"
                                   "\n  choice: Unknown\n  choice: Robocop\nA:\nAnswer:")
  assert (examples[0]["choices"], examples[0]["correct"]) == (["Robocop", "Unknown"], [False, True])
  # logic_grid_puzzle sets append_choices_to_input to the STRING "false": truthy, so choices are appended.
  (grid,) = tasks.get_eval_examples("bigbench/logic_grid_puzzle", 1, bigbench_dir=shared_data / "bigbench").values()
  assert grid[0]["inputs"].endswith("\n  choice: 1\n  choice: 2\n  choice: 3\nA:\nAnswer:")


# np.random.RandomState(42).permutation(n) for n = 2..6. BIG-bench 1.0.0's default_format_fn builds a fresh
# RandomState(random_seed=42) in every call (api/json_task.py line 116; JsonTask formats each distinct example
# with it, lines 513-523, before bbseqio shuffles them into splits), so every example with n choices lists its
# sorted choices in this one order, wherever it stands in its task.
_ORDER = {2: [1, 0], 3: [0, 1, 2], 4: [1, 3, 0, 2], 5: [1, 4, 2, 0, 3], 6: [0, 1, 5, 2, 4, 3]}


def test_real_rows_append_sorted_choices_in_one_order_per_choice_count(shared_data):
  root = shared_data / "bigbench"
  seen = set()
  for task in ("hindu_knowledge", "logic_grid_puzzle", "strange_stories/multiple_choice",
               "conceptual_combinations/emergent_properties", "bbq_lite_json/disability_status_ambig"):
    data = json.loads((root / task / "task.json").read_text(encoding="utf-8"))
    choice_prefix = data.get("choice_prefix", "\n  choice: ")
    output_prefix = data.get("example_output_prefix", "\nA: ").rstrip()
    for row in bigbench.export_examples(task, root):
      assert row["inputs"].endswith(output_prefix), task
      appended = row["inputs"][:-len(output_prefix)].split(choice_prefix)[1:]
      n = len(row["multiple_choice_targets"])
      assert len(appended) == n and sorted(c.strip() for c in appended) == sorted(row["multiple_choice_targets"])
      assert appended == [sorted(appended)[i] for i in _ORDER[n]], (task, appended)
      seen.add(n)
  assert seen == set(_ORDER)


def test_real_rows_pin_the_export_choice_order(shared_data):
  root = shared_data / "bigbench"
  # logic_grid_puzzle: choices "1".."n" (n = 2..5); every row's prompt ends in the one order for its n.
  rows = bigbench.export_examples("logic_grid_puzzle", root)
  tails = {}
  for row in rows:
    tail = row["inputs"][row["inputs"].index("\n  choice: "):]
    tails[tail] = tails.get(tail, 0) + 1
  assert tails == {"\n  choice: 2\n  choice: 1\nA:": 212, "\n  choice: 1\n  choice: 2\n  choice: 3\nA:": 258,
                   "\n  choice: 2\n  choice: 4\n  choice: 1\n  choice: 3\nA:": 258,
                   "\n  choice: 2\n  choice: 5\n  choice: 3\n  choice: 1\n  choice: 4\nA:": 272}
  # The prompt's order is not the order of `multiple_choice_targets` (task.json's), which the official code scores.
  (row, *_) = bigbench.export_examples("hindu_knowledge", root)
  assert row["inputs"] == ("Q: The Hindu deity Hanuman is depicted as which animal?\n  choice: Elephant\n"
                           "  choice: Monkey\n  choice: Boar\n  choice: Fish\nA:")
  assert (row["multiple_choice_targets"], row["targets"]) == (["Elephant", "Boar", "Monkey", "Fish"], ["Monkey"])
  # Choices are sorted and appended unstripped ("The friend "); the export strips only its targets.
  row = bigbench.export_examples("bbq_lite_json/disability_status_ambig", root)[225]
  assert row["inputs"].endswith("Who talked about their emotions?\n  choice: Cannot answer\n  choice: The friend \n"
                                "  choice: The person who has autism\nA:")
  assert row["multiple_choice_targets"] == ["The friend", "Cannot answer", "The person who has autism"]


def test_large_task_first_and_last_prompts(shared_data):
  # formal_fallacies_syllogisms_negation: 14200 examples, choices not appended, default prefixes.
  task_dir = shared_data / "bigbench" / "formal_fallacies_syllogisms_negation"
  data = json.loads((task_dir / "task.json").read_text(encoding="utf-8"))
  (examples,) = tasks.get_eval_examples("bbh_formal_fallacies", bigbench_dir=task_dir.parent).values()
  order = list(range(len(data["examples"])))
  random.seed(42)
  random.shuffle(order)
  num_train = len(order) - max(int(0.2 * len(order)), 16)
  for position in (0, num_train - 1, num_train, len(order) - 1):
    sample = _formatted(data, data["examples"][order[position]])
    assert examples[position]["inputs"] == sample["input"].strip() + "\nAnswer:"
    assert examples[position]["target"] == sample["target"][0]
  assert examples[0]["inputs"].startswith("Q: ") and examples[0]["inputs"].endswith("\nA:\nAnswer:")
  assert examples[0]["choices"] == ["valid", "invalid"]


def test_strategyqa_label_is_the_answer_its_explanation_starts_with(shared_data):
  examples = bigbench.read_examples("strategyqa", shared_data / "bigbench")
  assert len(examples) == 2289  # one exact duplicate dropped
  for e in examples:
    (answer,) = [c for c, ok in zip(e["choices"], e["correct"]) if ok]
    assert e["target"].startswith(answer + ".")


def _write(path: pathlib.Path, data: dict):
  path.mkdir(parents=True, exist_ok=True)
  (path / "task.json").write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture
def toy_bigbench(tmp_path) -> pathlib.Path:
  """`toy` (a multiple-choice subtask with a task prefix and a duplicate, a generative one with its own
  prefixes), `calc` (string "false" choice appending, custom prefixes, explanatory target), `plain`
  (no choices appended)."""
  root = tmp_path / "benchmark_tasks"
  _write(root / "toy", {"name": "toy", "examples": []})
  two_plus_two = {"input": "2+2?", "target_scores": {"5": 0, "4": 1, "3": 0}}
  _write(root / "toy" / "a_choice", {"task_prefix": "Pick one.\n", "examples": [
      two_plus_two, {"input": "Sky?", "target_scores": {"green": 0, "blue": 1}}, two_plus_two]})
  _write(root / "toy" / "b_gen", {"example_input_prefix": "In: ", "example_output_prefix": " Out: ", "examples": [
      {"input": "Say hi", "target": ["hi", "hello"]}]})
  _write(root / "calc", {"task_prefix": "  Calc:", "append_choices_to_input": "false", "choice_prefix": " | ",
                         "example_input_prefix": "", "example_output_prefix": " =", "examples": [
                             {"input": "1+1", "target_scores": {"2": 1, "3": 0, "4": 0, "5": 0},
                              "target": "2, since one and one make two"}]})
  _write(root / "plain", {"append_choices_to_input": False, "examples": [
      {"input": "Sky?", "target_scores": {"blue": 1, "green": 0}}]})
  return root


def _inspect_json(capfd, *args) -> dict:
  assert cli.main(["tasks", "inspect", *args, "--json"]) == 0
  out = capfd.readouterr().out
  assert out.count("\n") == 1
  return json.loads(out)


def test_cli_inspect_shows_the_official_prompts(toy_bigbench, capfd):
  # Shuffled with random.seed(42) ([1, 0] for two examples); the duplicate is dropped; choices sorted then
  # permuted by RandomState(42) ([1, 0] for two, identity for three); the export strips the prompt.
  report = _inspect_json(capfd, "bigbench/toy", "--bigbench_dir", str(toy_bigbench), "--n", "5")
  assert report == {"task": "bigbench/toy", "num_examples": 3, "examples": [
      {"inputs": "Pick one.\n\nQ: Sky?\n  choice: green\n  choice: blue\nA:\nAnswer:", "choices": ["green", "blue"],
       "target": "blue"},
      {"inputs": "Pick one.\n\nQ: 2+2?\n  choice: 3\n  choice: 4\n  choice: 5\nA:\nAnswer:",
       "choices": ["5", "4", "3"], "target": "4"},
      {"inputs": "In: Say hi Out:\nAnswer:", "choices": [], "target": "hello"}]}
  # Four choices permute as [1, 3, 0, 2].
  report = _inspect_json(capfd, "bigbench/calc", "--bigbench_dir", str(toy_bigbench))
  assert report["examples"] == [{"inputs": "Calc:1+1 | 3 | 5 | 2 | 4 =\nAnswer:", "choices": ["2", "3", "4", "5"],
                                 "target": "2, since one and one make two"}]
  report = _inspect_json(capfd, "bigbench/plain", "--bigbench_dir", str(toy_bigbench))
  assert report["examples"][0]["inputs"] == "Q: Sky?\nA:\nAnswer:"


def test_labels_references_and_metrics(toy_bigbench):
  by_task = tasks.get_eval_examples("bigbench/toy", bigbench_dir=toy_bigbench)
  assert [(e["correct"], e["references"], e["metric"]) for e in by_task["bigbench:toy"]] == [
      ([False, True], ["blue"], "accuracy"), ([False, True, False], ["4"], "accuracy"),
      ([], ["hi", "hello"], "multi_answer_exact_match")]
  (calc,) = tasks.get_eval_examples("bigbench/calc", bigbench_dir=toy_bigbench).values()
  assert calc[0]["correct"] == [True, False, False, False]


def test_official_label_rule_on_token_ids():
  assert bigbench.find_label([5, 1], []) == -1
  assert bigbench.find_label([5, 1], [[7, 1], [5, 1], [5, 9, 1]]) == 1
  # Equal positions are counted, not a common prefix.
  assert bigbench.find_label([3, 4, 1], [[9, 4, 1], [3, 8, 8, 8]]) == 0
  # Ties go to the shorter choice, then to the later index.
  assert bigbench.find_label([5, 9, 9, 1], [[5, 2, 1], [5, 1]]) == 1
  assert bigbench.find_label([5, 1], [[5, 1], [5, 1]]) == 1
  assert bigbench.text_label("Yes. Because", ["No", "Yes"]) == 1
  assert bigbench.text_label("ab", ["abc", "ab"]) == 1


def test_official_metrics_multiple_answers_and_generation(shared_data):
  (novel,) = tasks.get_eval_examples("bbl_novel_concepts", bigbench_dir=shared_data / "bigbench").values()
  raw = json.loads((shared_data / "bigbench" / "novel_concepts" / "task.json").read_text(encoding="utf-8"))
  scores = {ex["input"]: ex["target_scores"] for ex in raw["examples"]}
  for e in novel:  # accuracy_multiple_ans: every choice of score 1 is correct
    question = e["inputs"].split("\n")[1]
    assert e["correct"] == [scores[question][c] == 1 for c in e["choices"]]
  (operators,) = tasks.get_eval_examples("bbl_operators", 3, bigbench_dir=shared_data / "bigbench").values()
  assert all(e["metric"] == "exact_match" and e["choices"] == [] for e in operators)
  (conlang,) = tasks.get_eval_examples("bbl_conlang_translation", 3, bigbench_dir=shared_data / "bigbench").values()
  assert all(e["metric"] == "rouge_l" for e in conlang)


def test_generation_lengths_follow_the_gin_files():
  lengths = {"bbl_conlang_translation": 64, "bbl_linguistics_puzzles": 128, "bbl_operators": 4,
             "bbl_repeat_copy_logic": 64, "bbh_multistep_arithmetic_two": 8, "bbh_object_counting": 8,
             "bbh_word_sorting": 128, "bigbench/operators": 4, "bigbench/conlang_translation/adna_from": 64,
             "bigbench/some_other_task": 20, "bbh_navigate": 20, "t0_rte": 20, "p3_ropes_eval": 16,
             "p3_xsum_eval": 256, "p3_ag_news_eval": 20}
  assert {name: sources.generation_length(name) for name in lengths} == lengths
  generative = {f"{p}_{n}" for p, table in (("bbl", sources.BIGBENCH_LITE), ("bbh", sources.BIGBENCH_HARD))
                for n, s in table.items() if s.metric in sources.GENERATIVE_METRICS}
  assert generative == {name for name, n in lengths.items() if n != 20 and name.startswith(("bbl_", "bbh_"))}


@pytest.fixture
def bbh_release(tmp_path) -> pathlib.Path:
  root = tmp_path / "bbh"
  root.mkdir()
  files = {"boolean_expressions": [("not ( True ) and ( True ) is", "False"), ("True and not not True is", "True")],
           "web_of_lies": [("Question: Fidel lies. Does Fidel tell the truth?", "No")],
           "multistep_arithmetic_two": [("((-1 + 2) * 3) =", "3")]}
  for name, rows in files.items():
    data = {"canary": "x", "examples": [{"input": i, "target": t} for i, t in rows]}
    (root / f"{name}.json").write_text(json.dumps(data), encoding="utf-8")
  return root


def test_bbh_release_tasks_score_their_fixed_answer_set(bbh_release):
  def examples(name):
    return tasks.get_eval_examples(name, bbh_dir=bbh_release)[name]
  assert examples("bbh_boolean_expressions") == [
      dict(inputs="not ( True ) and ( True ) is\nAnswer:", choices=["True", "False"], correct=[False, True],
           target="False", references=["False"], metric="accuracy"),
      dict(inputs="True and not not True is\nAnswer:", choices=["True", "False"], correct=[True, False],
           target="True", references=["True"], metric="accuracy")]
  assert [(e["choices"], e["correct"]) for e in examples("bbh_web_of_lies")] == [(["Yes", "No"], [False, True])]
  assert examples("bbh_multistep_arithmetic_two") == [
      dict(inputs="((-1 + 2) * 3) =\nAnswer:", choices=[], correct=[], target="3", references=["3"],
           metric="exact_match")]


def test_missing_bbh_release_names_the_file(tmp_path):
  with pytest.raises(sources.MissingDataError, match="BIG-Bench Hard task web_of_lies.*suzgunmirac"):
    tasks.get_eval_examples("bbh_web_of_lies", bbh_dir=tmp_path)


def test_cli_inspect_missing_task_is_a_usage_error(tmp_path, capfd):
  assert cli.main(["tasks", "inspect", "bigbench/nope", "--bigbench_dir", str(tmp_path), "--json"]) == 2
  captured = capfd.readouterr()
  assert captured.out == ""
  assert "missing data: BIG-bench task nope" in captured.err and str(tmp_path / "nope") in captured.err


def test_seqio_dataset_and_rank_classification_rows(toy_bigbench):
  task = tasks.get_task_or_mixture("bigbench/toy")
  with sources.using_dirs(bigbench_dir=toy_bigbench):
    dataset = task.source.get_dataset("validation", shuffle=False)
    served = [(r["inputs"].decode(), [c.decode() for c in r["choices"]], r["target"].decode(), int(r["idx"]))
              for r in dataset.as_numpy_iterator()]
    rows = list(task.preprocess_precache(dataset).as_numpy_iterator())
    python_view = tasks.task_examples(task)
  assert served == [(e["inputs"], e["choices"], e["target"], i) for i, e in enumerate(python_view)]
  assert [(int(r["idx"]), int(r["choice_idx"]), r["targets"].decode(), bool(r["is_correct"])) for r in rows] == [
      (0, 0, "green", False), (0, 1, "blue", True), (1, 0, "5", False), (1, 1, "4", True), (1, 2, "3", False),
      (2, 0, "hello", True)]
