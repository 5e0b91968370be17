"""A vocabulary must fit the model's embedding (algorithm.md §1): the byte vocabulary on a 32128-row T5 is
refused with an error naming both; T5's own layouts (with or without sentinel ids) and the tiny preset fit."""
import pytest
import seqio

from phatgoose_jax import vocab
from phatgoose_jax.t5 import config


def test_byte_vocabulary_on_a_real_size_model_is_refused():
  byte = vocab.get_vocabulary("byte")
  with pytest.raises(ValueError, match=r"the byte vocabulary \(259 ids\) does not match the model's embedding of "
                                       r"32128 rows"):
    vocab.check_fits(byte, config.preset("xl").vocab_size)
  vocab.check_fits(byte, config.preset("tiny").vocab_size)


def test_t5_layouts_fit_and_oversized_vocabularies_do_not():
  vocab.check_fits(seqio.PassThroughVocabulary(32000), 32128)  # SentencePiece pieces without the 100 sentinels
  vocab.check_fits(seqio.PassThroughVocabulary(32100), 32128)  # with them
  with pytest.raises(ValueError, match=r"\(32129 ids\) has ids beyond the model's embedding of 32128 rows"):
    vocab.check_fits(seqio.PassThroughVocabulary(32129), 32128)
  with pytest.raises(ValueError, match="does not match"):
    vocab.check_fits(seqio.PassThroughVocabulary(32128 - vocab.MAX_UNUSED_ROWS - 1), 32128)
