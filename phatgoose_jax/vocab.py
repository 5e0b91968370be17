"""Vocabularies: seqio's `ByteVocabulary` (the offline default) or a SentencePiece model from a path.

Both follow T5's conventions (algorithm.md §1): pad 0, EOS 1, no BOS; inputs and targets end with EOS.
"""
import os

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
