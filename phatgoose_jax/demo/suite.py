"""The demo's synthetic suite: six character-level string skills, and held-out tasks that compose two.

Design (fixed from the paper's hypothesis before any result was seen; not tuned toward a ranking).
PHATGOOSE's claim is that gates trained post-hoc let a router send EACH TOKEN to the expert that knows
what that token needs, so a collection of specialists generalizes zero-shot to tasks needing several of
their skills inside one example, where routing a whole example to one expert cannot.

* Words are random lowercase strings of 3-5 letters with at least one vowel and one consonant.
* Held-in tasks (one expert + one gate each), named `demo_<skill>`: an input is one or two spans
  `<skill>: <word>` joined by ` | `, all with the task's own skill keyword; the target is the spans'
  outputs joined by a space (`reverse: cat | reverse: dog` -> `tac god`). Skills:
    reverse  `cat` -> `tac`            upper    `cat` -> `CAT`
    shift    `cat` -> `dbu` (+1, z->a)  double   `cat` -> `ccaatt`
    novowel  `cat` -> `ct`             mask     `cat` -> `c*t` (vowels -> `*`)
  Two-span held-in inputs make the ` | ` format familiar, so a held-out failure measures skill
  composition, not format novelty.
* Held-out tasks, named `demo_<a>_<b>`: exactly two spans with two DIFFERENT skills, in random order
  (`reverse: cat | upper: dog` -> `tac DOG`). Pairs: (reverse, upper), (shift, double), (novowel, mask);
  each skill appears in exactly one pair. Per-token routing can send each span's tokens to its own
  skill's expert; a per-example router (retrieval, oracle) installs one expert for the whole example.
  Their examples never reach expert, gate, average-activation or retrieval building: `is_held_out`
  recognises them and the pipeline's guard refuses them.
* Oracle: for a held-out task, the expert of its FIRST listed skill (`reverse` for `demo_reverse_upper`):
  the expert of the example's own "family", as far as a single expert can be one.
* Scoring: rank classification (length-normalised log-likelihood, algorithm.md §6) over five candidates: the
  correct output, the first span's skill applied to both spans, the second span's skill applied to both,
  the two skills swapped between spans, and both words copied unchanged (chance = 0.2). The distractors
  are exactly what a model applying one skill to the whole example, or none, would write, so the score
  directly measures per-span skill choice; exact match of greedy generation, which needs every character
  right, is near zero for every method of a model this small and would hide the differences.
* Base pretraining data (`demo_pretrain`): the same span format with random keywords (never a skill name)
  and random strings over [a-zA-Z*] of 3-10 characters, target = the strings copied. The base learns to
  read and write bytes and the format, but no skill.
"""
import dataclasses
import string
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import seqio

from phatgoose_jax import tasks
from phatgoose_jax.tasks import seqio_tasks

VOWELS = frozenset("aeiou")


def _shift(word: str) -> str:
  return "".join(chr((ord(c) - ord("a") + 1) % 26 + ord("a")) for c in word)


SKILLS: Dict[str, Callable[[str], str]] = {
    "reverse": lambda w: w[::-1],
    "upper": str.upper,
    "shift": _shift,
    "double": lambda w: "".join(c * 2 for c in w),
    "novowel": lambda w: "".join(c for c in w if c not in VOWELS),
    "mask": lambda w: "".join("*" if c in VOWELS else c for c in w),
}
HELD_OUT_PAIRS: Tuple[Tuple[str, str], ...] = (("reverse", "upper"), ("shift", "double"), ("novowel", "mask"))
PREFIX = "demo_"
SEPARATOR = " | "
PRETRAIN_TASK = f"{PREFIX}pretrain"
HELD_IN_MIXTURE = f"{PREFIX}held_in"
HELD_OUT_MIXTURE = f"{PREFIX}held_out"
HELD_IN_EVAL_MIXTURE = f"{PREFIX}held_in_eval"
EVAL_MIXTURE = f"{PREFIX}eval"  # held-in validation and held-out tasks: one pass of a method over both


def held_in_task(skill: str) -> str:
  return f"{PREFIX}{skill}"


def held_out_task(pair: Sequence[str]) -> str:
  return f"{PREFIX}{pair[0]}_{pair[1]}"


HELD_IN_TASKS = tuple(held_in_task(s) for s in SKILLS)
HELD_OUT_TASKS = tuple(held_out_task(p) for p in HELD_OUT_PAIRS)
HELD_IN_EVAL_TASKS = tuple(f"{t}_eval" for t in HELD_IN_TASKS)
EXPERT_NAMES = tuple(SKILLS)
POOL_GROUP = 3  # `tasks.register_pool`: the library lists the experts in HELD_IN_TASKS order, however added


def oracle_skill(task: str) -> str:
  """The held-out task's oracle expert: its first listed skill's."""
  return dict(zip(HELD_OUT_TASKS, HELD_OUT_PAIRS))[task][0]


def oracle_expert(task: str) -> str:
  """The held-in task whose expert is the oracle for a held-out or held-in evaluation task."""
  return task[:-len("_eval")] if task in HELD_IN_EVAL_TASKS else held_in_task(oracle_skill(task))


@dataclasses.dataclass(frozen=True)
class SuiteSizes:
  """How many examples each split of each task holds; `held_in_eval`: each held-in evaluation task (`_eval`,
  the first examples of its stream; None: `validation`)."""
  train: int = 4000
  validation: int = 200
  held_out: int = 100
  held_in_eval: Optional[int] = None

  @property
  def held_in_eval_count(self) -> int:
    return self.validation if self.held_in_eval is None else self.held_in_eval


def random_word(rng: np.random.Generator) -> str:
  """3-5 lowercase letters with at least one vowel and one consonant."""
  while True:
    word = "".join(rng.choice(list(string.ascii_lowercase), rng.integers(3, 6)))
    if VOWELS & set(word) and set(word) - VOWELS:
      return word


def render(spans: Sequence[Tuple[str, str]]) -> str:
  """`<keyword>: <text> | <keyword>: <text>`."""
  return SEPARATOR.join(f"{keyword}: {text}" for keyword, text in spans)


def apply_skills(skills: Sequence[str], words: Sequence[str]) -> str:
  return " ".join(SKILLS[s](w) for s, w in zip(skills, words))


def skills_in(inputs: str) -> List[str]:
  """The skill keywords of an input's spans, in order (non-skill keywords are skipped)."""
  keywords = [span.split(":", 1)[0].strip() for span in inputs.split(SEPARATOR)]
  return [k for k in keywords if k in SKILLS]


def is_held_out(inputs: str) -> bool:
  """True for a held-out-style input: spans of two different skills."""
  return len(set(skills_in(inputs))) > 1


def held_in_example(skill: str, rng: np.random.Generator) -> dict:
  words = [random_word(rng) for _ in range(rng.integers(1, 3))]
  return {"inputs": render([(skill, w) for w in words]), "targets": apply_skills([skill] * len(words), words)}


def candidates(skills: Sequence[str], words: Sequence[str]) -> List[str]:
  """Correct output, first skill on both, second on both, skills swapped, copy (see the module docstring)."""
  first, second = skills
  return [apply_skills(skills, words), apply_skills([first, first], words),
          apply_skills([second, second], words), apply_skills([second, first], words), " ".join(words)]


def held_out_example(pair: Sequence[str], rng: np.random.Generator) -> dict:
  """Two spans of the pair's skills in random order, with five distinct rank-classification candidates."""
  while True:
    skills = list(pair) if rng.random() < 0.5 else list(pair[::-1])
    words = [random_word(rng), random_word(rng)]
    choices = candidates(skills, words)
    if len(set(choices)) == len(choices):
      break
  return eval_record(render(list(zip(skills, words))), choices, 0)


def eval_record(inputs: str, choices: List[str], answer: int) -> dict:
  """An evaluation example in the task registries' schema (rank classification)."""
  return {"inputs": inputs, "target": choices[answer], "choices": choices,
          "correct": [i == answer for i in range(len(choices))], "references": [choices[answer]],
          "metric": "accuracy"}


def held_in_eval_example(skill: str, rng: np.random.Generator) -> dict:
  """A held-in example scored over every skill's output and the copy (duplicates dropped)."""
  example = held_in_example(skill, rng)
  words = [span.split(": ", 1)[1] for span in example["inputs"].split(SEPARATOR)]
  others = [apply_skills([s] * len(words), words) for s in SKILLS if s != skill] + [" ".join(words)]
  choices = [example["targets"]] + sorted(set(others) - {example["targets"]})
  return eval_record(example["inputs"], choices, 0)


def pretrain_example(rng: np.random.Generator) -> dict:
  """Random keyword(s) and random [a-zA-Z*] strings; the target copies the strings."""
  alphabet = list(string.ascii_letters + "*")
  spans = []
  for _ in range(rng.integers(1, 3)):
    keyword = "".join(rng.choice(list(string.ascii_lowercase), rng.integers(3, 8)))
    while keyword in SKILLS:
      keyword = "".join(rng.choice(list(string.ascii_lowercase), rng.integers(3, 8)))
    spans.append((keyword, "".join(rng.choice(alphabet, rng.integers(3, 11)))))
  return {"inputs": render(spans), "targets": " ".join(text for _, text in spans)}


def stream(seed: int, *keys) -> np.random.Generator:
  """An independent stream per (seed, task, split): the data never depends on what else was drawn."""
  return np.random.default_rng([seed, *[sum(ord(c) * 31 ** i for i, c in enumerate(k)) % 2**31 for k in keys]])


def train_examples(task: str, split: str, seed: int, sizes: SuiteSizes) -> List[dict]:
  """{inputs, targets} of a held-in or the pretraining task."""
  rng = stream(seed, task, split)
  count = sizes.train if split == "train" else sizes.validation
  if task == PRETRAIN_TASK:
    return [pretrain_example(rng) for _ in range(count)]
  skill = task[len(PREFIX):]
  return [held_in_example(skill, rng) for _ in range(count)]


def eval_examples(task: str, seed: int, sizes: SuiteSizes) -> List[dict]:
  """Rank-classification examples of a held-out task (or, for a held-in task, its validation split)."""
  rng = stream(seed, task, "eval")
  if task in HELD_OUT_TASKS:
    pair = dict(zip(HELD_OUT_TASKS, HELD_OUT_PAIRS))[task]
    return [held_out_example(pair, rng) for _ in range(sizes.held_out)]
  skill = task[len(PREFIX):]
  return [held_in_eval_example(skill, rng) for _ in range(sizes.held_in_eval_count)]


def output_features() -> dict:
  return seqio_tasks.features(seqio.ByteVocabulary())


def _add(name: str, source, evaluation: bool) -> None:
  """Every evaluation example of the suites has answer choices: rank classification only."""
  seqio_tasks.add_task(name, source, evaluation, output_features(), generative=False)


def register_tasks(training: Sequence[str], evaluation: Sequence[str], train_fn: Callable[[str, str], List[dict]],
                   eval_fn: Callable[[str], List[dict]]) -> None:
  """Byte-level seqio tasks: `training` ones (splits train, validation) read `train_fn(task, split)`,
  `evaluation` ones (rank classification, split validation) read `eval_fn(task)`."""
  for task in training:
    _add(task, seqio_tasks.text_source(lambda split, t=task: iter(train_fn(t, split)), seqio_tasks.TRAIN_SIGNATURE),
         evaluation=False)
  for task in evaluation:
    _add(task, seqio_tasks.text_source(lambda split, t=task: iter(eval_fn(t)), seqio_tasks.EVAL_SIGNATURE,
                                       splits=("validation",)), evaluation=True)


def add_mixtures(mixtures: Dict[str, Sequence[str]]) -> None:
  for name, members in mixtures.items():
    seqio_tasks.add_mixture(name, members)


def register(seed: int = 0, sizes: SuiteSizes = SuiteSizes()) -> None:
  """Registers (or re-registers, for another seed) the suite's seqio tasks and mixtures.

  Training tasks: `demo_pretrain`, `demo_<skill>` (splits train, validation). Evaluation tasks:
  `demo_<skill>_eval` (held-in sanity check) and `demo_<a>_<b>` (held-out); mixtures `demo_held_in`
  (training), `demo_held_in_eval`, `demo_held_out` and `demo_eval` (both) (evaluation).
  """
  tasks.register_pool(POOL_GROUP, HELD_IN_TASKS)
  register_tasks((PRETRAIN_TASK,) + HELD_IN_TASKS, HELD_IN_EVAL_TASKS + HELD_OUT_TASKS,
                 lambda task, split: train_examples(task, split, seed, sizes),
                 lambda task: eval_examples(oracle_expert(task) if task in HELD_IN_EVAL_TASKS else task, seed, sizes))
  add_mixtures({HELD_IN_MIXTURE: HELD_IN_TASKS, HELD_IN_EVAL_MIXTURE: HELD_IN_EVAL_TASKS,
                HELD_OUT_MIXTURE: HELD_OUT_TASKS, EVAL_MIXTURE: HELD_IN_EVAL_TASKS + HELD_OUT_TASKS})
