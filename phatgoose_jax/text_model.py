"""Text in, Python values out: a base, assembled or library-routed T5 behind `score`, `choose` and `generate`.

  model = phatgoose_jax.load("demo/base", library="demo/library", router="phatgoose", top_k=2)
  model.score(["a question"], ["an answer"])      # [{"sum_logprob", "mean_logprob", "num_tokens"}]
  model.choose("a question", ["yes", "no"])       # {"index", "choice", "scores": [one score per choice]}
  model.generate(["a prompt"], max_new_tokens=32, temperature=0.7, top_p=0.9, seed=0, stop=["."])

Texts are encoded with the model's vocabulary (EOS appended, T5 has no BOS) and truncated to `max_length`
tokens, EOS kept, with a warning counting them (`truncate=False` refuses them). Rows are padded to `batch_size`
and lengths to powers of two (`bucket`), so repeated calls run the programs already compiled. `phatgoose score`
and `phatgoose generate` and the server run this object; `tokenize`, `check_ids`, `score_ids` and
`generate_ids` are its id-level pieces. Bad arguments raise ValueError with one line naming the argument.
"""
import logging
import numbers
import secrets
from typing import Optional, Sequence, Union

import jax
import numpy as np
import seqio

from phatgoose_jax import assembly, data, utils
from phatgoose_jax import vocab as vocab_lib
from phatgoose_jax.models import EOS_ID, pad_tokens, shift_right

SCORE_KEYS = ("sum_logprob", "mean_logprob", "num_tokens")


def bucket(length: int) -> int:
  """Pad lengths to the next power of two (at least 8) so few shapes get compiled."""
  return max(8, 1 << (length - 1).bit_length())


def buckets(longest: int) -> list:
  """Every length `bucket` gives up to `longest` (itself the last, bucket or not: a cap)."""
  return [b for b in (8 << i for i in range(32)) if b < longest] + [longest]


def pad(rows: Sequence[Sequence[int]], num_rows: int) -> np.ndarray:
  """<int32>[num_rows, bucket(longest row)]: the rows zero-padded."""
  return pad_tokens(rows, bucket(max(len(r) for r in rows)), num_rows)


def stack_rows(routes: Sequence, num_rows: int):
  """Rows' routing inputs (each a pytree of numpy arrays without a batch axis) stacked along a batch axis,
  zero rows up to `num_rows`."""
  return jax.tree.map(lambda *xs: np.concatenate([np.stack(xs), np.zeros((num_rows - len(xs), *np.shape(xs[0])),
                                                                          np.asarray(xs[0]).dtype)]), *routes)


def chunks(items: Sequence, size: int):
  for start in range(0, len(items), size):
    yield start, items[start:start + size]


def prompt_key(seed: int, index: int) -> np.ndarray:
  """<uint32>[2]: the sampling key of the `index`-th sequence of a call with `seed`, fold_in(PRNGKey(seed), index),
  so that a sequence's draws depend on its seed and position in its call only, not on its batch mates."""
  return np.asarray(jax.random.fold_in(jax.random.PRNGKey(seed), index))


def stop_cut(vocabulary: seqio.Vocabulary, ids: Sequence[int], stop: Sequence[str]) -> Optional[tuple]:
  """(text, n) when the text of `ids` holds a string of `stop`: the text before the earliest one, and the
  fewest leading tokens whose text holds it; None otherwise."""
  text = vocab_lib.decode(vocabulary, ids)
  found = [i for i in (text.find(s) for s in stop) if i >= 0]
  if not found:
    return None
  n = next(n for n in range(1, len(ids) + 1) if any(s in vocab_lib.decode(vocabulary, ids[:n]) for s in stop))
  return text[:min(found)], n


def _texts(texts, name: str) -> list:
  if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
    raise ValueError(f"{name} must be a list of strings, got {type(texts).__name__}")
  if not texts:
    raise ValueError(f"{name} is empty; pass at least one string")
  bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
  if bad:
    raise ValueError(f"{name}[{bad[0]}] must be a string, got {type(texts[bad[0]]).__name__}")
  return list(texts)


def _number(value, name: str, low: float, high: float, low_open: bool = False) -> float:
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and (low < value if low_open else low <= value)
  if not ok or not value <= high:
    interval = f"{'(' if low_open else '['}{low}, {high}]"
    raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
  return float(value)


class TextModel:
  """A loaded model (`assembly.LoadedModel`) with its vocabulary: strings in, scores and generations out.

  `model`, `variables`: the `EncoderDecoderModel` and its variables (t5x's feature names and methods);
  `vocabulary`: the seqio vocabulary (None: ids only, texts are refused); `max_length`: the longest input,
  target or generation in tokens;
  `batch_size`: the rows of every compiled batch.
  """

  def __init__(self, loaded: assembly.LoadedModel, vocabulary: Optional[seqio.Vocabulary], batch_size: int = 16,
               max_length: int = vocab_lib.MAX_LENGTH):
    if not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
    self.loaded = loaded
    self.vocabulary = vocabulary
    self.batch_size = batch_size
    self.max_length = max_length

  @property
  def model(self):
    return self.loaded.model

  @property
  def variables(self) -> dict:
    return self.loaded.variables

  @property
  def vocab_size(self) -> int:
    """The rows of the model's embedding: ids are 1..vocab_size - 1 (0 is padding)."""
    return self.model.config.vocab_size

  # Text <-> ids.

  def encode(self, text: str) -> tuple:
    """(the ids of `text` truncated to `max_length` with EOS, whether it was truncated). Raises ValueError when
    the vocabulary is not the model's (`vocab.check_fits`) or there is none."""
    vocabulary = self._text_vocabulary()
    vocab_lib.check_fits(vocabulary, self.vocab_size)
    ids = vocab_lib.encode(vocabulary, text, self.max_length)
    cut = len(ids) == self.max_length and len(vocab_lib.encode(vocabulary, text, self.max_length + 1)) > len(ids)
    return ids, cut

  def tokenize(self, texts: Sequence[str], truncate: bool = True, name: str = "texts") -> list[list[int]]:
    """The ids of each text, EOS appended. Texts over `max_length` tokens are truncated (EOS kept) with a
    warning counting them, or, with `truncate=False`, refused (ValueError naming the first)."""
    encoded = [self.encode(t) for t in _texts(texts, name)]
    cut = [i for i, (_, c) in enumerate(encoded) if c]
    if cut and not truncate:
      raise ValueError(f"{name}[{cut[0]}] is longer than the model's {self.max_length} tokens; shorten it")
    if cut:
      logging.warning("%d of %d %s are longer than %d tokens; they are truncated (EOS kept)", len(cut),
                      len(encoded), name, self.max_length)
    return [ids for ids, _ in encoded]

  def check_ids(self, ids, name: str = "ids") -> list[int]:
    """`ids` as a list of ints, each an id of the model (1..vocab_size - 1); ValueError otherwise."""
    if not isinstance(ids, (list, tuple)) or not ids or not all(isinstance(i, numbers.Integral) for i in ids):
      raise ValueError(f"{name} must be a non-empty list of integers (token ids)")
    bad = [int(i) for i in ids if not 0 < i < self.vocab_size]
    if bad:
      raise ValueError(f"{name} has ids outside the vocabulary (1..{self.vocab_size - 1}): {bad[:5]}")
    if len(ids) > self.max_length:
      raise ValueError(f"{name} has {len(ids)} ids, over the model's {self.max_length}; shorten it")
    return [int(i) for i in ids]

  def detokenize(self, ids: Sequence[int]) -> str:
    """The text of `ids` up to (excluding) the first EOS; pad ids are dropped."""
    return vocab_lib.decode(self._text_vocabulary(), ids)

  def _text_vocabulary(self) -> seqio.Vocabulary:
    if self.vocabulary is None:
      raise ValueError("this model was loaded without a vocabulary (vocab=None) and takes ids only: give ids, or "
                       "load it with vocab='byte' or the path of a SentencePiece .model")
    return self.vocabulary

  # Scoring.

  def score(self, inputs: Sequence[str], targets: Sequence[str], truncate: bool = True) -> list[dict]:
    """Per pair {'sum_logprob', 'mean_logprob', 'num_tokens'}: log p(target | input) summed over the target's
    tokens (EOS included), its mean over them (the rank-classification score, algorithm.md §6), their number."""
    inputs, targets = _texts(inputs, "inputs"), _texts(targets, "targets")
    if len(inputs) != len(targets):
      raise ValueError(f"inputs and targets must have one entry each per example, got {len(inputs)} and "
                       f"{len(targets)}")
    return self.score_ids(self.tokenize(inputs, truncate, "inputs"), self.tokenize(targets, truncate, "targets"))

  def score_ids(self, input_ids: Sequence[Sequence[int]], target_ids: Sequence[Sequence[int]],
                routes: Optional[Sequence] = None) -> list[dict]:
    """`score` on ids, used as given (no EOS appended): `batch_size` rows at a time through `jit_score`.
    `routes`: each row's routing inputs (`expert_weights` of one row, e.g. a served library's
    `routing.RowRouting`), in place of the model's own."""
    results = []
    for start, enc_rows in chunks(list(input_ids), self.batch_size):
      tgt = pad(target_ids[start:start + len(enc_rows)], self.batch_size)
      batch = {"encoder_input_tokens": pad(enc_rows, self.batch_size), "decoder_input_tokens": shift_right(tgt),
               "decoder_target_tokens": tgt}
      batch = (self.loaded.with_expert_weights(batch) if routes is None else
               dict(batch, expert_weights=stack_rows(routes[start:start + len(enc_rows)], self.batch_size)))
      _, aux = self.model.jit_score(self.variables, batch, return_intermediates=True)
      values = [np.asarray(aux[k])[:len(enc_rows)] for k in ("sum_logprob", "mean_logprob", "num_target_tokens")]
      results += [{"sum_logprob": float(s), "mean_logprob": float(m), "num_tokens": int(n)} for s, m, n in zip(*values)]
    return results

  def choose(self, input: str, choices: Sequence[str], truncate: bool = True) -> dict:  # pylint: disable=redefined-builtin
    """Rank classification (algorithm.md §6): the choice of highest mean log-likelihood (lowest length-normalised
    cross-entropy) given `input`. Returns {'index', 'choice', 'scores': `score` of each choice}."""
    if not isinstance(input, str):
      raise ValueError(f"input must be a string, got {type(input).__name__}")
    choices = _texts(choices, "choices")
    scores = self.score([input] * len(choices), choices, truncate)
    index = int(np.argmax([s["mean_logprob"] for s in scores]))
    return {"index": index, "choice": choices[index], "scores": scores}

  # Generation.

  def generate(self, prompts: Sequence[str], max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
               seed: Optional[int] = None, stop: Union[None, str, Sequence[str]] = None,
               truncate: bool = True) -> list[dict]:
    """Per prompt {'text', 'token_ids', 'logprobs', 'finish_reason'}: up to `max_new_tokens` tokens, greedy at
    `temperature` 0, else sampled from softmax(logits / temperature) within the nucleus `top_p`
    (`models.sample_step`). Prompt i samples with `prompt_key(seed, i)`: a seed gives the same texts on every
    call and batching; None draws one. The text ends before EOS or before the first string of `stop` (whose
    tokens are kept in `token_ids`); `logprobs` are log p(token) under the model, one per token id;
    `finish_reason` is 'stop' (EOS or a stop string) or 'length'."""
    return self.generate_ids(self.tokenize(prompts, truncate, "prompts"), max_new_tokens, temperature, top_p, seed,
                             stop)

  def generate_ids(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 64, temperature: float = 0.0,
                   top_p: float = 1.0, seed: Optional[int] = None,
                   stop: Union[None, str, Sequence[str]] = None) -> list[dict]:
    """`generate` on prompt ids, used as given."""
    if not prompt_ids:
      raise ValueError("prompts is empty; pass at least one")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 0 < max_new_tokens <= self.max_length:
      raise ValueError(f"max_new_tokens must be an integer in 1..{self.max_length}, got {max_new_tokens!r}")
    temperature = _number(temperature, "temperature", 0.0, float("inf"))
    top_p = _number(top_p, "top_p", 0.0, 1.0, low_open=True)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
      raise ValueError(f"seed must be an integer or None, got {seed!r}")
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) and s for s in stop):
      raise ValueError("stop must be a non-empty string or a list of them")
    seed = secrets.randbits(31) if seed is None else seed
    rows = []
    for start, chunk in chunks(list(prompt_ids), self.batch_size):
      rows += self._decode(chunk, start, max_new_tokens, temperature, top_p, seed)
    return [self.decoded(ids, logprobs, eos, stop) for ids, logprobs, eos in rows]

  def _decode(self, prompt_ids, start: int, max_new_tokens: int, temperature: float, top_p: float, seed: int) -> list:
    """[(ids before EOS, pad ids dropped; their log-probabilities; whether EOS ended them)] of one chunk."""
    size = self.batch_size
    keys = np.zeros((size, 2), np.uint32)
    keys[:len(prompt_ids)] = [prompt_key(seed, start + i) for i in range(len(prompt_ids))]
    lengths = np.zeros((size,), np.int32)
    lengths[:len(prompt_ids)] = max_new_tokens
    batch = {"encoder_input_tokens": pad(prompt_ids, size),
             "decoder_input_tokens": np.zeros((size, bucket(max_new_tokens)), np.int32),
             "decode_lengths": lengths, "decode_rng": keys, "temperature": np.full((size,), temperature, np.float32),
             "top_p": np.full((size,), top_p, np.float32)}
    tokens, aux = self.model.jit_sample(self.variables, self.loaded.with_expert_weights(batch))
    tokens, token_scores = np.asarray(tokens), np.asarray(aux["token_scores"])
    out = []
    for row, scores in zip(tokens[:len(prompt_ids)], token_scores):
      row = [int(t) for t in row]
      eos = EOS_ID in row[:max_new_tokens]
      kept = [(t, float(s)) for t, s in zip(row[:row.index(EOS_ID) if eos else max_new_tokens], scores) if t > 0]
      out.append(([t for t, _ in kept], [s for _, s in kept], eos))
    return out

  def decoded(self, ids: list, logprobs: list, eos: bool, stop: list) -> dict:
    """`generate`'s result of a sequence's ids before EOS (pad ids dropped), their log-probabilities, whether
    EOS ended it, and the stop strings."""
    cut = stop_cut(self._text_vocabulary(), ids, stop) if stop else None
    if cut is not None:
      text, n = cut
      return {"text": text, "token_ids": ids[:n], "logprobs": logprobs[:n], "finish_reason": "stop"}
    return {"text": self.detokenize(ids), "token_ids": ids, "logprobs": logprobs,
            "finish_reason": "stop" if eos else "length"}


def load(base: str, library: Optional[str] = None, router: str = "phatgoose", top_k: int = 2,
         experts: Optional[Sequence[str]] = None, dtype: Optional[str] = "float32", vocab: Optional[str] = "byte",
         batch_size: int = 16) -> TextModel:
  """The `TextModel` of checkpoint `base` (any format: phatgoose-jax, assembled, Hugging Face, t5x), routed over
  `library`'s experts (`experts`, default all) by `router` with `top_k` experts per token when a library is
  given (`assembly.load_model`). `dtype`: a precision, one of `utils.PRECISIONS` (None: the configured one);
  `vocab`: 'byte' or the path of a SentencePiece .model, refused before the model is loaded unless it fits its
  embedding (`data.check_vocabulary`); None: no vocabulary, the model takes and gives ids only. The variables are
  placed on the configured mesh with the logical axis rules (`utils.sharding`, as evaluation places them), so a
  model too large for one device is split over the mesh's 'model' axis."""
  if library is not None and router == "oracle":
    raise ValueError("the oracle router needs each example's label; it cannot run on inputs alone")
  if dtype is not None:
    utils.precision_fields(dtype)  # a bad precision fails here, before any checkpoint is read
  vocabulary = None if vocab is None else vocab_lib.get_vocabulary(vocab)
  if vocabulary is not None:
    data.check_vocabulary(vocabulary, base)
  loaded = assembly.load_model(base, library, router, top_k, list(experts) if experts is not None else None,
                               dtype=dtype)
  loaded = loaded._replace(variables=utils.place(loaded.model, loaded.variables, *utils.sharding()))
  return TextModel(loaded, vocabulary, batch_size)
