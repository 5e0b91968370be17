"""Vocabularies: seqio's `ByteVocabulary` (the offline default) or a SentencePiece model from a path.

Both follow T5's conventions (algorithm.md §1): pad 0, EOS 1, no BOS; inputs and targets end with EOS.
"""
import os
import re

import seqio

MAX_LENGTH = 512  # inputs and targets are truncated to 512 tokens, EOS kept (algorithm.md §1)
# Embedding rows a vocabulary may leave unused: T5's 100 sentinel ids (a SentencePiece model loaded without
# extra ids) plus the padding of the table to a multiple of 128 (32000 pieces -> 32128 rows).
MAX_UNUSED_ROWS = 100 + 127


def get_vocabulary(spec: str = "byte") -> seqio.Vocabulary:
  """`'byte'` -> seqio.ByteVocabulary (259 ids); a `.model` path -> seqio.SentencePieceVocabulary."""
  if spec == "byte":
    return seqio.ByteVocabulary()
  if not os.path.isfile(spec):
    raise FileNotFoundError(f"no SentencePiece model at {spec!r}: pass --vocab byte, or the path of the T5 "
                            "spiece.model (e.g. gs://t5-data/vocabs/cc_all.32000/sentencepiece.model, copied locally)")
  return seqio.SentencePieceVocabulary(spec)


def encode(vocabulary: seqio.Vocabulary, text: str, max_length: int = MAX_LENGTH) -> list[int]:
  """Token ids of `text`, truncated to `max_length - 1`, then EOS."""
  return list(vocabulary.encode(text))[:max_length - 1] + [vocabulary.eos_id]


def decode(vocabulary: seqio.Vocabulary, ids) -> str:
  """Text of `ids` up to (excluding) the first EOS; pad ids are dropped."""
  ids = [int(i) for i in ids]
  if vocabulary.eos_id in ids:
    ids = ids[:ids.index(vocabulary.eos_id)]
  return vocabulary.decode([i for i in ids if i > 0])


# transformers' `clean_up_tokenization` (tokenization_utils_base.py), applied by `decode` while
# `clean_up_tokenization_spaces` defaulted to True (before 4.45, the official code's transformers).
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
_SENTINEL = re.compile(r"<extra_id_\d+>")


def _special(vocabulary: seqio.Vocabulary, i: int) -> bool:
  """Whether Hugging Face's T5 / ByT5 tokenizer counts id `i` as a special token: pad, EOS, unk, a sentinel
  (an extra id, or a `<extra_id_N>` piece of the SentencePiece model), or no id of the vocabulary at all."""
  base = vocabulary.vocab_size - vocabulary.extra_ids
  if i in (vocabulary.pad_id, vocabulary.eos_id, vocabulary.unk_id) or i >= base:
    return True
  return isinstance(vocabulary, seqio.SentencePieceVocabulary) and bool(
      _SENTINEL.fullmatch(vocabulary.tokenizer.id_to_piece(i)))


def official_decode(vocabulary: seqio.Vocabulary, ids) -> str:
  """The text of generated `ids` as the official evaluation reads it: `tokenizer.batch_decode(ids,
  skip_special_tokens=True)` (src/models/interface_mixin.py:260): every special id dropped (`_special`, after
  EOS too), the rest decoded, then transformers' `clean_up_tokenization` (`_CLEAN_UP`)."""
  text = vocabulary.decode([int(i) for i in ids if not _special(vocabulary, int(i))])
  for spaced, joined in _CLEAN_UP:
    text = text.replace(spaced, joined)
  return text


class OfficialDecoding(seqio.Vocabulary):
  """`vocabulary` (encoding, ids, equality) whose `decode` is `official_decode`: the targets vocabulary of
  evaluation tasks, through which seqio turns predictions into text for the metrics."""

  def __init__(self, vocabulary: seqio.Vocabulary):
    super().__init__(extra_ids=vocabulary.extra_ids)
    self.vocabulary = vocabulary

  def decode(self, ids) -> str:
    return official_decode(self.vocabulary, ids)

  @property
  def eos_id(self):
    return self.vocabulary.eos_id

  @property
  def unk_id(self):
    return self.vocabulary.unk_id

  @property
  def _base_vocab_size(self):
    return self.vocabulary.vocab_size - self.vocabulary.extra_ids

  def _encode(self, s):
    return self.vocabulary.encode(s)

  def _decode(self, ids):
    return self.vocabulary.decode(ids)

  def _encode_tf(self, s):
    return self.vocabulary.encode_tf(s)

  def _decode_tf(self, ids):
    return self.vocabulary.decode_tf(ids)

  def __eq__(self, other) -> bool:
    """Equal to the vocabulary it wraps (the same ids; only a decode's text differs): t5x's check that a task's
    vocabularies are the model's (`utils.verify_matching_vocabs`, task first) accepts the model's plain one."""
    return self.vocabulary == (other.vocabulary if isinstance(other, OfficialDecoding) else other)


def _describe(vocabulary: seqio.Vocabulary) -> str:
  if isinstance(vocabulary, seqio.ByteVocabulary):
    return f"the byte vocabulary ({vocabulary.vocab_size} ids)"
  path = getattr(vocabulary, "sentencepiece_model_file", "")
  return f"the vocabulary {type(vocabulary).__name__} {path} ({vocabulary.vocab_size} ids)".replace("  ", " ")


def check_fits(vocabulary: seqio.Vocabulary, vocab_size: int) -> None:
  """Raises ValueError unless `vocabulary` fits an embedding of `vocab_size` rows: every id has a row
  (vocabulary.vocab_size <= vocab_size) and at most MAX_UNUSED_ROWS rows are left unused, so that a model is
  never run with a vocabulary it was not trained with (e.g. the byte vocabulary on a 32128-row T5)."""
  unused = vocab_size - vocabulary.vocab_size
  if 0 <= unused <= MAX_UNUSED_ROWS:
    return
  problem = "has ids beyond" if unused < 0 else "does not match"
  raise ValueError(f"{_describe(vocabulary)} {problem} the model's embedding of {vocab_size} rows: pass the "
                   f"vocabulary the model was trained with (the T5 spiece.model for a released T5 checkpoint, "
                   f"'byte' for a {vocabulary.vocab_size}-row test model)")
