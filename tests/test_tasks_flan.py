"""FLAN pool (algorithm.md §6): the official seeded 90/10 train / validation split (no training row in
validation), the 500,000-row training cap, the pinned 166 experts with their NIv2 categories, and checkpoint
selection on the validation split by ROUGE-L of greedy generations of the official lengths (algorithm.md §2)."""
import json

import numpy as np
import pytest
import seqio

from phatgoose_jax import data
from phatgoose_jax.evaluation import evaluator
from phatgoose_jax.tasks import flan, sources
from text_runner import TextRunner


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
  # colm/datasets/flanv2_t5xl.gin D/<NAME>/ZS/EVAL/InterfaceInfo max_gen_length (line), p3_t5xl.gin for P3.
  official = {"Flanv2zsAi2arceasy": 64,  # line 29
              "Flanv2zsAlgebralinear1d": 4,  # line 63
              "Flanv2zsBoolq": 8,  # line 80
              "Flanv2zsDrop": 512,  # line 131
              "Niv2zsMisc": 256,  # NIV2MISC
              "Flanv2zsWikidialogii": 512,  # line 2139
              "P3Samsum": 128,  # p3_t5xl.gin line 556
              "P3Agnews": 20}  # rank classification in p3_t5xl.gin: the official default
  assert {e: sources.generation_length(f"flan_{e}_eval") for e in official} == official
  assert set(sources.FLAN_MAX_GEN_LENGTH) <= {name for name, _, _ in flan.FLAN_EXPERTS}
  assert sum(c != "P3" for _, c, _ in flan.FLAN_EXPERTS) == 123 and all(
      name in sources.FLAN_MAX_GEN_LENGTH for name, c, _ in flan.FLAN_EXPERTS if c != "P3")
  # The P3 pool's generative datasets decode the same lengths as the FLAN pool's P3 experts on them.
  p3_lengths = {"/".join(filter(None, s.hf)): s.max_gen_length for s in sources.P3_HELD_IN if s.max_gen_length}
  assert {p: sources.FLAN_MAX_GEN_LENGTH[n] for n, c, p in flan.FLAN_EXPERTS if p in p3_lengths} == p3_lengths


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
