"""The FLAN expert pool (166 experts) and its data as the official PHATGOOSE code reads them (algorithm.md §6).

The 166 experts, their names and order are the official `full_dataset_dict` of `scripts/concatenate.py`
(p3_dataset_dict lines 8-45, flanv2_dataset_dict 47-84, niv2_dataset_dict 86-163, add1_dataset_dict 165-185), pinned
in `FLAN_EXPERTS` as (name, collection, path). The official code trains expert <NAME> on the gin dataset
`D/<DATASET>/TRAIN` and validates it on `D/<DATASET>/EVAL`, <DATASET> being its name's value in that dict
(colm/experiments/bash_scripts/train_single_task_loralinear.sh line 50).

The 43 collection "P3" experts train on a promptsource dataset (`path`; official `P3Dataset`,
colm/datasets/p3_t5xl.gin): their tasks `flan_<expert>` and `flan_<expert>_eval` serve exactly the examples of the
P3 pool's `p3_<key>` and `p3_<key>_eval` (`p3.train_examples`, `p3.eval_examples` of the dataset
`sources.FLAN_P3_SOURCES[expert]`): training on every template of the train split (at most 500,000 pairs), the
checkpoint selected on the EVAL split's original-task templates, by rank-classification accuracy where the EVAL
is `interface = "mc"` and by the generative metric otherwise (read from the data and templates directories when a
dataset is requested).

The other 123 experts train on a FLAN collection subset (official `FlanDataset` over
`FLANV2/<collection>/<path>`, colm/datasets/flanv2_t5xl.gin), a Natural Instructions v2 category for collection
"NIV2" (`NIV2_CATEGORIES`). Their rows are rows of the released collection (Hugging Face Open-Orca/FLAN:
`inputs`, `targets`, `_task_name`, `_template_type`; or `task_name` / `template_type`) in one JSONL file per
expert, `<flan_dir>/<expert>.jsonl`; a file named after a P3-collection expert is refused (those experts never
read the FLAN directory). Their data follow `FlanDataset` (src/data/flat.py lines 221-273): zero-shot rows only
(template type containing "zs_opt" or "zs_noopt"), rows with an empty input or target dropped, then a
`np.random.RandomState(1234).choice(n, n, replace=False)` permutation whose first min(int(0.1 n), 10,000) rows
are the validation split and the rest the train split; training keeps at most 500,000 of them, drawn by
`np.random.default_rng(42)` (lines 195-203; flanv2_t5xl.gin TRAIN `max_examples_per_dataset`). Such an expert's
checkpoint is selected on its validation split by ROUGE-L of greedy generations of at most
`sources.generation_length` tokens (algorithm.md §2; flanv2_t5xl.gin `D/<NAME>/ZS/EVAL`: `interface = "gen"`,
`metrics = ["rouge"]`): the evaluation task `flan_<expert>_eval`.

The pool contains WSC, COPA, HellaSwag and WiC, so evaluating it on the T0 held-out datasets is refused
(`check_evaluation`).
"""
import pathlib
import re
from typing import Optional

import numpy as np
import seqio

from phatgoose_jax.tasks import p3, readers, seqio_tasks, sources

POOL = "flan"
MIXTURE = "flan_166"
SPLIT_SEED = 1234  # src/data/flat.py line 262
VALIDATION_FRACTION = 0.1  # flat.py line 267
MAX_VALIDATION_ROWS = 10_000  # flat.py line 267
MAX_TRAIN_ROWS = 500_000  # colm/datasets/flanv2_t5xl.gin: TRAIN max_examples_per_dataset
ZERO_SHOT_TEMPLATE_TYPES = ("zs_opt", "zs_noopt")
VALIDATION_METRIC = "rouge_l"  # flanv2_t5xl.gin: every ZS/EVAL FlanDataset has metrics = ["rouge"]

# (official name, collection, path): 36 P3, 36 Flan 2021, 75 NIv2 categories, then 19 more (7 P3,
# 4 Dialog, 8 Flan 2021), in the official order.
FLAN_EXPERTS = (
    ("P3Agnews", "P3", "ag_news"),
    ("P3Amazonpolarity", "P3", "amazon_polarity"),
    ("P3Cosmosqa", "P3", "cosmos_qa"),
    ("P3Samsum", "P3", "samsum"),
    ("P3Quartz", "P3", "quartz"),
    ("P3Ropes", "P3", "ropes"),
    ("P3Wikibio", "P3", "wiki_bio"),
    ("P3Paws", "P3", "paws/labeled_final"),
    ("P3Wikiqa", "P3", "wiki_qa"),
    ("P3Socialiqa", "P3", "social_i_qa"),
    ("P3Qasc", "P3", "qasc"),
    ("P3Quail", "P3", "quail"),
    ("P3Dream", "P3", "dream"),
    ("P3Wiqa", "P3", "wiqa"),
    ("P3Quarel", "P3", "quarel"),
    ("P3Sciq", "P3", "sciq"),
    ("P3Quoref", "P3", "quoref"),
    ("P3Duorc", "P3", "duorc/ParaphraseRC"),
    ("P3Rottentomatoes", "P3", "rotten_tomatoes"),
    ("P3Yelp", "P3", "yelp_review_full"),
    ("P3Commongen", "P3", "common_gen"),
    ("P3Gigaword", "P3", "gigaword"),
    ("P3Xsum", "P3", "xsum"),
    ("P3Mrpc", "P3", "glue/mrpc"),
    ("P3Qqp", "P3", "glue/qqp"),
    ("P3Commonsenseqa", "P3", "commonsense_qa"),
    ("P3Cose", "P3", "cos_e/v1.11"),
    ("P3Wikihop", "P3", "wiki_hop/original"),
    ("P3Hotpotqa", "P3", "hotpot_qa/fullwiki"),
    ("P3Appreviews", "P3", "app_reviews"),
    ("P3Trec", "P3", "trec"),
    ("P3Multinews", "P3", "multi_news"),
    ("P3Imdb", "P3", "imdb"),
    ("P3Adversarialqa", "P3", "adversarial_qa/adversarialQA"),
    ("P3Cnndailymail", "P3", "cnn_dailymail/3.0.0"),
    ("P3Dbpedia14", "P3", "dbpedia_14"),
    ("Flanv2zsAi2arceasy", "Flan2021", "ai2_arc/ARC-Easy:1.0.0"),
    ("Flanv2zsAi2arcchallenge", "Flan2021", "ai2_arc/ARC-Challenge:1.0.0"),
    ("Flanv2zsAlgebralinear1d", "Flan2021", "algebra__linear_1d:1.0.0"),
    ("Flanv2zsBoolq", "Flan2021", "bool_q:1.0.0"),
    ("Flanv2zsCoqa", "Flan2021", "coqa:1.0.0"),
    ("Flanv2zsDefpronounresolution", "Flan2021", "definite_pronoun_resolution:1.1.0"),
    ("Flanv2zsDrop", "Flan2021", "drop:2.0.0"),
    ("Flanv2zsFixpunct", "Flan2021", "fix_punct"),
    ("Flanv2zsGemDart", "Flan2021", "gem/dart:1.1.0"),
    ("Flanv2zsGeme2enlg", "Flan2021", "gem/e2e_nlg:1.1.0"),
    ("Flanv2zsGemwebnlgen", "Flan2021", "gem/web_nlg_en:1.1.0"),
    ("Flanv2zsGemwikilinguaen", "Flan2021", "gem/wiki_lingua_english_en:1.1.0"),
    ("Flanv2zsGluesst2", "Flan2021", "glue/sst2:2.0.0"),
    ("Flanv2zsGluecola", "Flan2021", "glue/cola:2.0.0"),
    ("Flanv2zsGluemnli", "Flan2021", "glue/mnli:2.0.0"),
    ("Flanv2zsGlueqnli", "Flan2021", "glue/qnli:2.0.0"),
    ("Flanv2zsGluestsb", "Flan2021", "glue/stsb:2.0.0"),
    ("Flanv2zsGluewnli", "Flan2021", "glue/wnli:2.0.0"),
    ("Flanv2zsLambada", "Flan2021", "lambada:1.0.0"),
    ("Flanv2zsNaturalquestionsopen", "Flan2021", "natural_questions_open:1.0.0"),
    ("Flanv2zsNewsroom", "Flan2021", "newsroom:1.0.0"),
    ("Flanv2zsOpenbookqa", "Flan2021", "openbookqa:0.1.0"),
    ("Flanv2zsOpinionabstractidebate", "Flan2021", "opinion_abstracts_idebate"),
    ("Flanv2zsOpinionabstractrottentomatoes", "Flan2021", "opinion_abstracts_rotten_tomatoes"),
    ("Flanv2zsParacrawlenes", "Flan2021", "para_crawl_enes"),
    ("Flanv2zsPiqa", "Flan2021", "piqa:1.0.0"),
    ("Flanv2zsQuac", "Flan2021", "quac:1.0.0"),
    ("Flanv2zsSentiment140", "Flan2021", "sentiment140:1.0.0"),
    ("Flanv2zsSnli", "Flan2021", "snli:1.1.0"),
    ("Flanv2zsSquad", "Flan2021", "squad/v2.0:3.0.0"),
    ("Flanv2zsSupergluemultirc", "Flan2021", "super_glue/multirc:1.0.2"),
    ("Flanv2zsSupergluerecord", "Flan2021", "super_glue/record:1.0.2"),
    ("Flanv2zsTriviaqa", "Flan2021", "trivia_qa/rc:1.1.0"),
    ("Flanv2zsTruecase", "Flan2021", "true_case"),
    ("Flanv2zsUnifiedqascienceinst", "Flan2021", "unified_qa_science_inst"),
    ("Flanv2zsWordsegment", "Flan2021", "word_segment"),
    ("Niv2zsTranslation", "NIV2", "Translation"),
    ("Niv2zsProgramexecution", "NIV2", "Program Execution"),
    ("Niv2zsQuestiongeneration", "NIV2", "Question Generation"),
    ("Niv2zsSentimentanalysis", "NIV2", "Sentiment Analysis"),
    ("Niv2zsTextcategorization", "NIV2", "Text Categorization"),
    ("Niv2zsTextmatching", "NIV2", "Text Matching"),
    ("Niv2zsToxiclanguagedetection", "NIV2", "Toxic Language Detection"),
    ("Niv2zsCauseeffectclassification", "NIV2", "Cause Effect Classification"),
    ("Niv2zsInformationextraction", "NIV2", "Information Extraction"),
    ("Niv2zsTextualentailment", "NIV2", "Textual Entailment"),
    ("Niv2zsWrongcandidategeneration", "NIV2", "Wrong Candidate Generation"),
    ("Niv2zsNamedentityrecognition", "NIV2", "Named Entity Recognition"),
    ("Niv2zsCommonsenseclassification", "NIV2", "Commonsense Classification"),
    ("Niv2zsFillintheblank", "NIV2", "Fill in The Blank"),
    ("Niv2zsTextcompletion", "NIV2", "Text Completion"),
    ("Niv2zsSentencecomposition", "NIV2", "Sentence Composition"),
    ("Niv2zsTitlegeneration", "NIV2", "Title Generation"),
    ("Niv2zsLanguageidentification", "NIV2", "Language Identification"),
    ("Niv2zsQuestionunderstanding", "NIV2", "Question Understanding"),
    ("Niv2zsSentenceperturbation", "NIV2", "Sentence Perturbation"),
    ("Niv2zsAnswerabilityclassification", "NIV2", "Answerability Classification"),
    ("Niv2zsSummarization", "NIV2", "Summarization"),
    ("Niv2zsCoreferenceresolution", "NIV2", "Coreference Resolution"),
    ("Niv2zsTextqualityevaluation", "NIV2", "Text Quality Evaluation"),
    ("Niv2zsTexttocode", "NIV2", "Text to Code"),
    ("Niv2zsParaphrasing", "NIV2", "Paraphrasing"),
    ("Niv2zsDialoguegeneration", "NIV2", "Dialogue Generation"),
    ("Niv2zsQuestionrewriting", "NIV2", "Question Rewriting"),
    ("Niv2zsWordsemantics", "NIV2", "Word Semantics"),
    ("Niv2zsPostagging", "NIV2", "Pos Tagging"),
    ("Niv2zsLinguisticprobing", "NIV2", "Linguistic Probing"),
    ("Niv2zsStorycomposition", "NIV2", "Story Composition"),
    ("Niv2zsSpeakeridentification", "NIV2", "Speaker Identification"),
    ("Niv2zsWordanalogy", "NIV2", "Word Analogy"),
    ("Niv2zsDatatotext", "NIV2", "Data to Text"),
    ("Niv2zsStereotypedetection", "NIV2", "Stereotype Detection"),
    ("Niv2zsNegotiationstrategydetection", "NIV2", "Negotiation Strategy Detection"),
    ("Niv2zsDialogueactrecognition", "NIV2", "Dialogue Act Recognition"),
    ("Niv2zsGenderclassification", "NIV2", "Gender Classification"),
    ("Niv2zsCoherenceclassification", "NIV2", "Coherence Classification"),
    ("Niv2zsExplanation", "NIV2", "Explanation"),
    ("Niv2zsEthicsclassification", "NIV2", "Ethics Classification"),
    ("Niv2zsWordrelationclassification", "NIV2", "Word Relation Classification"),
    ("Niv2zsSentenceordering", "NIV2", "Sentence Ordering"),
    ("Niv2zsAnswerverification", "NIV2", "Answer Verification"),
    ("Niv2zsMathematics", "NIV2", "Mathematics"),
    ("Niv2zsIntentidentification", "NIV2", "Intent Identification"),
    ("Niv2zsKeywordtagging", "NIV2", "Keyword Tagging"),
    ("Niv2zsCodetotext", "NIV2", "Code to Text"),
    ("Niv2zsDialoguestatetracking", "NIV2", "Dialogue State Tracking"),
    ("Niv2zsTextsimplification", "NIV2", "Text Simplification"),
    ("Niv2zsStancedetection", "NIV2", "Stance Detection"),
    ("Niv2zsFactverification", "NIV2", "Fact Verification"),
    ("Niv2zsGrammarerrordetection", "NIV2", "Grammar Error Detection"),
    ("Niv2zsSectionclassification", "NIV2", "Section Classification"),
    ("Niv2zsNumberconversion", "NIV2", "Number Conversion"),
    ("Niv2zsStyletransfer", "NIV2", "Style Transfer"),
    ("Niv2zsSpeakerrelationclassification", "NIV2", "Speaker Relation Classification"),
    ("Niv2zsIronydetection", "NIV2", "Irony Detection"),
    ("Niv2zsQuestiondecomposition", "NIV2", "Question Decomposition"),
    ("Niv2zsOverlapextraction", "NIV2", "Overlap Extraction"),
    ("Niv2zsGrammarerrorcorrection", "NIV2", "Grammar Error Correction"),
    ("Niv2zsSpellingerrordetection", "NIV2", "Spelling Error Detection"),
    ("Niv2zsEntitygeneration", "NIV2", "Entity Generation"),
    ("Niv2zsSentenceexpansion", "NIV2", "Sentence Expansion"),
    ("Niv2zsDiscourseconnectiveidentification", "NIV2", "Discourse Connective Identification"),
    ("Niv2zsDiscourserelationclassification", "NIV2", "Discourse Relation Classification"),
    ("Niv2zsPoemgeneration", "NIV2", "Poem Generation"),
    ("Niv2zsEntityrelationclassification", "NIV2", "Entity Relation Classification"),
    ("Niv2zsPunctuationerrordetection", "NIV2", "Punctuation Error Detection"),
    ("Niv2zsSpamclassification", "NIV2", "Spam Classification"),
    ("Niv2zsPaperreview", "NIV2", "Paper Review"),
    ("Niv2zsSentencecompression", "NIV2", "Sentence Compression"),
    ("Niv2zsPrepositionprediction", "NIV2", "Preposition Prediction"),
    ("Niv2zsMisc", "NIV2", "Misc."),
    ("P3Wscfixed", "P3", "super_glue/wsc.fixed"),
    ("P3Copa", "P3", "super_glue/copa"),
    ("P3Hswag", "P3", "hellaswag"),
    ("P3Wic", "P3", "super_glue/wic"),
    ("P3Racehigh", "P3", "race/high"),
    ("P3Racemiddle", "P3", "race/middle"),
    ("P3Webquestions", "P3", "web_questions"),
    ("Flanv2zsQrecc", "Dialog", "qrecc"),
    ("Flanv2zsWikidialog", "Dialog", "wiki_dialog"),
    ("Flanv2zsQreccii", "Dialog", "qrecc_ii"),
    ("Flanv2zsWikidialogii", "Dialog", "wiki_dialog_ii"),
    ("Flanv2zsAeslc", "Flan2021", "aeslc:1.0.0"),
    ("Flanv2zsWmt16translatecsen", "Flan2021", "wmt16_translate/cs-en:1.0.0"),
    ("Flanv2zsWmt16translatedeen", "Flan2021", "wmt16_translate/de-en:1.0.0"),
    ("Flanv2zsWmt16translateruen", "Flan2021", "wmt16_translate/ru-en:1.0.0"),
    ("Flanv2zsWmt16translatefien", "Flan2021", "wmt16_translate/fi-en:1.0.0"),
    ("Flanv2zsWmt16translateroen", "Flan2021", "wmt16_translate/ro-en:1.0.0"),
    ("Flanv2zsWmt16translatetren", "Flan2021", "wmt16_translate/tr-en:1.0.0"),
    ("Flanv2zsWmt14translatefren", "Flan2021", "wmt14_translate/fr-en:1.0.0"),
)

NIV2_CATEGORIES = {name: path for name, collection, path in FLAN_EXPERTS if collection == "NIV2"}


def _field(row: dict, name: str):
  return row.get(f"_{name}", row.get(name))


def zero_shot_rows(path) -> list:
  """{inputs, targets} of one expert file's zero-shot rows with a non-empty input and target, in file order."""
  rows = []
  for row in readers.read_jsonl(path):
    template_type = str(_field(row, "template_type"))
    if any(kind in template_type for kind in ZERO_SHOT_TEMPLATE_TYPES) and row["inputs"].strip() and \
        row["targets"].strip():
      rows.append({"inputs": row["inputs"], "targets": row["targets"]})
  return rows


def split_indices(num_rows: int, split: str, cap: int) -> list:
  """Row indices of the official `split` ("train" or "validation") of an expert's `num_rows` rows, the train
  split under `max_examples_per_dataset = cap` (src/data/flat.py:195-203)."""
  if split not in ("train", "validation"):
    raise ValueError(f"a FLAN expert has splits 'train' and 'validation', not {split!r}")
  order = np.random.RandomState(SPLIT_SEED).choice(num_rows, size=num_rows, replace=False)
  num_validation = min(int(num_rows * VALIDATION_FRACTION), MAX_VALIDATION_ROWS)
  if split == "validation":
    return order[:num_validation].tolist()
  train = order[num_validation:]
  return train[seqio_tasks.drawn(len(train), cap)].tolist()


def split_examples(path, split: str, cap: Optional[int] = None) -> list:
  """{inputs, targets} of one expert's `split` (the train split under `max_examples_per_dataset = cap`, default
  the training cap `MAX_TRAIN_ROWS`), in the official order."""
  rows = zero_shot_rows(path)
  return [rows[i] for i in split_indices(len(rows), split, MAX_TRAIN_ROWS if cap is None else cap)]


def validation_examples(path) -> list:
  """One expert's validation split as generative evaluation examples scored by ROUGE-L against the target."""
  return [dict(inputs=row["inputs"], target=row["targets"], choices=[], correct=[], references=[row["targets"]],
               metric=VALIDATION_METRIC) for row in split_examples(path, "validation")]


def task_name(path) -> str:
  return "flan_" + re.sub(r"[^\w.:]", "_", pathlib.Path(path).stem)


def expert_files(flan_dir=None) -> list:
  """The FLAN-collection experts' files `<flan_dir>/*.jsonl`, sorted; none named after a P3-collection expert."""
  root = pathlib.Path(flan_dir or sources.get_dir("flan_dir"))
  files = sorted(root.glob("*.jsonl"))
  if not files:
    raise sources.missing("the FLAN collection", f"{root}/<expert>.jsonl", sources.DIR_KINDS["flan_dir"][2])
  p3_tasks = {f"flan_{expert}" for expert in sources.FLAN_P3_SOURCES}
  p3_named = [path.name for path in files if task_name(path) in p3_tasks]
  if p3_named:
    raise ValueError(f"{root} holds {', '.join(p3_named)}, named after P3-collection experts, which train and "
                     f"validate on their P3 datasets, not on FLAN files (algorithm.md §6); remove these files")
  return files


def register_file_expert(path) -> str:
  """Registers a FLAN-collection expert's task `flan_<expert>` (splits "train" and "validation") and its
  validation task `flan_<expert>_eval` (`validation_examples`). Returns the training task name."""
  source = seqio_tasks.text_source(lambda split, p=path: split_examples(p, split), seqio_tasks.TRAIN_SIGNATURE,
                                   splits=("train", "validation"),
                                   sampled_fn=lambda split, count, p=path: split_examples(p, split, count))
  name = seqio_tasks.add_task(task_name(path), source, evaluation=False).name
  validation = seqio_tasks.text_source(lambda split, p=path: validation_examples(p), seqio_tasks.EVAL_SIGNATURE,
                                       splits=("validation",))
  seqio_tasks.add_task(name + "_eval", validation, evaluation=True)
  return name


def register_pool(flan_dir=None) -> list:
  """Registers the 43 P3-collection experts' tasks over their P3 datasets (`p3.register_dataset`), one
  FLAN-collection expert per file of `flan_dir` (`register_file_expert`) and, with the 123 files of the full
  pool, the mixture `flan_166`.

  Lists the directory (this is called on request, never at import); reads no data. Returns the training task
  names."""
  files = expert_files(flan_dir)
  names = [p3.register_dataset(f"flan_{expert}", source) for expert, source in sources.FLAN_P3_SOURCES.items()]
  names += [register_file_expert(path) for path in files]
  num_files = len(FLAN_EXPERTS) - len(sources.FLAN_P3_SOURCES)
  if len(files) != num_files:
    raise ValueError(f"the FLAN pool has {len(FLAN_EXPERTS)} experts, {len(sources.FLAN_P3_SOURCES)} on P3 datasets "
                     f"and {num_files} on FLAN-collection files (algorithm.md §6); {len(files)} expert files found; "
                     f"the {len(names)} tasks are registered, the mixture {MIXTURE} is not")
  seqio_tasks.add_mixture(MIXTURE, names)
  return names


def _task_names(name: str) -> set:
  if name in seqio.MixtureRegistry.names():
    return {task.name for task in seqio.get_mixture_or_task(name).tasks}
  return {name}


def pool_of(datasets) -> Optional[str]:
  """"flan" when any expert was trained on a FLAN-pool task (`flan_<expert>`), else None."""
  return POOL if any(str(d or "").startswith("flan_") for d in datasets) else None


def check_evaluation(expert_pool: Optional[str], name: str) -> None:
  """Raises ValueError when the FLAN pool would be evaluated on a T0 held-out task (algorithm.md §6)."""
  if expert_pool != POOL:
    return
  held_out = {f"t0_{s.key}" for s in sources.T0_HELD_OUT}
  leaked = sorted(_task_names(name) & held_out)
  if leaked:
    raise ValueError(f"the FLAN expert pool contains WSC, COPA, HellaSwag and WiC and must not be evaluated on "
                     f"T0 held-out tasks (algorithm.md §6): {name} includes {', '.join(leaked)}")
