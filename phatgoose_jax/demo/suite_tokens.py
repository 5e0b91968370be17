"""The demo's default suite (`--suite tokens`): six held-in tasks whose inputs come from six disjoint alphabets.

Written, with its expected results, before any run of it (not tuned toward a ranking afterwards).

Hypothesis. PHATGOOSE's premise is that, when each expert's dataset has its own input distribution (as the
P3 datasets do), gates trained post-hoc on each dataset alone let a router recognise per token which expert
holds the knowledge that token needs. Then (1) on held-in data the routed top-k contains the token's own
expert far above chance k/E, and (2) held-out tasks that need one expert's knowledge in a new task, or two
experts' knowledge inside one example, are solved zero-shot better by per-token routing than by merging
the experts, and (for the two-expert tasks) better than by any router that installs one expert per example.

Design.
* Alphabets (disjoint byte ranges; no alphabet contains the format characters `[ ] ( )` or space):
    digits `0-9`, lower_am `a-m`, lower_nz `n-z`, upper_am `A-M`, upper_nz `N-Z`, symbols `!#$%&*+=?@^~`.
  Each alphabet X has a secret cipher pi_X: a random derangement of X (no character maps to itself), drawn
  from the seed, and two decoy derangements (distinct from pi_X), used only as wrong answers.
* Base (`tok_pretrain`, full training from scratch): inputs `[w1 ... wn]` -> the words copied, and
  `(w1 ... wn)` -> the words copied in reverse order; every word is 2-5 characters of one random alphabet.
  The base can read and write every alphabet and knows both formats, but no cipher.
* Held-in tasks `tok_<X>` (one LoRA expert, then its gate, each trained on that task's data only, as by an
  independent contributor): `[w1 ... wn]`, n = 1-3 words of alphabet X -> `pi_X(w1) ... pi_X(wn)`. A task
  is identifiable from any of its tokens (input and output characters both lie in X).
* Held-out tasks, never used for any expert, gate or router (`is_held_out` recognises them: the `( )`
  format, or words of two alphabets in one input; the pipeline's guard refuses them):
    `tok_reorder_<X>` (6 tasks, a new task over one expert's distribution): `(w1 ... wn)`, n = 2-3 words of
      X -> `pi_X(wn) ... pi_X(w1)`: the base's reversal with expert X's cipher;
    `tok_mix_<X>_<Y>` (3 tasks, knowledge of two experts in one example): `[w1 w2]`, one word of X and one
      of Y in random order -> each word under its own alphabet's cipher. Pairs: (digits, lower_am),
      (lower_nz, upper_am), (upper_nz, symbols); each alphabet appears in one pair.
* Oracle: expert X for `tok_reorder_<X>`, and the first listed alphabet's expert for `tok_mix_<X>_<Y>`.
* Scoring: rank classification (length-normalised log-likelihood, algorithm.md §6), five candidates per
  held-out example, chance 20%: reorder: the answer; pi_X in input order (the held-in habit); reversed copy
  (the base without the cipher); copy; reversed under a decoy cipher. mix: the answer; only X's word
  ciphered (Y's copied); only Y's word ciphered; both copied; both under decoy ciphers. The distractors are
  what one expert alone, or none, would write. Held-in validation (`tok_<X>_eval`): the answer, the copy and
  the two decoys (chance 25%). Held-out scores carry 95% intervals over their examples.
* Routing accuracy (every per-token router): on held-in validation examples, teacher-forced, the fraction of
  (token, module) decisions whose top-k holds the token's own expert; chance k/E = 2/6.

Expected results (written before any run).
* Routing accuracy: PHATGOOSE and average activation far above 1/3 (the alphabet is in every token's
  activation); Arrow and SpectR above chance, SpectR >= Arrow; encoder and cross-attention modules sharper
  than decoder self-attention.
* Held-in: oracle (the own expert) and multitask highest; the per-token routers close below them (the
  second top-2 slot adds another expert's update, and Arrow's and SpectR's near-uniform weights halve
  the own expert's); merged and uniform (each expert at 1/6) well below; base near 0 (it copies).
* Held-out reorder: oracle ~ retrieval ~ multitask ~ PHATGOOSE > average activation, SpectR, Arrow >
  best individual (right on one of six tasks) > merged ~ uniform > base.
* Held-out mix: multitask >= PHATGOOSE > oracle ~ retrieval ~ best individual (one word right: a distractor)
  > merged ~ uniform > base.
* Held-out average: PHATGOOSE above merged and retrieval by more than the intervals. If not, the
  diagnostics say why: routing accuracy (the router), held-in scores (the experts), or the suite.
"""
import string
from typing import Dict, List, Sequence, Tuple

import numpy as np

from phatgoose_jax import tasks
from phatgoose_jax.demo import suite as common
from phatgoose_jax.demo.suite import SuiteSizes, eval_record

ALPHABETS: Dict[str, str] = {
    "digits": string.digits,
    "lower_am": string.ascii_lowercase[:13],
    "lower_nz": string.ascii_lowercase[13:],
    "upper_am": string.ascii_uppercase[:13],
    "upper_nz": string.ascii_uppercase[13:],
    "symbols": "!#$%&*+=?@^~",
}
MIX_PAIRS: Tuple[Tuple[str, str], ...] = (("digits", "lower_am"), ("lower_nz", "upper_am"), ("upper_nz", "symbols"))
PREFIX = "tok_"
PRETRAIN_TASK = f"{PREFIX}pretrain"
HELD_IN_MIXTURE = f"{PREFIX}held_in"
HELD_IN_EVAL_MIXTURE = f"{PREFIX}held_in_eval"
HELD_OUT_MIXTURE = f"{PREFIX}held_out"
EVAL_MIXTURE = f"{PREFIX}eval"  # held-in validation and held-out tasks: one pass of a method over both
EXPERT_NAMES = tuple(ALPHABETS)
HELD_IN_TASKS = tuple(f"{PREFIX}{a}" for a in ALPHABETS)
HELD_IN_EVAL_TASKS = tuple(f"{t}_eval" for t in HELD_IN_TASKS)
POOL_GROUP = 4  # `tasks.register_pool`: the library lists the experts in HELD_IN_TASKS order, however added
REORDER_TASKS = tuple(f"{PREFIX}reorder_{a}" for a in ALPHABETS)
MIX_TASKS = tuple(f"{PREFIX}mix_{a}_{b}" for a, b in MIX_PAIRS)
HELD_OUT_TASKS = REORDER_TASKS + MIX_TASKS
_ALPHABET_OF = {c: name for name, chars in ALPHABETS.items() for c in chars}


def oracle_expert(task: str) -> str:
  """The held-in task whose expert is the oracle for a held-out or held-in evaluation task."""
  if task in HELD_IN_EVAL_TASKS:
    return task[:-len("_eval")]
  if task in REORDER_TASKS:
    return f"{PREFIX}{task[len(PREFIX + 'reorder_'):]}"
  return f"{PREFIX}{dict(zip(MIX_TASKS, MIX_PAIRS))[task][0]}"


def derangement(chars: str, rng: np.random.Generator) -> Dict[str, str]:
  """A random permutation of `chars` with no fixed point, as a character map."""
  while True:
    image = "".join(rng.permutation(list(chars)))
    if all(a != b for a, b in zip(chars, image)):
      return dict(zip(chars, image))


def ciphers(seed: int) -> Dict[str, List[Dict[str, str]]]:
  """Per alphabet [pi, decoy_1, decoy_2]: three distinct derangements drawn from the seed."""
  out = {}
  for name, chars in ALPHABETS.items():
    rng = common.stream(seed, "cipher", name)
    maps: List[Dict[str, str]] = []
    while len(maps) < 3:
      candidate = derangement(chars, rng)
      if candidate not in maps:
        maps.append(candidate)
    out[name] = maps
  return out


def encipher(word: str, maps: Dict[str, List[Dict[str, str]]], which: int = 0) -> str:
  """The word under its alphabet's cipher `which` (0 = the secret one, 1-2 = decoys)."""
  return "".join(maps[_ALPHABET_OF[word[0]]][which][c] for c in word)


def random_word(alphabet: str, rng: np.random.Generator) -> str:
  return "".join(rng.choice(list(ALPHABETS[alphabet]), rng.integers(2, 6)))


def alphabets_in(inputs: str) -> List[str]:
  """The alphabet of each word of a `[...]` / `(...)` input (None for characters of no alphabet)."""
  return [_ALPHABET_OF.get(w[0]) for w in inputs[1:-1].split()]


def is_held_out(inputs: str) -> bool:
  """True for a held-out-style input of this suite: the `( )` format, or words of two alphabets."""
  if len(inputs) < 2 or (inputs[0], inputs[-1]) not in (("[", "]"), ("(", ")")):
    return False
  return inputs[0] == "(" or len(set(alphabets_in(inputs))) > 1


def held_in_example(alphabet: str, maps, rng: np.random.Generator) -> dict:
  words = [random_word(alphabet, rng) for _ in range(rng.integers(1, 4))]
  return {"inputs": "[" + " ".join(words) + "]", "targets": " ".join(encipher(w, maps) for w in words)}


def pretrain_example(rng: np.random.Generator) -> dict:
  """`[...]` -> the words copied, or `(...)` -> the words in reverse order; each word of a random alphabet."""
  words = [random_word(str(rng.choice(EXPERT_NAMES)), rng) for _ in range(rng.integers(1, 4))]
  if rng.random() < 0.5:
    return {"inputs": "[" + " ".join(words) + "]", "targets": " ".join(words)}
  return {"inputs": "(" + " ".join(words) + ")", "targets": " ".join(words[::-1])}


def _distinct_record(inputs: str, choices: List[str]):
  """The rank-classification record, or None when two candidates coincide (the example is redrawn)."""
  return eval_record(inputs, choices, 0) if len(set(choices)) == len(choices) else None


def held_in_eval_example(alphabet: str, maps, rng: np.random.Generator) -> dict:
  """Answer, copy and the two decoy ciphers."""
  while True:
    words = [random_word(alphabet, rng) for _ in range(rng.integers(1, 4))]
    choices = [" ".join(encipher(w, maps, i) for w in words) for i in (0, 1, 2)]
    record = _distinct_record("[" + " ".join(words) + "]", choices[:1] + [" ".join(words)] + choices[1:])
    if record:
      return record


def reorder_example(alphabet: str, maps, rng: np.random.Generator) -> dict:
  """Answer; cipher in input order; reversed copy; copy; reversed under a decoy."""
  while True:
    words = [random_word(alphabet, rng) for _ in range(rng.integers(2, 4))]
    coded, back = [encipher(w, maps) for w in words], words[::-1]
    choices = [" ".join(coded[::-1]), " ".join(coded), " ".join(back), " ".join(words),
               " ".join(encipher(w, maps, 1) for w in back)]
    record = _distinct_record("(" + " ".join(words) + ")", choices)
    if record:
      return record


def mix_example(pair: Sequence[str], maps, rng: np.random.Generator) -> dict:
  """Answer; only X's word ciphered; only Y's; both copied; both under decoys."""
  while True:
    words = [random_word(pair[0], rng), random_word(pair[1], rng)]
    order = [0, 1] if rng.random() < 0.5 else [1, 0]
    shown = [words[i] for i in order]

    def render(cipher_x, cipher_y, which=0):
      return " ".join(encipher(w, maps, which) if (cipher_x if i == 0 else cipher_y) else w
                      for i, w in zip(order, shown))

    choices = [render(True, True), render(True, False), render(False, True), render(False, False),
               render(True, True, 1)]
    record = _distinct_record("[" + " ".join(shown) + "]", choices)
    if record:
      return record


def train_examples(task: str, split: str, seed: int, sizes: SuiteSizes) -> List[dict]:
  """{inputs, targets} of a held-in or the pretraining task."""
  rng = common.stream(seed, task, split)
  count = sizes.train if split == "train" else sizes.validation
  if task == PRETRAIN_TASK:
    return [pretrain_example(rng) for _ in range(count)]
  maps = ciphers(seed)
  return [held_in_example(task[len(PREFIX):], maps, rng) for _ in range(count)]


def eval_examples(task: str, seed: int, sizes: SuiteSizes) -> List[dict]:
  """Rank-classification examples of a held-out task or a held-in task's validation split."""
  rng, maps = common.stream(seed, task, "eval"), ciphers(seed)
  if task in HELD_IN_EVAL_TASKS:
    alphabet = task[len(PREFIX):-len("_eval")]
    return [held_in_eval_example(alphabet, maps, rng) for _ in range(sizes.held_in_eval_count)]
  if task in REORDER_TASKS:
    return [reorder_example(task[len(PREFIX + "reorder_"):], maps, rng) for _ in range(sizes.held_out)]
  pair = dict(zip(MIX_TASKS, MIX_PAIRS))[task]
  return [mix_example(pair, maps, rng) for _ in range(sizes.held_out)]


def register(seed: int = 0, sizes: SuiteSizes = SuiteSizes()) -> None:
  """Registers (or re-registers, for another seed) the suite's seqio tasks and mixtures: training tasks
  `tok_pretrain`, `tok_<X>`; evaluation tasks `tok_<X>_eval` (held-in), `tok_reorder_<X>`, `tok_mix_<X>_<Y>`
  (held-out); mixtures `tok_held_in`, `tok_held_in_eval`, `tok_held_out` and `tok_eval` (both)."""
  tasks.register_pool(POOL_GROUP, HELD_IN_TASKS)
  common.register_tasks([PRETRAIN_TASK, *HELD_IN_TASKS], [*HELD_IN_EVAL_TASKS, *HELD_OUT_TASKS],
                        lambda task, split: train_examples(task, split, seed, sizes),
                        lambda task: eval_examples(task, seed, sizes))
  common.add_mixtures({HELD_IN_MIXTURE: HELD_IN_TASKS, HELD_IN_EVAL_MIXTURE: HELD_IN_EVAL_TASKS,
                       HELD_OUT_MIXTURE: HELD_OUT_TASKS, EVAL_MIXTURE: HELD_IN_EVAL_TASKS + HELD_OUT_TASKS})
