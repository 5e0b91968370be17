"""FLAN pool (algorithm.md §6): the official seeded 90/10 train / validation split (no training row in
validation), the 500,000-row training cap, the pinned 166 experts with their NIv2 categories, checkpoint
selection on the validation split by ROUGE-L of greedy generations of the official lengths (algorithm.md §2),
and the 43 P3-collection experts training and validating on their P3 datasets as the P3 pool does."""
import json

import numpy as np
import pytest
import seqio

from phatgoose_jax import data, tasks
from phatgoose_jax.evaluation import evaluator
from phatgoose_jax.tasks import flan, p3, sources
from text_runner import TextRunner

P3_EXPERTS = [name for name, collection, _ in flan.FLAN_EXPERTS if collection == "P3"]
AG_NEWS_ROWS = [{"text": f"Story {i} about {topic}.", "label": i % 4}
                for i, topic in enumerate(["a vote", "a match", "a merger", "a rocket", "a summit", "a final"])]
RACE_ROWS = [{"example_id": f"high{i}.txt", "article": f"Tom had {i} apples and ate one.",
              "question": "How many apples are left?", "options": [str(i - 1), str(i), str(i + 1), "none"],
              "answer": "A"} for i in range(1, 4)]
WEB_QUESTIONS_ROWS = [{"url": "u", "question": "what is the capital of france?", "answers": ["Paris", "Paris, FR"]},
                      {"url": "u", "question": "who wrote hamlet?", "answers": ["William Shakespeare"]}]


def _write_expert(path, num_zero_shot: int):
  rows = []
  for i in range(num_zero_shot):
    rows.append({"inputs": f"question {i}", "targets": f"answer {i}", "_task_name": "t",
                 "_template_type": "zs_opt" if i % 2 else "zs_noopt"})
    rows.append({"inputs": f"few-shot {i}", "targets": "x", "_task_name": "t", "_template_type": "fs_opt"})
  rows.append({"inputs": "  ", "targets": "empty input", "_task_name": "t", "_template_type": "zs_opt"})
  rows.append({"inputs": "empty target", "targets": "", "task_name": "t", "template_type": "zs_noopt"})
  path.write_text("\n".join(map(json.dumps, rows)), encoding="utf-8")


def _official(num_rows: int) -> tuple:
  """FlanDataset.process_data (src/data/flat.py lines 262-273): (validation, train) row indices."""
  selected = np.random.RandomState(1234).choice(num_rows, size=num_rows, replace=False)
  num_eval = min(int(num_rows * 0.1), 10_000)
  return selected[:num_eval].tolist(), selected[num_eval:].tolist()


def test_validation_is_the_official_held_out_tenth(tmp_path):
  path = tmp_path / "Niv2zsMisc.jsonl"
  _write_expert(path, 35)
  validation, train = _official(35)
  assert len(validation) == 3 and not set(validation) & set(train)
  expected = lambda indices: [{"inputs": f"question {i}", "targets": f"answer {i}"} for i in indices]
  assert flan.split_examples(path, "validation") == expected(validation)
  assert flan.split_examples(path, "train") == expected(train)
  with pytest.raises(ValueError, match="splits 'train' and 'validation', not 'test'"):
    flan.split_examples(path, "test")


def test_registered_validation_split_holds_no_training_row(tmp_path):
  (tmp_path / "flan").mkdir()
  _write_expert(tmp_path / "flan" / "Niv2zsMisc.jsonl", 35)
  with pytest.raises(ValueError, match="166 experts"):
    flan.register_pool(tmp_path / "flan")
  task = seqio.get_mixture_or_task("flan_Niv2zsMisc")
  served = {split: [r["inputs"].decode() for r in task.source.get_dataset(split, shuffle=False).as_numpy_iterator()]
            for split in ("train", "validation")}
  assert (len(served["train"]), len(served["validation"])) == (32, 3)
  assert not set(served["train"]) & set(served["validation"])


def test_training_rows_are_capped_by_a_seeded_sample(tmp_path, monkeypatch):
  path = tmp_path / "Flanv2zsBoolq.jsonl"
  _write_expert(path, 40)
  monkeypatch.setattr(flan, "MAX_TRAIN_ROWS", 6)
  _, train = _official(40)
  capped = [train[i] for i in np.random.default_rng(42).choice(len(train), size=6, replace=False)]
  assert flan.split_examples(path, "train") == [{"inputs": f"question {i}", "targets": f"answer {i}"}
                                                for i in capped]


def test_pinned_experts_follow_the_official_pool():
  names = [name for name, _, _ in flan.FLAN_EXPERTS]
  assert len(names) == len(set(names)) == 166
  collections = [collection for _, collection, _ in flan.FLAN_EXPERTS]
  assert collections == ["P3"] * 36 + ["Flan2021"] * 36 + ["NIV2"] * 75 + ["P3"] * 7 + ["Dialog"] * 4 + [
      "Flan2021"] * 8
  # The first 36 are the P3 pool, in the same order, on the same datasets.
  assert [path for _, _, path in flan.FLAN_EXPERTS[:36]] == ["/".join(filter(None, s.hf)) for s in sources.P3_HELD_IN]
  held_out_in_pool = {path for _, collection, path in flan.FLAN_EXPERTS if collection == "P3"}
  assert {"super_glue/wsc.fixed", "super_glue/copa", "hellaswag", "super_glue/wic"} <= held_out_in_pool
  assert len(set(flan.NIV2_CATEGORIES.values())) == 75
  assert flan.NIV2_CATEGORIES["Niv2zsFillintheblank"] == "Fill in The Blank"
  assert flan.NIV2_CATEGORIES["Niv2zsMisc"] == "Misc."


def _register_one(flan_dir) -> None:
  """Registers the one expert file of `flan_dir` (its tasks are registered before the pool size is refused)."""
  with pytest.raises(ValueError, match="166 experts"):
    flan.register_pool(flan_dir)


def test_validation_task_serves_the_official_validation_rows_scored_by_rouge_l(tmp_path):
  _write_expert(tmp_path / "Flanv2zsBoolq.jsonl", 35)
  _register_one(tmp_path)
  validation, _ = _official(35)
  task = seqio.get_mixture_or_task("flan_Flanv2zsBoolq_eval")
  assert task.source.splits == ("validation",) and task.metric_fns
  assert list(task.source.examples("validation")) == [
      {"inputs": f"question {i}", "target": f"answer {i}", "choices": [], "correct": [],
       "references": [f"answer {i}"], "metric": "rouge_l"} for i in validation]
  assert data.validation_task("flan_Flanv2zsBoolq") == "flan_Flanv2zsBoolq_eval"


def test_generation_lengths_are_the_official_gin_values():
  # colm/datasets/flanv2_t5xl.gin D/<NAME>/ZS/EVAL/InterfaceInfo max_gen_length (line).
  official = {"Flanv2zsAi2arceasy": 64,  # line 29
              "Flanv2zsAlgebralinear1d": 4,  # line 63
              "Flanv2zsBoolq": 8,  # line 80
              "Flanv2zsDrop": 512,  # line 131
              "Niv2zsMisc": 256,  # NIV2MISC
              "Flanv2zsWikidialogii": 512}  # line 2139
  # colm/datasets/p3_t5xl.gin: the P3-collection experts whose D/<NAME>/EVAL generates; the others rank
  # classify ("mc", no length) and decode the official default 20.
  official_p3 = {"P3Samsum": 128, "P3Ropes": 16, "P3Wikibio": 256, "P3Quoref": 32, "P3Duorc": 64,
                 "P3Commongen": 64, "P3Gigaword": 128, "P3Xsum": 256, "P3Hotpotqa": 64, "P3Multinews": 256,
                 "P3Adversarialqa": 128, "P3Cnndailymail": 128, "P3Webquestions": 32}
  official.update({e: official_p3.get(e, 20) for e in P3_EXPERTS})
  assert {e: sources.generation_length(f"flan_{e}_eval") for e in official} == official
  assert set(sources.FLAN_MAX_GEN_LENGTH) == {name for name, c, _ in flan.FLAN_EXPERTS if c != "P3"}
  assert len(sources.FLAN_MAX_GEN_LENGTH) == 123


def test_every_p3_collection_expert_maps_to_its_p3_dataset():
  assert len(P3_EXPERTS) == 43 and list(sources.FLAN_P3_SOURCES) == P3_EXPERTS
  for name, collection, path in flan.FLAN_EXPERTS:
    if collection == "P3":
      source = sources.FLAN_P3_SOURCES[name]
      assert source.templates == "/".join(filter(None, source.hf)) == path, name
  # The first 36 are the P3 pool's datasets; the four T0 held-out ones as p3_t5xl.gin's EVAL configures them
  # (lines 712-959: validation split, every original-task template, no round robin).
  assert [sources.FLAN_P3_SOURCES[e] for e in P3_EXPERTS[:36]] == list(sources.P3_HELD_IN)
  held_out = [sources.FLAN_P3_SOURCES[e] for e in ("P3Wscfixed", "P3Copa", "P3Hswag", "P3Wic")]
  assert all(s in sources.T0_HELD_OUT and s.eval_split == "validation" and not s.round_robin for s in held_out)
  race, web = sources.FLAN_P3_SOURCES["P3Racehigh"], sources.FLAN_P3_SOURCES["P3Webquestions"]
  assert (race.eval_split, race.round_robin, race.max_gen_length) == ("validation", True, None)  # lines 1088-1103
  assert (web.eval_split, web.round_robin, web.eval_metrics) == ("test", True, ("rouge_l",))  # lines 1122-1139


@pytest.fixture
def p3_dirs(shared_data, tmp_path, monkeypatch):
  """A FLAN directory with one FLAN-collection file and a P3 data directory with ag_news, race/high and
  web_questions rows; the pool registered from them (the size check refuses the mixture)."""
  monkeypatch.setenv("PHATGOOSE_TEMPLATES_DIR", str(shared_data / "promptsource_templates"))
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  for dataset, split, rows in (("ag_news", "train", AG_NEWS_ROWS[:3]), ("ag_news", "test", AG_NEWS_ROWS),
                               ("race/high", "train", RACE_ROWS[:1]), ("race/high", "validation", RACE_ROWS),
                               ("web_questions", "train", WEB_QUESTIONS_ROWS[:1]),
                               ("web_questions", "test", WEB_QUESTIONS_ROWS)):
    (tmp_path / "p3" / dataset).mkdir(parents=True, exist_ok=True)
    (tmp_path / "p3" / dataset / f"{split}.jsonl").write_text("\n".join(map(json.dumps, rows)), encoding="utf-8")
  (tmp_path / "flan").mkdir()
  _write_expert(tmp_path / "flan" / "Flanv2zsBoolq.jsonl", 35)
  _register_one(tmp_path / "flan")
  return tmp_path / "p3"


def _served(task_name: str, split: str) -> list:
  return list(seqio.get_mixture_or_task(task_name).source.examples(split))


def test_p3_expert_trains_and_validates_on_its_p3_dataset(p3_dirs):
  source = sources.FLAN_P3_SOURCES["P3Agnews"]
  assert data.validation_task("flan_P3Agnews") == "flan_P3Agnews_eval"
  with sources.using_dirs(data_dir=p3_dirs):
    validation, train = _served("flan_P3Agnews_eval", "validation"), _served("flan_P3Agnews", "train")
    assert validation == list(p3.eval_examples(source)) and train == list(p3.train_examples(source))
  # D/P3AGNEWS/EVAL (p3_t5xl.gin lines 98-104): the test split, original templates in turn, rank classification;
  # every template's answer choices are the four topics in label order.
  assert len(validation) == 6 and len(train) == 3 * len(p3.templates(source, train=True))
  for row, example in zip(AG_NEWS_ROWS, validation):
    assert example["metric"] == "accuracy" and len(example["choices"]) == 4
    assert example["correct"] == [i == row["label"] for i in range(4)] and row["text"] in example["inputs"]
  # The FLAN-collection expert beside it still validates on its jsonl split by ROUGE-L.
  assert {e["metric"] for e in _served("flan_Flanv2zsBoolq_eval", "validation")} == {"rouge_l"}


def test_race_ranks_its_options_and_web_questions_generates_against_every_answer(p3_dirs):
  examples = tasks.get_eval_examples("flan_P3Racehigh_eval", data_dir=p3_dirs)["flan_P3Racehigh_eval"]
  names = [t.name for t in p3.templates(sources.FLAN_P3_SOURCES["P3Racehigh"], train=False)]
  assert len(names) == 5 and len(examples) == 3  # round robin: row i with original template i mod 5
  for row, example in zip(RACE_ROWS, examples):
    assert example["metric"] == "accuracy" and example["correct"] == [True, False, False, False]
    assert example["choices"] in (["A", "B", "C", "D"], row["options"])
  examples = tasks.get_eval_examples("flan_P3Webquestions_eval", data_dir=p3_dirs)["flan_P3Webquestions_eval"]
  assert [(e["metric"], e["references"], e["choices"]) for e in examples] == [
      ("rouge_l", row["answers"], []) for row in WEB_QUESTIONS_ROWS]
  assert all(row["question"].lower() in e["inputs"].lower() for row, e in zip(WEB_QUESTIONS_ROWS, examples))


def test_p3_expert_data_is_read_on_request_and_names_what_is_missing(p3_dirs, tmp_path):
  with pytest.raises(sources.MissingDataError, match="dataset ag_news split test"):
    tasks.get_eval_examples("flan_P3Agnews_eval", data_dir=tmp_path / "empty")
  (tmp_path / "flan" / "P3Agnews.jsonl").write_text("{}", encoding="utf-8")
  with pytest.raises(ValueError, match="holds P3Agnews.jsonl, named after P3-collection experts"):
    flan.register_pool(tmp_path / "flan")


class _EchoRunner(TextRunner):
  """Decodes each generative row to its target's first `words` words."""

  def __init__(self, words: int):
    super().__init__(lambda inputs, target: 0.0)
    self.words = words

  def predict_fn(self, task, rows):
    vocabulary = seqio.get_mixture_or_task(task).output_features["targets"].vocabulary
    prefix = lambda i: " ".join(rows[i]["targets_pretokenized"].decode().split()[:self.words])
    return lambda dataset: [(int(i), np.asarray(vocabulary.encode(prefix(int(i))), np.int32))
                            for i, _ in dataset.as_numpy_iterator()]


def test_evaluate_scores_greedy_generations_by_rouge_l(tmp_path):
  words = ("one", "two", "three", "nine", "ten")  # the test vocabulary spells these (not digits)
  rows = [{"inputs": f"question {i}", "targets": f"answer {words[i % 5]}", "_template_type": "zs_opt"}
          for i in range(35)]
  (tmp_path / "Niv2zsMisc.jsonl").write_text("\n".join(map(json.dumps, rows)), encoding="utf-8")
  _register_one(tmp_path)
  for num_words, expected in ((2, 1.0), (1, 2 / 3), (0, 0.0)):  # ROUGE-L F of "answer" vs "answer two": 2PR/(P+R)
    result = evaluator.evaluate("flan_Niv2zsMisc_eval", _EchoRunner(num_words))
    assert result["tasks"]["flan_Niv2zsMisc_eval"] == {"num_examples": 3, "metrics": {"rouge_l": pytest.approx(
        expected)}, "score": pytest.approx(expected)}
