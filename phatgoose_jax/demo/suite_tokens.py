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
