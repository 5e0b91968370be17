"""promptsource templates (algorithm.md §6): the real YAML renders for every T0 held-out dataset on examples
built here in each dataset's schema; the YAML tags, `|||`, answer choices and filters; T0 tasks end to end."""
import json

import pytest

from phatgoose_jax.evaluation import evaluator
from phatgoose_jax.tasks import p3, promptsource, sources
from text_runner import TextRunner

EXAMPLES = {
    "super_glue/rte": {"premise": "The cat sat on the mat.", "hypothesis": "A cat is sitting.", "idx": 0, "label": 0},
    "super_glue/cb": {"premise": "It was raining hard.", "hypothesis": "The ground stayed dry.", "idx": 0, "label": 1},
    "super_glue/copa": {"premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.",
                        "choice2": "He got a hole in his sock.", "question": "cause", "idx": 0, "label": 0},
    "super_glue/wic": {"word": "bank", "sentence1": "He sat on the river bank.", "sentence2": "She robbed the bank.",
                       "start1": 18, "start2": 14, "end1": 22, "end2": 18, "idx": 0, "label": 0},
    "super_glue/wsc.fixed": {"text": "Mark told Pete many lies about himself. He should have been more truthful.",
                             "span1_index": 0, "span2_index": 7, "span1_text": "Mark", "span2_text": "He", "idx": 0,
                             "label": 1},
    "hellaswag": {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "The man writes on the snowy window.",
                  "ctx_b": "the man", "ctx": "The man writes on the snowy window. the man",
                  "endings": ["drives away.", "sits down.", "cleans the window.", "eats snow."], "source_id": "x",
                  "split": "val", "split_type": "indomain", "label": "2"},
    "winogrande/winogrande_xl": {"sentence": "The trophy doesn't fit into the suitcase because the _ is too large.",
                                 "option1": "trophy", "option2": "suitcase", "answer": "1"},
    "story_cloze/2016": {"story_id": "s1", "input_sentence_1": "Tom went to the store.",
                         "input_sentence_2": "He wanted milk.", "input_sentence_3": "The store was closed.",
                         "input_sentence_4": "He went home.", "sentence_quiz1": "Tom was disappointed.",
                         "sentence_quiz2": "Tom bought milk.", "answer_right_ending": 1},
    "anli": {"uid": "u1", "premise": "The sun rises in the east.", "hypothesis": "The sun rises in the west.",
             "label": 2, "reason": ""},
}
_ENDINGS = ("drives away.", "sits down.", "cleans the window.", "eats snow.")
# dataset: (number of original-task templates rendering this example, {answer choices: target}).
EXPECTED = {
    "super_glue/rte": (10, {("Yes", "No"): "Yes", ("True", "False"): "True"}),
    "super_glue/cb": (15, {("Yes", "No", "Maybe"): "No", ("True", "False", "Inconclusive"): "False",
                           ("Always", "Never", "Sometimes"): "Never", ("True", "False", "Neither"): "False",
                           ("Guaranteed", "Impossible", "Possible"): "Impossible",
                           ("Correct", "Incorrect", "Inconclusive"): "Incorrect"}),
    # The two "effect" templates render no target for a "cause" question, as in P3.
    "super_glue/copa": (10, {("He dropped a hammer on his foot.", "He got a hole in his sock."):
                             "He dropped a hammer on his foot."}),
    "super_glue/wic": (10, {("No", "Yes"): "No", ("False", "True"): "False"}),
    "super_glue/wsc.fixed": (10, {("No", "Yes"): "Yes", ("False", "True"): "True"}),
    "hellaswag": (4, {_ENDINGS: "cleans the window.", ("Ending 1", "Ending 2", "Ending 3", "Ending 4"): "Ending 3"}),
    "winogrande/winogrande_xl": (5, {("trophy", "suitcase"): "trophy"}),
    "story_cloze/2016": (5, {("Tom was disappointed.", "Tom bought milk."): "Tom was disappointed."}),
    "anli": (15, {("Yes", "Maybe", "No"): "No", ("True", "Neither", "False"): "False",
                  ("True", "Inconclusive", "False"): "False", ("Correct", "Inconclusive", "Incorrect"): "Incorrect",
                  ("Guaranteed", "Possible", "Impossible"): "Impossible", ("Always", "Sometimes", "Never"): "Never"}),
}


@pytest.mark.parametrize("dataset", sorted(EXAMPLES))
def test_t0_held_out_templates_render(shared_data, dataset):
  templates = promptsource.load_templates(dataset, shared_data / "promptsource_templates", original_task_only=True)
  source = next(s for s in sources.T0_HELD_OUT if s.templates == dataset)
  examples = [e for e in (p3.eval_example(t, EXAMPLES[dataset], source) for t in templates) if e is not None]
  count, choices_to_target = EXPECTED[dataset]
  assert len(examples) == count
  for example in examples:
    assert choices_to_target[tuple(example["choices"])] == example["target"]
    assert example["correct"] == [c == example["target"] for c in example["choices"]]
    assert example["inputs"] and "|||" not in example["inputs"]
  assert {tuple(e["choices"]) for e in examples} == set(choices_to_target)


def test_every_t0_held_out_source_has_templates(shared_data):
  assert {s.templates for s in sources.T0_HELD_OUT} == set(EXAMPLES)


TOY_YAML = """dataset: toy
templates:
  id-1: !Template
    answer_choices: '{{ option_a }} ||| {{ option_b }}'
    id: id-1
    jinja: 'Q: {{ question }} ||| {{ answer_choices[label] }}'
    metadata: !TemplateMetadata
      choices_in_prompt: false
      metrics:
      - Accuracy
      original_task: true
    name: pick
    reference: ''
  id-2: !Template
    answer_choices: null
    id: id-2
    jinja: '{{ [question, question] | choice }} {{ tags | most_frequent | join(",") }} ||| {{ answer }}'
    metadata: !TemplateMetadata
      choices_in_prompt: null
      metrics:
      - ROUGE
      original_task: false
    name: free
    reference: ''
"""


def test_yaml_tags_pipes_choices_and_filters(tmp_path):
  (tmp_path / "toy").mkdir()
  (tmp_path / "toy" / "templates.yaml").write_text(TOY_YAML, encoding="utf-8")
  pick, free = promptsource.load_templates("toy", tmp_path)
  assert (pick.name, pick.original_task, pick.metrics) == ("pick", True, ("Accuracy",))
  row = {"question": "a ||| b?", "option_a": "x|||y", "option_b": "z", "label": 0, "answer": "ok",
         "tags": ["u", "v", "v"]}
  assert promptsource.answer_choices(pick, row) == ["x|||y", "z"]
  # As in promptsource, choices enter the template unprotected: a choice holding "|||" splits the output.
  assert promptsource.apply(pick, row) == ["Q: a ||| b?", "x", "y"]
  assert promptsource.apply(pick, {**row, "option_a": "x"}) == ["Q: a ||| b?", "x"]
  assert promptsource.apply(free, row) == ["a ||| b? v", "ok"]
  assert promptsource.load_templates("toy", tmp_path, original_task_only=True) == [pick]
  with pytest.raises(ValueError, match="restricted key"):
    promptsource.apply(pick, {**row, "answer_choices": 1})


def test_t0_task_end_to_end_from_local_jsonl(shared_data, tmp_path):
  rows = [{"premise": "P0.", "hypothesis": "H0.", "idx": 0, "label": 0},
          {"premise": "P1.", "hypothesis": "H1.", "idx": 1, "label": 1},
          {"premise": "P2.", "hypothesis": "H2.", "idx": 2, "label": -1}]
  (tmp_path / "super_glue" / "rte").mkdir(parents=True)
  (tmp_path / "super_glue" / "rte" / "validation.jsonl").write_text("\n".join(map(json.dumps, rows)))
  # A model that always prefers "Yes"/"True" (the first choice): right on row 0, wrong on row 1, and row 2
  # (label -1, no target) is skipped, over each of the 10 original-task templates.
  runner = TextRunner(lambda inputs, target: 0.0 if target in ("Yes", "True") else -1.0)
  result = evaluator.evaluate("t0_rte", runner, expert_pool="p3",
                              templates_dir=shared_data / "promptsource_templates", data_dir=tmp_path)
  assert result["tasks"]["t0_rte"] == {"num_examples": 20, "metrics": {"accuracy": 0.5}, "score": 0.5}
  assert result["score"] == 0.5
