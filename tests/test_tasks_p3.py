"""P3 training data and the T0 held-out evaluation follow the official code (algorithm.md §6): template
selection, the seeded 500,000-pair sample, "<NO INPUT>" / "<NO LABEL>" rows, round robin, seeded row samples,
app_reviews' held-out rows, StoryCloze's test split, hotpot_qa's and trec's sources and templates, and the
generative datasets scored by their EVAL metrics against the references of their official dataset classes."""
import dataclasses
import json

import numpy as np
import pytest
import seqio

from phatgoose_jax import assembly, data, tasks
from phatgoose_jax import library as lib
from phatgoose_jax.evaluation import metrics
from phatgoose_jax.routers import retrieval
from phatgoose_jax.tasks import p3, promptsource, seqio_tasks, sources

from random_trees import TINY, random_expert, random_params

SOURCES = {s.key: s for s in sources.P3_HELD_IN + sources.T0_HELD_OUT}
COPA_ROWS = [
    {"premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.",
     "choice2": "He got a hole in his sock.", "question": "cause", "idx": 0, "label": 0},
    {"premise": "I tipped the bottle.", "choice1": "The liquid in the bottle froze.",
     "choice2": "The liquid in the bottle poured out.", "question": "effect", "idx": 1, "label": 1},
    {"premise": "The sun rose.", "choice1": "It got dark.", "choice2": "It got light.", "question": "effect",
     "idx": 2, "label": 1}]

DREAM_ROWS = [{"id": i, "dialogue_id": f"d{i}", "dialogue": [f"M: Is lunch at {i}?", "W: Yes, it is."],
               "question": f"When is lunch, {i}?", "choice": [f"At {i}.", "Never.", "At noon."], "answer": f"At {i}."}
              for i in range(4)]


@pytest.fixture
def templates_dir(shared_data, monkeypatch):
  monkeypatch.setenv("PHATGOOSE_TEMPLATES_DIR", str(shared_data / "promptsource_templates"))
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  return shared_data / "promptsource_templates"


def _write_split(data_dir, dataset: str, split: str, rows: list):
  (data_dir / dataset).mkdir(parents=True, exist_ok=True)
  (data_dir / dataset / f"{split}.jsonl").write_text("\n".join(map(json.dumps, rows)), encoding="utf-8")


def test_template_selection_follows_p3_gin(templates_dir):
  names = lambda key, train: [t.name for t in p3.templates(SOURCES[key], train)]
  copa = names("copa", train=False)
  assert copa == sorted(copa) and len(copa) == 8
  assert not {"\u2026which may be caused by", "\u2026What could happen next, C1 or C2?", "\u2026As a result, C1 or C2?",
              "\u2026why? C1 or C2"} & set(copa)
  assert "paraphrase-task" not in names("paws", train=True) + names("paws", train=False)
  assert len(names("paws", train=True)) == len(promptsource.load_templates("paws/labeled_final")) - 1
  assert "Jeopardy style" not in names("wiki_qa", train=True)
  # social_i_qa ignores its template in evaluation only; app_reviews evaluates all templates but three.
  social = set(names("social_i_qa", True)) - set(names("social_i_qa", False))
  assert "Check if a random answer is valid or not" in social
  assert names("app_reviews", train=False) == ["categorize_rating_using_review"]
  assert SOURCES["hotpot_qa"].templates == "hotpot_qa/fullwiki" and SOURCES["hotpot_qa"].hf == ("hotpot_qa", "fullwiki")
  assert len(names("hotpot_qa", train=True)) == len(promptsource.load_templates("hotpot_qa/fullwiki"))
  assert names("trec", train=True) == names("trec", train=False) == ["trec"]


def test_trec_uses_the_official_fixed_template(templates_dir):
  row = {"text": "How far is it from Denver to Aspen ?", "coarse_label": 5, "fine_label": 40}
  (template,) = p3.templates(SOURCES["trec"], train=True)
  choices = list(p3.TREC_CHOICES)
  assert len(choices) == 50 and choices[40] == "Distance, linear measure."
  assert p3.train_pair(template, row) == {
      "inputs": f"Question: {row['text']}\nAnswer choices: {choices}\nAnswer:", "targets": choices[40]}
  example = p3.eval_example(template, row, SOURCES["trec"])
  assert example["choices"] == choices and example["correct"] == [i == 40 for i in range(50)]


def test_no_input_and_no_label_rows_train_as_official(templates_dir):
  effect_only = [t for t in promptsource.load_templates("super_glue/copa") if t.name.startswith("\u2026As a result")]
  assert p3.train_pair(effect_only[0], COPA_ROWS[0]) == {"inputs": "<NO INPUT>", "targets": "<NO INPUT>"}
  rte = promptsource.load_templates("super_glue/rte")[0]
  unlabeled = {"premise": "P.", "hypothesis": "H.", "idx": 0, "label": -1}
  assert p3.train_pair(rte, unlabeled) == {"inputs": promptsource.apply(rte, unlabeled)[0], "targets": "<NO LABEL>"}


def test_train_pairs_equal_the_official_sample():
  # Official: default_rng(42).choice(list(range(rows * templates)), cap, replace=False), i -> (i // T, i % T).
  official = np.random.default_rng(42).choice(list(range(7 * 12)), 10, replace=False).tolist()
  assert p3.train_pairs(7, 12, cap=10) == sorted(divmod(i, 12) for i in official)
  assert p3.train_pairs(2, 3, cap=10) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]


def test_training_data_end_to_end_with_the_cap(templates_dir, tmp_path, monkeypatch):
  source = sources.DatasetSource("toy_copa", "super_glue/copa", ("super_glue", "copa"))
  _write_split(tmp_path, "super_glue/copa", "train", COPA_ROWS)
  monkeypatch.setattr(p3, "MAX_TRAIN_PAIRS", 7)
  chosen = sorted(promptsource.load_templates("super_glue/copa"), key=lambda t: t.name)
  official = np.random.default_rng(42).choice(len(COPA_ROWS) * len(chosen), 7, replace=False)
  expected = [p3.train_pair(chosen[i % len(chosen)], COPA_ROWS[i // len(chosen)]) for i in sorted(official)]
  with sources.using_dirs(data_dir=tmp_path):
    assert list(p3.train_examples(source)) == expected
  monkeypatch.setattr(p3, "MAX_TRAIN_PAIRS", 500_000)
  with sources.using_dirs(data_dir=tmp_path):
    everything = list(p3.train_examples(source))
  assert len(everything) == 36 and sum(e["inputs"] == "<NO INPUT>" for e in everything) == 2 + 2 * 2


def test_t0_copa_every_pair_of_eight_templates(templates_dir, tmp_path):
  _write_split(tmp_path, "super_glue/copa", "validation", COPA_ROWS)
  examples = tasks.get_eval_examples("t0_copa", data_dir=tmp_path)["t0_copa"]
  assert len(examples) == 3 * 8
  for e in examples:
    assert e["choices"][e["correct"].index(True)] == e["target"]


def test_story_cloze_is_evaluated_on_its_test_split(templates_dir, tmp_path):
  row = {"story_id": "s1", "input_sentence_1": "Tom went to the store.", "input_sentence_2": "He wanted milk.",
         "input_sentence_3": "The store was closed.", "input_sentence_4": "He went home.",
         "sentence_quiz1": "Tom was disappointed.", "sentence_quiz2": "Tom bought milk.", "answer_right_ending": 1}
  assert SOURCES["story_cloze_2016"].eval_split == "test"
  _write_split(tmp_path, "story_cloze/2016", "test", [row])
  examples = tasks.get_eval_examples("t0_story_cloze_2016", data_dir=tmp_path)["t0_story_cloze_2016"]
  assert len(examples) == 5 and {e["target"] for e in examples} == {"Tom was disappointed."}


def test_held_in_evaluation_round_robin_and_row_sample(templates_dir, tmp_path):
  rows = [{**COPA_ROWS[i % 3], "idx": i} for i in range(6)]
  source = sources.DatasetSource("toy_copa", "super_glue/copa", ("super_glue", "copa"), max_eval_rows=4,
                                 eval_ignore_templates=SOURCES["copa"].eval_ignore_templates)
  _write_split(tmp_path, "super_glue/copa", "validation", rows)
  chosen = p3.templates(source, train=False)
  # Official: self._rng.choice(self._examples, 4, replace=False).tolist(), then row i with template i mod T.
  sampled = np.random.default_rng(42).choice(rows, 4, replace=False).tolist()
  with sources.using_dirs(data_dir=tmp_path):
    got = list(p3.eval_examples(source))
  assert got == [p3.eval_example(chosen[i % len(chosen)], row, source) for i, row in enumerate(sampled)]


def test_app_reviews_holds_out_seeded_rows(templates_dir, tmp_path):
  rows = [{"package_name": "p", "review": f"review {i}", "date": "d", "star": 1 + i % 5} for i in range(7)]
  source = dataclasses.replace(SOURCES["app_reviews"], eval_holdout=3)
  _write_split(tmp_path, "app_reviews", "train", rows)
  shuffled = list(rows)
  np.random.RandomState(1234).shuffle(shuffled)
  with sources.using_dirs(data_dir=tmp_path):
    evaluated = list(p3.eval_examples(source))
    trained = list(p3.train_examples(source))
  (template,) = p3.templates(source, train=False)
  assert evaluated == [p3.eval_example(template, row, source) for row in shuffled[:3]]
  assert len(trained) == 4 * len(p3.templates(source, train=True))
  assert {e["inputs"] for e in trained} == {p3.train_pair(t, r)["inputs"] for t in p3.templates(source, True)
                                            for r in shuffled[3:]}


ROPES_ROWS = [{"id": f"r{i}", "background": "Warm air rises.", "situation": f"Tom heats room {i}; Ann cools it.",
               "question": "Whose air rises?", "answers": {"text": ["Tom", "Tom's air"], "answer_start": [0, 0]}}
              for i in range(2)]
DUORC_ROWS = [{"plot_id": "p", "plot": "Bob meets Ann.", "title": "T", "question_id": f"q{i}",
               "question": "Who meets Ann?", "answers": answers, "no_answer": not answers}
              for i, answers in enumerate([["Bob", "Robert"], []])]
COMMON_GEN_ROWS = [{"concept_set_idx": 0, "concepts": ["dog", "frisbee", "catch"], "target": "A dog catches a frisbee."}]
SAMSUM_ROWS = [{"id": "s0", "dialogue": "Ann: hi\nBob: hello", "summary": "Ann and Bob greet."}]


def test_generative_datasets_are_exactly_those_with_official_metrics(templates_dir):
  # A dataset's evaluation templates either all have answer choices (rank classification) or none (generation,
  # scored by its EVAL metrics: p3_t5xl.gin; hotpot_qa's ["blue", "rouge"] computes ROUGE only).
  for source in sources.P3_HELD_IN + sources.T0_HELD_OUT + sources.FLAN_P3_EXTRA:
    generative = {not t.answer_choices for t in p3.templates(source, train=False)}
    assert generative == {bool(source.eval_metrics)}, source.key
  metrics_by_key = {s.key: s.eval_metrics for s in sources.P3_HELD_IN if s.eval_metrics}
  assert metrics_by_key == {
      "samsum": ("rouge_l",), "ropes": ("squad",), "wiki_bio": ("bleu", "rouge_l"), "quoref": ("squad",),
      "duorc_paraphraserc": ("squad",), "common_gen": ("bleu", "rouge_l"), "gigaword": ("bleu", "rouge_l"),
      "xsum": ("bleu", "rouge_l"), "hotpot_qa": ("rouge_l",), "multi_news": ("bleu", "rouge_l"),
      "adversarial_qa": ("squad",), "cnn_dailymail": ("bleu", "rouge_l")}
  with pytest.raises(ValueError, match="DatasetSource.eval_metrics"):
    p3.eval_example(p3.templates(SOURCES["samsum"], train=False)[0], SAMSUM_ROWS[0],
                    dataclasses.replace(SOURCES["samsum"], eval_metrics=()))


def test_generative_rows_name_their_metrics_and_official_references(templates_dir, tmp_path):
  for dataset, rows in (("ropes", ROPES_ROWS), ("duorc/ParaphraseRC", DUORC_ROWS), ("common_gen", COMMON_GEN_ROWS),
                        ("samsum", SAMSUM_ROWS)):
    _write_split(tmp_path, dataset, "validation", rows)
  with sources.using_dirs(data_dir=tmp_path):
    ropes, duorc, common_gen, samsum = (list(p3.eval_examples(SOURCES[k])) for k in (
        "ropes", "duorc_paraphraserc", "common_gen", "samsum"))
  # P3RopesDataset: references = answers["text"], all of them; scored by squad.
  assert [(e["metric"], e["references"], e["choices"]) for e in ropes] == [("squad", ["Tom", "Tom's air"], [])] * 2
  # P3DuorcDataset: the answers; an unanswerable row the no-answer text of its round-robin template (row 1: the
  # second template, decide_worth_it).
  assert [e["references"] for e in duorc] == [["Bob", "Robert"], ["No I can't"]]
  assert duorc[1]["target"] == "No I can't" and {e["metric"] for e in duorc} == {"squad"}
  # P3CommonGenDataset: the row's target; P3SamsumDataset: the summary. Both list their metrics.
  assert [(e["metric"], e["references"]) for e in common_gen] == [("bleu,rouge_l", ["A dog catches a frisbee."])]
  assert [(e["metric"], e["references"]) for e in samsum] == [("rouge_l", ["Ann and Bob greet."])]


def test_generation_metrics_score_each_listed_metric_over_its_rows():
  row = lambda metric, references: {"idx": 0, "choice_idx": 0, "is_correct": True, "metric": metric,
                                    "references": references}
  targets = [row("bleu,rouge_l", ["a b c d"]), row("bleu,rouge_l", ["the cat is on the mat", "a mat"]),
             row("squad", ["Tom", "Tom's air"]), row("squad", ["Bob"]), row("accuracy", ["x"])]
  predictions = ["a b c d", "the cat sat on the mat", "tom", "Robert", "x"]
  values = seqio_tasks.generation_metrics(targets, predictions)
  # BLEU over both rows (precisions 9/10, 6/8, 3/6, 1/4; shortest references 4 + 2 < 10: no penalty); ROUGE-L
  # best of references: 1 and 5/6 (LCS 5 of 6 tokens). SQuAD: "tom" = "Tom" once in two rows; F1 1 and 0.
  assert values == pytest.approx({"bleu": (0.9 * 0.75 * 0.5 * 0.25) ** 0.25, "rouge_l": (1 + 5 / 6) / 2,
                                  "squad_exact_match": 0.5, "squad_f1": 0.5})
  # The task score is the mean of the four values, as the official evaluator averages every metric value.
  assert metrics.dataset_score(values) == pytest.approx(sum(values.values()) / 4)
  assert seqio_tasks.generation_metrics(targets[-1:], predictions[-1:]) == {}


def test_only_generative_datasets_carry_the_generation_metric():
  """A multiple-choice dataset's evaluation task is scored by rank classification alone (seqio then neither
  decodes nor post-processes predictions for it); a generative one also by its generation metrics."""
  for source in sources.P3_HELD_IN + sources.T0_HELD_OUT:
    name = f"p3_{source.key}_eval" if source in sources.P3_HELD_IN else f"t0_{source.key}"
    fns = seqio.get_mixture_or_task(name).metric_fns
    assert seqio_tasks.rank_classification_metric in fns
    assert (seqio_tasks.generation_metrics in fns) == bool(source.eval_metrics), name


def official_stored_texts(chosen, rows, cap, count):
  """The texts the official retriever stores for a P3 TRAIN dataset, its rules verbatim: the pair draw
  (src/data/p3.py:96-112), `__getitem__` (lines 122-146) for items 0..count-1 (src/procedures/retriever.py:70-74)
  and the text (retriever.py:76-82, include_answer_choices=True)."""
  total = len(rows) * len(chosen)
  if total > cap:
    tuples = np.random.default_rng(42).choice(list(range(total)), cap, replace=False).tolist()
  else:
    tuples = list(range(total))
  texts = []
  for i in range(min(count, len(tuples))):
    idx = tuples[i]
    example, template = rows[idx // len(chosen)], chosen[idx % len(chosen)]
    parts = promptsource.apply(template, example)
    input_str = parts[0] if len(parts) == 2 else "<NO INPUT>"
    answer_choices = promptsource.answer_choices(template, example)
    if answer_choices is None:
      answer_choices = []
    texts.append(f"Answer Choices: {', '.join(answer_choices)}, Instance: {input_str}")
  return texts


@pytest.mark.parametrize("cap", [12, 500_000])
def test_retrieval_stores_the_official_texts_in_the_draws_own_order(templates_dir, tmp_path, monkeypatch, cap):
  """4 dream rows x 5 templates (3 without answer choices): with a cap of 12 the store's first 8 pairs are the
  draw's first 8 (not the first 8 sorted pairs); without a cap, every pair in order."""
  _write_split(tmp_path, "dream", "train", DREAM_ROWS)
  monkeypatch.setattr(p3, "MAX_TRAIN_PAIRS", cap)
  params = random_params()
  library = lib.ExpertLibrary(str(tmp_path / "lib"))
  library.add("dream", random_expert(0)[0], base=lib.base_fingerprint(TINY, params), dataset="p3_dream")
  with sources.using_dirs(data_dir=tmp_path):
    inputs = assembly.router_inputs(library, ["dream"], "retrieval", data.NOTHING_HELD_OUT, retrieval_examples=8,
                                    batch_size=3)
  texts = [t for batch in inputs["examples"]["dream"] for t in retrieval.batch_texts(batch)]
  chosen = p3.templates(SOURCES["dream"], train=True)
  assert texts == official_stored_texts(chosen, DREAM_ROWS, cap, 8)
  assert any(t.startswith("Answer Choices: , Instance: ") for t in texts)  # a template without answer choices
  assert any(t.startswith("Answer Choices: At ") for t in texts)
