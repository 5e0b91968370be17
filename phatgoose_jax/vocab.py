"""Vocabularies: seqio's `ByteVocabulary` (the offline default) or a SentencePiece model from a path.

Both follow T5's conventions (algorithm.md §1): pad 0, EOS 1, no BOS; inputs and targets end with EOS.
"""
import os

import seqio

MAX_LENGTH = 512  # inputs and targets are truncated to 512 tokens, EOS kept (algorithm.md §1)


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
