"""Every dataset, benchmark list and data location the task registries use, pinned in one place (algorithm.md §6).

A dataset is read, in this order, from: a local JSONL file `<data_dir>/<promptsource path>/<split>.jsonl`
(rows in the Hugging Face schema that the promptsource templates expect), a prepared TFDS dataset (only
where TFDS has the dataset in that same schema; version pinned), or Hugging Face `datasets` (optional
dependency; name and config pinned). Directories come from a function argument / CLI flag, else from an
environment variable; `using_dirs` sets them for one block of code.

The row order of a split matters where the official code samples by index (P3 training pairs, evaluation row
samples, app_reviews' held-out rows): it is the Hugging Face order, which local JSONL copies should keep.
"""
import contextlib
import dataclasses
import os
from typing import Optional

# Where each kind of data lives: (environment variable, what it holds, how to obtain it).
DIR_KINDS = {
    "templates_dir": ("PHATGOOSE_TEMPLATES_DIR", "the promptsource templates directory",
                      "clone https://github.com/bigscience-workshop/promptsource (v0.2.3) and point at "
                      "promptsource/templates"),
    "bigbench_dir": ("PHATGOOSE_BIGBENCH_DIR", "the BIG-bench task directory (bigbench/benchmark_tasks)",
                     "clone https://github.com/google/BIG-bench (1.0.0) and point at bigbench/benchmark_tasks"),
    "bbh_dir": ("PHATGOOSE_BBH_DIR", "the BIG-Bench Hard release directory (<task>.json with examples of "
                "input and target)", "clone https://github.com/suzgunmirac/BIG-Bench-Hard and point at bbh"),
    "flan_dir": ("PHATGOOSE_FLAN_DIR", "the FLAN collection directory (one <expert>.jsonl per expert)",
                 "export the released collection (Hugging Face Open-Orca/FLAN: inputs, targets, _task_name, "
                 "_template_type) into one JSONL file per expert"),
    "data_dir": ("PHATGOOSE_DATA_DIR", "local JSONL copies of the datasets (<promptsource path>/<split>.jsonl)",
                 "write each split as JSONL in its Hugging Face schema"),
    "tfds_dir": ("TFDS_DATA_DIR", "the TFDS data directory", "run `tfds build <name>`"),
}

# The T5 v1.1 SentencePiece model (32000 pieces + 100 sentinels); override with PHATGOOSE_SPM_PATH.
T5_SPM_PATH = "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model"


@dataclasses.dataclass(frozen=True)
class DatasetSource:
  """One dataset: its key, promptsource templates path, pinned TFDS / Hugging Face names and splits, and the
  template selection of the official `colm/datasets/p3_t5xl.gin` (official `P3Dataset`, src/data/p3.py).

  `ignore_templates` are left out of training and evaluation (the dataset's scope in the gin file),
  `eval_ignore_templates` of evaluation only (its EVAL scope); evaluation uses the original-task templates
  (`eval_templates="original"`) or all of them; `round_robin` pairs example i with template i mod T instead of
  every template; `max_eval_rows` is a seeded sample of rows taken before templating
  (`max_pretemplate_examples_per_dataset`); `eval_holdout` rows of the train split, after a seeded shuffle,
  are the evaluation rows and the rest the training rows (app_reviews). A generative evaluation (EVAL
  `interface = "gen"`) decodes at most `max_gen_length` tokens (its EVAL `InterfaceInfo`) and is scored by
  `eval_metrics`, the EVAL scope's `metrics` in this project's names (tasks/seqio_tasks.py
  `GENERATION_METRICS`: "squad" -> squad, "bleu" -> bleu, "rouge" -> rouge_l), against the references the
  official dataset class puts in the row: the row's `references_field` ("answers.text": a nested field), or
  the rendered target where it has none. A dataset without `eval_metrics` is multiple choice (rank
  classification, `interface = "mc"`, `metrics = ["accuracy"]`).
  """
  key: str
  templates: str
  hf: tuple
  tfds: Optional[str] = None
  train_split: str = "train"
  eval_split: str = "validation"
  ignore_templates: tuple = ()
  eval_ignore_templates: tuple = ()
  eval_templates: str = "original"
  round_robin: bool = True
  max_eval_rows: Optional[int] = None
  eval_holdout: Optional[int] = None
  max_gen_length: Optional[int] = None
  eval_metrics: tuple = ()
  references_field: Optional[str] = None


_p3 = DatasetSource

# The 36 held-in T0 datasets of the P3 expert pool, in the released experts' order (algorithm.md §6, §7), with
# the settings of colm/datasets/p3_t5xl.gin (line of each dataset's first entry in the comment; for a generative
# dataset also the line of its EVAL `metrics` and the src/data/p3.py lines of the class that sets `references`).
# SQuAD datasets score every answer; a summary's references are its one summary (the official classes wrap it
# as [[summary]]). hotpot_qa's EVAL lists ["blue", "rouge"]: `Scorer` knows no "blue", so only ROUGE is computed.
P3_HELD_IN = (
    _p3("ag_news", "ag_news", ("ag_news", None), eval_split="test"),  # 89
    _p3("amazon_polarity", "amazon_polarity", ("amazon_polarity", None), eval_split="test",
        max_eval_rows=10_000),  # 106
    _p3("cosmos_qa", "cosmos_qa", ("cosmos_qa", None)),  # 165
    _p3("samsum", "samsum", ("samsum", None), "samsum:1.0.0", max_gen_length=128, eval_metrics=("rouge_l",),
        references_field="summary"),  # 544; metrics 559; P3SamsumDataset 283-287
    _p3("quartz", "quartz", ("quartz", None)),  # 199
    _p3("ropes", "ropes", ("ropes", None), max_gen_length=16, eval_metrics=("squad",),
        references_field="answers.text"),  # 70; metrics 85; P3RopesDataset 258-263
    _p3("wiki_bio", "wiki_bio", ("wiki_bio", None), eval_split="val", max_eval_rows=10_000, max_gen_length=256,
        eval_metrics=("bleu", "rouge_l"), references_field="target_text"),  # 124; metrics 139; P3WikiBioDataset 267-271
    _p3("paws", "paws/labeled_final", ("paws", "labeled_final"), ignore_templates=("paraphrase-task",)),  # 34
    _p3("wiki_qa", "wiki_qa", ("wiki_qa", None), ignore_templates=(  # 52
        "Direct Answer to Question", "Generate Question from Topic", "Jeopardy style",
        "Topic Prediction - Answer Only", "Topic Prediction - Question Only",
        "Topic Prediction - Question and Answer Pair")),
    _p3("social_i_qa", "social_i_qa", ("social_i_qa", None),
        eval_ignore_templates=("Check if a random answer is valid or not",)),  # 16
    _p3("qasc", "qasc", ("qasc", None)),  # 216
    _p3("quail", "quail", ("quail", None)),  # 182
    _p3("dream", "dream", ("dream", None), max_eval_rows=500_000),  # 344
    _p3("wiqa", "wiqa", ("wiqa", None)),  # 616
    _p3("quarel", "quarel", ("quarel", None), eval_templates="all"),  # 491
    _p3("sciq", "sciq", ("sciq", None)),  # 563
    _p3("quoref", "quoref", ("quoref", None), max_gen_length=32, eval_metrics=("squad",),
        references_field="answers.text"),  # 508; metrics 523; P3QuorefDataset 291-296
    _p3("duorc_paraphraserc", "duorc/ParaphraseRC", ("duorc", "ParaphraseRC"), max_gen_length=64,
        eval_metrics=("squad",), references_field="answers"),  # 362; metrics 377; P3DuorcDataset 237-254
    _p3("rotten_tomatoes", "rotten_tomatoes", ("rotten_tomatoes", None)),  # 527
    _p3("yelp_review_full", "yelp_review_full", ("yelp_review_full", None), eval_split="test"),  # 652
    _p3("common_gen", "common_gen", ("common_gen", None), max_gen_length=64, eval_metrics=("bleu", "rouge_l"),
        references_field="target"),  # 233; metrics 248; P3CommonGenDataset 209-213
    _p3("gigaword", "gigaword", ("gigaword", None), "gigaword:1.2.0", max_eval_rows=10_000, max_gen_length=128,
        eval_metrics=("bleu", "rouge_l"), references_field="summary"),  # 381; metrics 396; P3GigaWordDataset 300-304
    _p3("xsum", "xsum", ("xsum", None), "xsum:1.1.0", max_gen_length=256, eval_metrics=("bleu", "rouge_l"),
        references_field="summary"),  # 633; metrics 648; P3XSumDataset 308-312
    _p3("glue_mrpc", "glue/mrpc", ("glue", "mrpc"), "glue/mrpc:2.0.0"),  # 437
    _p3("glue_qqp", "glue/qqp", ("glue", "qqp"), "glue/qqp:2.0.0", max_eval_rows=10_000),  # 473
    _p3("commonsense_qa", "commonsense_qa", ("commonsense_qa", None), max_eval_rows=10_000),  # 289
    _p3("cos_e", "cos_e/v1.11", ("cos_e", "v1.11"), max_eval_rows=10_000),  # 307
    _p3("wiki_hop", "wiki_hop/original", ("wiki_hop", "original")),  # 598
    _p3("hotpot_qa", "hotpot_qa/fullwiki", ("hotpot_qa", "fullwiki"), max_gen_length=64,
        eval_metrics=("rouge_l",), references_field="answer"),  # 401; metrics 416; P3HotpotQADataset 225-229
    _p3("app_reviews", "app_reviews", ("app_reviews", None), eval_split="train", eval_templates="all",
        eval_ignore_templates=("generate_review", "convert_to_rating", "convert_to_star_rating"),
        eval_holdout=10_000),  # 271
    _p3("trec", "trec", ("trec", None), eval_split="test"),  # 580: one fixed template, tasks/p3.py TREC_TEMPLATE
    _p3("multi_news", "multi_news", ("multi_news", None), "multi_news:2.1.0", max_gen_length=256,
        eval_metrics=("bleu", "rouge_l"), references_field="summary"),  # 454; metrics 469; P3MultinewsDataset 217-221
    _p3("imdb", "imdb", ("imdb", None), "imdb_reviews/plain_text:1.0.0", eval_split="test"),  # 420
    _p3("adversarial_qa", "adversarial_qa/adversarialQA", ("adversarial_qa", "adversarialQA"),
        max_gen_length=128, eval_metrics=("squad",),
        references_field="answers.text"),  # 252; metrics 267; P3AdversarialQADataset 200-205
    _p3("cnn_dailymail", "cnn_dailymail/3.0.0", ("cnn_dailymail", "3.0.0"), "cnn_dailymail:3.4.0",
        max_gen_length=128, eval_metrics=("bleu", "rouge_l"),
        references_field="highlights"),  # 144; metrics 160; P3CNNDailyMailDataset 275-279
    _p3("dbpedia_14", "dbpedia_14", ("dbpedia_14", None), eval_split="test", max_eval_rows=10_000),  # 325
)

# The 11 T0 held-out evaluation datasets (P3 pool only), on the splits the official code evaluates, every
# (example, original-task template) pair (algorithm.md §6; colm/datasets/p3_t5xl.gin lines 683-959).
T0_HELD_OUT = (
    _p3("rte", "super_glue/rte", ("super_glue", "rte"), "super_glue/rte:1.0.2", round_robin=False),
    _p3("hellaswag", "hellaswag", ("hellaswag", None), round_robin=False),
    _p3("copa", "super_glue/copa", ("super_glue", "copa"), "super_glue/copa:1.0.2", round_robin=False,
        eval_ignore_templates=("\u2026which may be caused by", "\u2026What could happen next, C1 or C2?",
                               "\u2026As a result, C1 or C2?", "\u2026why? C1 or C2")),  # line 750
    _p3("wic", "super_glue/wic", ("super_glue", "wic"), "super_glue/wic:1.0.2", round_robin=False),
    _p3("winogrande_xl", "winogrande/winogrande_xl", ("winogrande", "winogrande_xl"), round_robin=False),
    _p3("cb", "super_glue/cb", ("super_glue", "cb"), "super_glue/cb:1.0.2", round_robin=False),
    # StoryCloze on its test split (line 860), read from a local copy as the official P3StoryClozeDataset does.
    _p3("story_cloze_2016", "story_cloze/2016", ("story_cloze", "2016"), eval_split="test", round_robin=False),
    _p3("anli_r1", "anli", ("anli", None), eval_split="dev_r1", round_robin=False),
    _p3("anli_r2", "anli", ("anli", None), eval_split="dev_r2", round_robin=False),
    _p3("anli_r3", "anli", ("anli", None), eval_split="dev_r3", round_robin=False),
    _p3("wsc", "super_glue/wsc.fixed", ("super_glue", "wsc.fixed"), "super_glue/wsc.fixed:1.0.2", round_robin=False),
)

# The FLAN pool's P3-collection datasets that neither list above holds (scripts/concatenate.py add1_dataset_dict
# lines 169-171), with the settings of colm/datasets/p3_t5xl.gin (line of each dataset's first entry): the train
# split with every template; EVAL on the original-task templates, round robin. race's EVAL is rank
# classification (`interface = "mc"`, lines 1098, 1115); web_questions' (official `P3WebQuestionsDataset`,
# src/data/p3.py lines 440-445) generates at most 32 tokens scored by ROUGE (`metrics = ["rouge"]`) against the
# row's `answers` (lines 1131-1139).
FLAN_P3_EXTRA = (
    _p3("race_high", "race/high", ("race", "high")),  # 1088
    _p3("race_middle", "race/middle", ("race", "middle")),  # 1105
    _p3("web_questions", "web_questions", ("web_questions", None), eval_split="test", max_gen_length=32,
        eval_metrics=("rouge_l",), references_field="answers"),  # 1122; metrics 1136
)

_BY_KEY = {s.key: s for s in P3_HELD_IN + T0_HELD_OUT + FLAN_P3_EXTRA}

# The dataset of each of the FLAN pool's 43 P3-collection experts, by official expert name
# (scripts/concatenate.py p3_dataset_dict lines 8-45, add1_dataset_dict 165-171): the expert trains on its
# `D/<NAME>/TRAIN` and selects its checkpoint on `D/<NAME>/EVAL` (colm/experiments/bash_scripts/
# train_single_task_loralinear.sh line 50), i.e. the P3 pool's training / evaluation data of that dataset.
# HellaSwag, COPA, WiC and WSC are configured as the T0 held-out evaluation (p3_t5xl.gin lines 712-959).
FLAN_P3_SOURCES = {expert: _BY_KEY[key] for expert, key in (
    ("P3Agnews", "ag_news"), ("P3Amazonpolarity", "amazon_polarity"), ("P3Cosmosqa", "cosmos_qa"),
    ("P3Samsum", "samsum"), ("P3Quartz", "quartz"), ("P3Ropes", "ropes"), ("P3Wikibio", "wiki_bio"),
    ("P3Paws", "paws"), ("P3Wikiqa", "wiki_qa"), ("P3Socialiqa", "social_i_qa"), ("P3Qasc", "qasc"),
    ("P3Quail", "quail"), ("P3Dream", "dream"), ("P3Wiqa", "wiqa"), ("P3Quarel", "quarel"), ("P3Sciq", "sciq"),
    ("P3Quoref", "quoref"), ("P3Duorc", "duorc_paraphraserc"), ("P3Rottentomatoes", "rotten_tomatoes"),
    ("P3Yelp", "yelp_review_full"), ("P3Commongen", "common_gen"), ("P3Gigaword", "gigaword"),
    ("P3Xsum", "xsum"), ("P3Mrpc", "glue_mrpc"), ("P3Qqp", "glue_qqp"), ("P3Commonsenseqa", "commonsense_qa"),
    ("P3Cose", "cos_e"), ("P3Wikihop", "wiki_hop"), ("P3Hotpotqa", "hotpot_qa"), ("P3Appreviews", "app_reviews"),
    ("P3Trec", "trec"), ("P3Multinews", "multi_news"), ("P3Imdb", "imdb"), ("P3Adversarialqa", "adversarial_qa"),
    ("P3Cnndailymail", "cnn_dailymail"), ("P3Dbpedia14", "dbpedia_14"), ("P3Wscfixed", "wsc"),
    ("P3Copa", "copa"), ("P3Hswag", "hellaswag"), ("P3Wic", "wic"), ("P3Racehigh", "race_high"),
    ("P3Racemiddle", "race_middle"), ("P3Webquestions", "web_questions"),
)}


@dataclasses.dataclass(frozen=True)
class BigBenchTask:
  """One BIG-bench evaluation task as the official `colm/datasets/bigbench.gin` configures it.

  `path` is the BIG-bench task directory (`<bigbench_dir>/<path>/task.json`, the Hugging Face export the
  official code reads) or, for `bbh_choices` tasks, the BIG-Bench Hard release file `<bbh_dir>/<path>.json`
  (official `BigBenchSampleDataset` over `lukaemon/bbh`). `metric` is the official metric name; tasks with a
  generative metric are decoded greedily for at most `max_gen_length` tokens (official `InterfaceInfo`).
  """
  path: str
  metric: str = "accuracy"
  max_gen_length: Optional[int] = None
  bbh_choices: Optional[tuple] = None


GENERATIVE_METRICS = ("exact_match", "exact_match_multiple_ans", "rouge")
# Official default of `max_gen_length` (src/models/interface_mixin.py:248).
DEFAULT_MAX_GEN_LENGTH = 20

# BIG-bench Lite: the 24 tasks minus the 7 the paper leaves out (algorithm.md §6); colm/datasets/bigbench.gin
# lines 229-411 (formal_fallacies_syllogisms_negation and logical_deduction use the BBH entries, lines 61-90).
BIGBENCH_LITE = {
    "bbq_lite_json": BigBenchTask("bbq_lite_json"),
    "conceptual_combinations": BigBenchTask("conceptual_combinations"),
    "conlang_translation": BigBenchTask("conlang_translation", "rouge", 64),
    "formal_fallacies_syllogisms_negation": BigBenchTask("formal_fallacies_syllogisms_negation"),
    "hindu_knowledge": BigBenchTask("hindu_knowledge"),
    "known_unknowns": BigBenchTask("known_unknowns"),
    "linguistics_puzzles": BigBenchTask("linguistics_puzzles", "exact_match", 128),
    "logic_grid_puzzle": BigBenchTask("logic_grid_puzzle"),
    "logical_deduction": BigBenchTask("logical_deduction"),
    "novel_concepts": BigBenchTask("novel_concepts", "accuracy_multiple_ans"),
    "operators": BigBenchTask("operators", "exact_match", 4),
    "play_dialog_same_or_different": BigBenchTask("play_dialog_same_or_different"),
    "repeat_copy_logic": BigBenchTask("repeat_copy_logic", "exact_match", 64),
    "strange_stories": BigBenchTask("strange_stories"),
    "strategyqa": BigBenchTask("strategyqa"),
    "vitaminc_fact_verification": BigBenchTask("vitaminc_fact_verification"),
    "winowhy": BigBenchTask("winowhy"),
}

# BIG-bench Hard: the 23 tasks minus dyck_languages (algorithm.md §6); colm/datasets/bigbench.gin lines 22-213.
# The official code reads the full BIG-bench task where one exists (e.g. all of logical_deduction's subtasks) and
# the BBH release for the three tasks that are programmatic upstream.
BIGBENCH_HARD = {
    "boolean_expressions": BigBenchTask("boolean_expressions", bbh_choices=("True", "False")),
    "causal_judgement": BigBenchTask("causal_judgment"),
    "date_understanding": BigBenchTask("date_understanding"),
    "disambiguation_qa": BigBenchTask("disambiguation_qa"),
    "formal_fallacies": BigBenchTask("formal_fallacies_syllogisms_negation"),
    "geometric_shapes": BigBenchTask("geometric_shapes", "accuracy_multiple_ans"),
    "hyperbaton": BigBenchTask("hyperbaton"),
    "logical_deduction": BigBenchTask("logical_deduction"),
    "movie_recommendation": BigBenchTask("movie_recommendation"),
    "multistep_arithmetic_two": BigBenchTask("multistep_arithmetic_two", "exact_match", 8, bbh_choices=()),
    "navigate": BigBenchTask("navigate"),
    "object_counting": BigBenchTask("object_counting", "exact_match_multiple_ans", 8),
    "penguins_in_a_table": BigBenchTask("penguins_in_a_table"),
    "reasoning_about_colored_objects": BigBenchTask("reasoning_about_colored_objects", "accuracy_multiple_ans"),
    "ruin_names": BigBenchTask("ruin_names"),
    "salient_translation_error_detection": BigBenchTask("salient_translation_error_detection"),
    "snarks": BigBenchTask("snarks"),
    "sports_understanding": BigBenchTask("sports_understanding"),
    "temporal_sequences": BigBenchTask("temporal_sequences"),
    "tracking_shuffled_objects": BigBenchTask("tracking_shuffled_objects"),
    "web_of_lies": BigBenchTask("web_of_lies", bbh_choices=("Yes", "No")),
    "word_sorting": BigBenchTask("word_sorting", "exact_match", 128),
}


# `max_gen_length` of each FLAN-collection expert's validation (`flan_<expert>_eval`), by official expert name
# (scripts/concatenate.py maps it to its gin dataset): the `D/<NAME>/ZS/EVAL/InterfaceInfo` of every one of the
# 123 FLAN-collection experts (colm/datasets/flanv2_t5xl.gin lines 29-2139). A P3-collection expert decodes its
# dataset's `max_gen_length` (FLAN_P3_SOURCES).
FLAN_MAX_GEN_LENGTH = {
    "Flanv2zsAi2arceasy": 64, "Flanv2zsAi2arcchallenge": 64, "Flanv2zsAlgebralinear1d": 4, "Flanv2zsBoolq": 8,
    "Flanv2zsCoqa": 256, "Flanv2zsDefpronounresolution": 8, "Flanv2zsDrop": 512, "Flanv2zsFixpunct": 256,
    "Flanv2zsGemDart": 128, "Flanv2zsGeme2enlg": 64, "Flanv2zsGemwebnlgen": 128, "Flanv2zsGemwikilinguaen": 512,
    "Flanv2zsGluesst2": 64, "Flanv2zsGluecola": 64, "Flanv2zsGluemnli": 8, "Flanv2zsGlueqnli": 64,
    "Flanv2zsGluestsb": 64, "Flanv2zsGluewnli": 8, "Flanv2zsLambada": 8, "Flanv2zsNaturalquestionsopen": 32,
    "Flanv2zsNewsroom": 512, "Flanv2zsOpenbookqa": 32, "Flanv2zsOpinionabstractidebate": 256,
    "Flanv2zsOpinionabstractrottentomatoes": 512, "Flanv2zsParacrawlenes": 256, "Flanv2zsPiqa": 256,
    "Flanv2zsQuac": 64, "Flanv2zsSentiment140": 64, "Flanv2zsSnli": 32, "Flanv2zsSquad": 64,
    "Flanv2zsSupergluemultirc": 64, "Flanv2zsSupergluerecord": 64, "Flanv2zsTriviaqa": 64, "Flanv2zsTruecase": 256,
    "Flanv2zsUnifiedqascienceinst": 32, "Flanv2zsWordsegment": 256, "Niv2zsTranslation": 512,
    "Niv2zsProgramexecution": 256, "Niv2zsQuestiongeneration": 128, "Niv2zsSentimentanalysis": 128,
    "Niv2zsTextcategorization": 16, "Niv2zsTextmatching": 64, "Niv2zsToxiclanguagedetection": 64,
    "Niv2zsCauseeffectclassification": 64, "Niv2zsInformationextraction": 256, "Niv2zsTextualentailment": 128,
    "Niv2zsWrongcandidategeneration": 256, "Niv2zsNamedentityrecognition": 256, "Niv2zsCommonsenseclassification": 4,
    "Niv2zsFillintheblank": 128, "Niv2zsTextcompletion": 128, "Niv2zsSentencecomposition": 128,
    "Niv2zsTitlegeneration": 128, "Niv2zsLanguageidentification": 8, "Niv2zsQuestionunderstanding": 32,
    "Niv2zsSentenceperturbation": 256, "Niv2zsAnswerabilityclassification": 4, "Niv2zsSummarization": 512,
    "Niv2zsCoreferenceresolution": 16, "Niv2zsTextqualityevaluation": 32, "Niv2zsTexttocode": 512,
    "Niv2zsParaphrasing": 128, "Niv2zsDialoguegeneration": 128, "Niv2zsQuestionrewriting": 128,
    "Niv2zsWordsemantics": 16, "Niv2zsPostagging": 256, "Niv2zsLinguisticprobing": 4, "Niv2zsStorycomposition": 512,
    "Niv2zsSpeakeridentification": 16, "Niv2zsWordanalogy": 8, "Niv2zsDatatotext": 128,
    "Niv2zsStereotypedetection": 8, "Niv2zsNegotiationstrategydetection": 2, "Niv2zsDialogueactrecognition": 8,
    "Niv2zsGenderclassification": 8, "Niv2zsCoherenceclassification": 4, "Niv2zsExplanation": 512,
    "Niv2zsEthicsclassification": 8, "Niv2zsWordrelationclassification": 8, "Niv2zsSentenceordering": 8,
    "Niv2zsAnswerverification": 4, "Niv2zsMathematics": 8, "Niv2zsIntentidentification": 32,
    "Niv2zsKeywordtagging": 16, "Niv2zsCodetotext": 128, "Niv2zsDialoguestatetracking": 8,
    "Niv2zsTextsimplification": 128, "Niv2zsStancedetection": 4, "Niv2zsFactverification": 4,
    "Niv2zsGrammarerrordetection": 512, "Niv2zsSectionclassification": 128, "Niv2zsNumberconversion": 64,
    "Niv2zsStyletransfer": 64, "Niv2zsSpeakerrelationclassification": 4, "Niv2zsIronydetection": 4,
    "Niv2zsQuestiondecomposition": 256, "Niv2zsOverlapextraction": 64, "Niv2zsGrammarerrorcorrection": 512,
    "Niv2zsSpellingerrordetection": 16, "Niv2zsEntitygeneration": 16, "Niv2zsSentenceexpansion": 128,
    "Niv2zsDiscourseconnectiveidentification": 8, "Niv2zsDiscourserelationclassification": 16,
    "Niv2zsPoemgeneration": 512, "Niv2zsEntityrelationclassification": 2, "Niv2zsPunctuationerrordetection": 4,
    "Niv2zsSpamclassification": 4, "Niv2zsPaperreview": 2, "Niv2zsSentencecompression": 128,
    "Niv2zsPrepositionprediction": 2, "Niv2zsMisc": 256, "Flanv2zsQrecc": 128, "Flanv2zsWikidialog": 512,
    "Flanv2zsQreccii": 512, "Flanv2zsWikidialogii": 512, "Flanv2zsAeslc": 512, "Flanv2zsWmt16translatecsen": 512,
    "Flanv2zsWmt16translatedeen": 512, "Flanv2zsWmt16translateruen": 512, "Flanv2zsWmt16translatefien": 512,
    "Flanv2zsWmt16translateroen": 512, "Flanv2zsWmt16translatetren": 512, "Flanv2zsWmt14translatefren": 512,
}


# The training batch size of each of the 166 experts' datasets, by official expert name (scripts/concatenate.py
# maps it to its gin dataset): the `batch_size` of its `D/<NAME>/TRAIN` scope, colm/datasets/p3_t5xl.gin lines
# 21-1127 for the 43 P3-collection experts (which are also the P3 pool's datasets) and
# colm/datasets/flanv2_t5xl.gin lines 23-2133 (`D/<NAME>/ZS/TRAIN`) for the 123 FLAN-collection ones. The
# official evaluator batches a dataset by it (src/procedures/utils/batcher.py:136), also when it computes
# average activations over `D/<NAME>/TRAIN` (colm/experiments/bash_scripts/reinit_router_embedding.sh:103).
TRAIN_BATCH_SIZE = {
    "P3Agnews": 16, "P3Amazonpolarity": 16, "P3Cosmosqa": 16, "P3Samsum": 4, "P3Quartz": 32, "P3Ropes": 16,
    "P3Wikibio": 4, "P3Paws": 32, "P3Wikiqa": 16, "P3Socialiqa": 32, "P3Qasc": 32, "P3Quail": 16, "P3Dream": 4,
    "P3Wiqa": 32, "P3Quarel": 32, "P3Sciq": 16, "P3Quoref": 16, "P3Duorc": 4, "P3Rottentomatoes": 32, "P3Yelp": 16,
    "P3Commongen": 32, "P3Gigaword": 16, "P3Xsum": 8, "P3Mrpc": 32, "P3Qqp": 16, "P3Commonsenseqa": 32, "P3Cose": 32,
    "P3Wikihop": 2, "P3Hotpotqa": 4, "P3Appreviews": 8, "P3Trec": 8, "P3Multinews": 4, "P3Imdb": 16,
    "P3Adversarialqa": 8, "P3Cnndailymail": 4, "P3Dbpedia14": 16, "Flanv2zsAi2arceasy": 16,
    "Flanv2zsAi2arcchallenge": 16, "Flanv2zsAlgebralinear1d": 16, "Flanv2zsBoolq": 16, "Flanv2zsCoqa": 4,
    "Flanv2zsDefpronounresolution": 16, "Flanv2zsDrop": 2, "Flanv2zsFixpunct": 16, "Flanv2zsGemDart": 16,
    "Flanv2zsGeme2enlg": 16, "Flanv2zsGemwebnlgen": 16, "Flanv2zsGemwikilinguaen": 2, "Flanv2zsGluesst2": 16,
    "Flanv2zsGluecola": 16, "Flanv2zsGluemnli": 16, "Flanv2zsGlueqnli": 16, "Flanv2zsGluestsb": 16,
    "Flanv2zsGluewnli": 16, "Flanv2zsLambada": 16, "Flanv2zsNaturalquestionsopen": 16, "Flanv2zsNewsroom": 2,
    "Flanv2zsOpenbookqa": 16, "Flanv2zsOpinionabstractidebate": 4, "Flanv2zsOpinionabstractrottentomatoes": 4,
    "Flanv2zsParacrawlenes": 8, "Flanv2zsPiqa": 4, "Flanv2zsQuac": 2, "Flanv2zsSentiment140": 16, "Flanv2zsSnli": 16,
    "Flanv2zsSquad": 16, "Flanv2zsSupergluemultirc": 16, "Flanv2zsSupergluerecord": 4, "Flanv2zsTriviaqa": 16,
    "Flanv2zsTruecase": 16, "Flanv2zsUnifiedqascienceinst": 16, "Flanv2zsWordsegment": 4, "Niv2zsTranslation": 4,
    "Niv2zsProgramexecution": 4, "Niv2zsQuestiongeneration": 16, "Niv2zsSentimentanalysis": 4,
    "Niv2zsTextcategorization": 4, "Niv2zsTextmatching": 8, "Niv2zsToxiclanguagedetection": 8,
    "Niv2zsCauseeffectclassification": 16, "Niv2zsInformationextraction": 4, "Niv2zsTextualentailment": 16,
    "Niv2zsWrongcandidategeneration": 4, "Niv2zsNamedentityrecognition": 4, "Niv2zsCommonsenseclassification": 16,
    "Niv2zsFillintheblank": 8, "Niv2zsTextcompletion": 8, "Niv2zsSentencecomposition": 4, "Niv2zsTitlegeneration": 8,
    "Niv2zsLanguageidentification": 16, "Niv2zsQuestionunderstanding": 2, "Niv2zsSentenceperturbation": 4,
    "Niv2zsAnswerabilityclassification": 16, "Niv2zsSummarization": 2, "Niv2zsCoreferenceresolution": 2,
    "Niv2zsTextqualityevaluation": 16, "Niv2zsTexttocode": 16, "Niv2zsParaphrasing": 16,
    "Niv2zsDialoguegeneration": 4, "Niv2zsQuestionrewriting": 8, "Niv2zsWordsemantics": 16, "Niv2zsPostagging": 4,
    "Niv2zsLinguisticprobing": 16, "Niv2zsStorycomposition": 4, "Niv2zsSpeakeridentification": 16,
    "Niv2zsWordanalogy": 16, "Niv2zsDatatotext": 4, "Niv2zsStereotypedetection": 16,
    "Niv2zsNegotiationstrategydetection": 16, "Niv2zsDialogueactrecognition": 16, "Niv2zsGenderclassification": 16,
    "Niv2zsCoherenceclassification": 16, "Niv2zsExplanation": 4, "Niv2zsEthicsclassification": 16,
    "Niv2zsWordrelationclassification": 16, "Niv2zsSentenceordering": 16, "Niv2zsAnswerverification": 16,
    "Niv2zsMathematics": 16, "Niv2zsIntentidentification": 16, "Niv2zsKeywordtagging": 16, "Niv2zsCodetotext": 8,
    "Niv2zsDialoguestatetracking": 16, "Niv2zsTextsimplification": 16, "Niv2zsStancedetection": 16,
    "Niv2zsFactverification": 16, "Niv2zsGrammarerrordetection": 4, "Niv2zsSectionclassification": 8,
    "Niv2zsNumberconversion": 16, "Niv2zsStyletransfer": 16, "Niv2zsSpeakerrelationclassification": 16,
    "Niv2zsIronydetection": 16, "Niv2zsQuestiondecomposition": 8, "Niv2zsOverlapextraction": 16,
    "Niv2zsGrammarerrorcorrection": 4, "Niv2zsSpellingerrordetection": 16, "Niv2zsEntitygeneration": 16,
    "Niv2zsSentenceexpansion": 16, "Niv2zsDiscourseconnectiveidentification": 16,
    "Niv2zsDiscourserelationclassification": 16, "Niv2zsPoemgeneration": 8, "Niv2zsEntityrelationclassification": 16,
    "Niv2zsPunctuationerrordetection": 16, "Niv2zsSpamclassification": 16, "Niv2zsPaperreview": 16,
    "Niv2zsSentencecompression": 16, "Niv2zsPrepositionprediction": 16, "Niv2zsMisc": 8, "P3Wscfixed": 16,
    "P3Copa": 16, "P3Hswag": 4, "P3Wic": 16, "P3Racehigh": 2, "P3Racemiddle": 2, "P3Webquestions": 32,
    "Flanv2zsQrecc": 4, "Flanv2zsWikidialog": 2, "Flanv2zsQreccii": 4, "Flanv2zsWikidialogii": 2, "Flanv2zsAeslc": 2,
    "Flanv2zsWmt16translatecsen": 2, "Flanv2zsWmt16translatedeen": 2, "Flanv2zsWmt16translateruen": 2,
    "Flanv2zsWmt16translatefien": 2, "Flanv2zsWmt16translateroen": 2, "Flanv2zsWmt16translatetren": 2,
    "Flanv2zsWmt14translatefren": 2,
}


def bigbench_spec(task: str) -> Optional[BigBenchTask]:
  """The official configuration of a BIG-bench task path ("name[/subtask]") read from BIG-bench's JSON, or
  None for a task the paper does not evaluate."""
  name = task.split("/")[0]
  specs = [*BIGBENCH_LITE.values(), *BIGBENCH_HARD.values()]
  return next((s for s in specs if s.path == name and s.bbh_choices is None), None)


def generation_length(name: str) -> int:
  """Maximum number of generated tokens for a task, as the official gin files set `max_gen_length`:
  colm/datasets/bigbench.gin for `bbl_<task>`, `bbh_<task>`, `bigbench/<task>` and `bigbench:<task>`,
  colm/datasets/p3_t5xl.gin for `p3_<key>_eval` and a P3-collection expert's `flan_<expert>_eval`,
  `FLAN_MAX_GEN_LENGTH` for a FLAN-collection expert's; else the official default 20."""
  prefix, _, rest = name.partition("_")
  tables = {"bbl": BIGBENCH_LITE, "bbh": BIGBENCH_HARD,
            "p3": {f"{s.key}_eval": s for s in P3_HELD_IN},
            "flan": {f"{expert}_eval": s for expert, s in FLAN_P3_SOURCES.items()}}
  if prefix in tables and rest in tables[prefix]:
    spec = tables[prefix][rest]
  elif prefix == "flan" and rest.endswith("_eval"):
    return FLAN_MAX_GEN_LENGTH.get(rest[:-len("_eval")], DEFAULT_MAX_GEN_LENGTH)
  elif name.startswith(("bigbench/", "bigbench:")):  # a BIG-bench path, or its seqio name (bigbench.seqio_name)
    spec = bigbench_spec(name[len("bigbench/"):].replace(".", "/"))
  else:
    spec = None
  return (spec.max_gen_length if spec else None) or DEFAULT_MAX_GEN_LENGTH


def train_batch_size(name: str) -> Optional[int]:
  """The official training batch size of the dataset of training task `name` (`TRAIN_BATCH_SIZE`): a P3 pool
  task `p3_<key>` has that of the P3-collection expert on the same dataset, a FLAN pool task `flan_<expert>` its
  expert's; None for any other task (a user's dataset)."""
  prefix, _, rest = name.partition("_")
  experts = {"p3": {s.key: expert for expert, s in FLAN_P3_SOURCES.items()}.get(rest),
             "flan": rest}
  return TRAIN_BATCH_SIZE.get(experts.get(prefix))


_OVERRIDES: dict = {}


class MissingDataError(FileNotFoundError):
  """Data that a task needs is not where it was looked for; the message says what, where and how."""


def missing(what: str, where: str, how: str) -> MissingDataError:
  return MissingDataError(f"missing data: {what}; expected at {where}; to obtain it: {how}")


def get_dir(kind: str, required: bool = True) -> Optional[str]:
  """The directory of `kind` (a key of DIR_KINDS): `using_dirs` value, else its environment variable."""
  env, what, how = DIR_KINDS[kind]
  value = _OVERRIDES.get(kind) or os.environ.get(env)
  if value is None and required:
    raise missing(what, f"--{kind} DIR or ${env} (neither is set)", how)
  return value


@contextlib.contextmanager
def using_dirs(**dirs):
  """Sets data directories (keys of DIR_KINDS; None values are ignored) for the enclosed block."""
  unknown = set(dirs) - set(DIR_KINDS)
  if unknown:
    raise TypeError(f"unknown data directories {sorted(unknown)}; known: {sorted(DIR_KINDS)}")
  saved = dict(_OVERRIDES)
  _OVERRIDES.update({k: os.fspath(v) for k, v in dirs.items() if v is not None})
  try:
    yield
  finally:
    _OVERRIDES.clear()
    _OVERRIDES.update(saved)


def spm_path() -> str:
  return os.environ.get("PHATGOOSE_SPM_PATH", T5_SPM_PATH)
