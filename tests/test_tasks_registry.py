"""Task registries (algorithm.md §6): exactly the paper's names, idempotent registration, missing-data errors,
the FLAN pool and its ban on T0 held-out evaluation."""
import importlib
import json

import pytest
import seqio

from phatgoose_jax import tasks
from phatgoose_jax.evaluation import evaluator
from phatgoose_jax.tasks import flan, sources
from text_runner import TextRunner

P3 = ("ag_news amazon_polarity cosmos_qa samsum quartz ropes wiki_bio paws wiki_qa social_i_qa qasc quail dream "
      "wiqa quarel sciq quoref duorc_paraphraserc rotten_tomatoes yelp_review_full common_gen gigaword xsum "
      "glue_mrpc glue_qqp commonsense_qa cos_e wiki_hop hotpot_qa app_reviews trec multi_news imdb adversarial_qa "
      "cnn_dailymail dbpedia_14").split()
T0 = "rte hellaswag copa wic winogrande_xl cb story_cloze_2016 anli_r1 anli_r2 anli_r3 wsc".split()
BBL = ("bbq_lite_json conceptual_combinations conlang_translation formal_fallacies_syllogisms_negation "
       "hindu_knowledge known_unknowns linguistics_puzzles logic_grid_puzzle logical_deduction novel_concepts "
       "operators play_dialog_same_or_different repeat_copy_logic strange_stories strategyqa "
       "vitaminc_fact_verification winowhy").split()
BBH = ("boolean_expressions causal_judgement date_understanding disambiguation_qa formal_fallacies geometric_shapes "
       "hyperbaton logical_deduction movie_recommendation multistep_arithmetic_two navigate object_counting "
       "penguins_in_a_table reasoning_about_colored_objects ruin_names salient_translation_error_detection snarks "
       "sports_understanding temporal_sequences tracking_shuffled_objects web_of_lies word_sorting").split()


def _mixture_tasks(name):
  return [t.name for t in seqio.get_mixture_or_task(name).tasks]


def test_registries_hold_exactly_the_paper_tasks():
  assert (len(P3), len(T0), len(BBL), len(BBH)) == (36, 11, 17, 22)
  assert sorted(_mixture_tasks("p3_held_in")) == sorted(f"p3_{k}" for k in P3)
  assert sorted(_mixture_tasks("p3_held_in_eval")) == sorted(f"p3_{k}_eval" for k in P3)
  assert sorted(_mixture_tasks("t0_held_out")) == sorted(f"t0_{k}" for k in T0)
  assert sorted(_mixture_tasks("bigbench_lite")) == sorted(f"bbl_{k}" for k in BBL)
  assert sorted(_mixture_tasks("bigbench_hard")) == sorted(f"bbh_{k}" for k in BBH)
  assert tasks.registered_names("p3_") == sorted([f"p3_{k}" for k in P3] + [f"p3_{k}_eval" for k in P3]
                                                 + ["p3_held_in", "p3_held_in_eval"])
  assert tasks.registered_names("t0_") == sorted([f"t0_{k}" for k in T0] + ["t0_held_out"])
  assert tasks.registered_names("bbl_") == sorted(f"bbl_{k}" for k in BBL)
  assert tasks.registered_names("bbh_") == sorted(f"bbh_{k}" for k in BBH)


def test_registration_is_idempotent():
  tasks.register_all()
  importlib.reload(tasks)
  assert len(tasks.registered_names("t0_")) == 12


def test_cli_list(capfd):
  from phatgoose_jax import cli
  assert cli.main(["tasks", "list", "--prefix", "t0_"]) == 0
  assert capfd.readouterr().out.split() == sorted([f"t0_{k}" for k in T0] + ["t0_held_out"])


def test_missing_dataset_names_it_where_and_how(shared_data, tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  with pytest.raises(sources.MissingDataError) as error:
    tasks.get_eval_examples("t0_cb", templates_dir=shared_data / "promptsource_templates", data_dir=tmp_path)
  message = str(error.value)
  assert "dataset cb split validation" in message
  assert str(tmp_path / "super_glue" / "cb" / "validation.jsonl") in message
  assert "tfds build super_glue/cb:1.0.2" in message and "load_dataset('super_glue', 'cb')" in message


def test_missing_directories_and_templates(tmp_path, monkeypatch):
  monkeypatch.delenv("PHATGOOSE_TEMPLATES_DIR", raising=False)
  with pytest.raises(sources.MissingDataError, match=r"--templates_dir DIR or \$PHATGOOSE_TEMPLATES_DIR"):
    tasks.get_eval_examples("t0_rte")
  with pytest.raises(sources.MissingDataError, match="promptsource templates of super_glue/rte.*promptsource"):
    tasks.get_eval_examples("t0_rte", templates_dir=tmp_path)
  with pytest.raises(KeyError, match="unknown task or mixture"):
    tasks.get_task_or_mixture("no_such_task")


def _write_flan(flan_dir, names):
  flan_dir.mkdir()
  for name in names:
    rows = [{"inputs": f"{name} zs", "targets": "a", "_task_name": name, "_template_type": "zs_opt"},
            {"inputs": f"{name} fs", "targets": "b", "_task_name": name, "_template_type": "fs_opt"},
            {"inputs": f"{name} zs2", "targets": "c", "task_name": name, "template_type": "zs_noopt"}]
    (flan_dir / f"{name}.jsonl").write_text("\n".join(map(json.dumps, rows)))


def test_flan_pool_zero_shot_only_and_full_size(tmp_path):
  _write_flan(tmp_path / "small", ["glue_sst2", "niv2 misc."])
  with pytest.raises(ValueError, match="166 experts"):
    flan.register_pool(tmp_path / "small")
  task = seqio.get_mixture_or_task("flan_niv2_misc.")
  rows = list(task.source.get_dataset("train", shuffle=False).as_numpy_iterator())
  assert [(r["inputs"], r["targets"]) for r in rows] == [(b"niv2 misc. zs", b"a"), (b"niv2 misc. zs2", b"c")]
  # The full pool: 123 FLAN-collection files and the 43 P3-collection experts on their P3 datasets.
  _write_flan(tmp_path / "full", [f"expert_{i:03d}" for i in range(123)])
  names = flan.register_pool(tmp_path / "full")
  p3_experts = [f"flan_{name}" for name, collection, _ in flan.FLAN_EXPERTS if collection == "P3"]
  assert len(names) == len(set(names)) == 166 and names[:43] == p3_experts
  assert sorted(_mixture_tasks("flan_166")) == sorted(names)
  with pytest.raises(sources.MissingDataError, match="FLAN collection"):
    flan.register_pool(tmp_path)


def test_flan_pool_is_never_evaluated_on_t0_held_out():
  for name in ("t0_held_out", "t0_copa", "t0_wsc"):
    with pytest.raises(ValueError, match="must not be evaluated on T0 held-out"):
      flan.check_evaluation("flan", name)
    with pytest.raises(ValueError, match="must not be evaluated on T0 held-out"):
      evaluator.evaluate(name, TextRunner(), expert_pool="flan")
  flan.check_evaluation("flan", "bigbench_hard")
  flan.check_evaluation("p3", "t0_held_out")


def test_evaluate_bigbench_generation_and_choices(shared_data):
  # repeat_copy_logic is generative (exact match): echoing the reference scores 1, an empty answer 0.
  result = evaluator.evaluate("bbl_repeat_copy_logic", TextRunner(lambda i, t: 0.0), max_examples=4,
                              bigbench_dir=shared_data / "bigbench")
  assert result["tasks"]["bbl_repeat_copy_logic"] == {"num_examples": 4, "metrics": {"exact_match": 0.0},
                                                       "score": 0.0}
  # strategyqa is multiple choice; a model preferring "Yes" is right exactly on the examples whose answer is Yes.
  examples = tasks.get_eval_examples("bbl_strategyqa", 10, bigbench_dir=shared_data / "bigbench")["bbl_strategyqa"]
  expected = sum(e["choices"][e["correct"].index(True)] == "Yes" for e in examples) / 10
  result = evaluator.evaluate("bbl_strategyqa", TextRunner(lambda i, t: float(t == "Yes")), max_examples=10,
                              bigbench_dir=shared_data / "bigbench")
  assert result["score"] == pytest.approx(expected)
