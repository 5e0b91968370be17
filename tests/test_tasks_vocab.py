"""A vocabulary must fit the model's embedding (algorithm.md §1): the byte vocabulary on a 32128-row T5 is
refused with an error naming both; T5's own layouts (with or without sentinel ids) and the tiny preset fit."""
import io

import pytest
import seqio
import sentencepiece
import transformers

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


def _sentencepiece_dir(tmp_path):
  """A tiny T5-style SentencePiece model (pad 0, EOS 1, unk 2) saved as `spiece.model`."""
  text = ["Hello , world ! it 's a test .", "don't stop ? we 're here , they 've gone", "a b c d e f g h"] * 50
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=32,
                                           pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=3)
  (tmp_path / "spiece.model").write_bytes(model.getvalue())
  return tmp_path


def test_official_decode_is_transformers_batch_decode_skipping_special_tokens(tmp_path):
  """The official text of generated ids: T5's tokenizer `batch_decode(ids, skip_special_tokens=True)` with
  transformers' default (before 4.45) `clean_up_tokenization_spaces=True` (src/models/interface_mixin.py:260):
  pad, EOS, unk and sentinels dropped, the space before . , ! ? and 's 're 've n't removed."""
  directory = _sentencepiece_dir(tmp_path)
  ours = seqio.SentencePieceVocabulary(str(directory / "spiece.model"), extra_ids=3)
  theirs = transformers.T5Tokenizer.from_pretrained(str(directory), extra_ids=3)
  rows = [list(ours.encode(t)) for t in ("Hello , world ! it 's {x} .", "we 're here ? they 've gone , don't")]
  rows += [[32, 33] + rows[0][:4] + [1] + rows[1][:3] + [2, 0, 0], [34, 2, 1, 0], []]
  expected = theirs.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=True)
  assert [vocab.official_decode(ours, r) for r in rows] == expected
  assert expected[0] == "Hello, world! it's ."
  byte = vocab.get_vocabulary("byte")
  rows = [list(byte.encode("it 's  a test , ok .")) + [1, 0], [2, 1, 104, 105, 300]]
  assert [vocab.official_decode(byte, r) for r in rows] == transformers.ByT5Tokenizer().batch_decode(
      rows, skip_special_tokens=True, clean_up_tokenization_spaces=True)


def test_official_decoding_equals_the_vocabulary_it_wraps_as_t5x_checks_it():
  """A task's targets vocabulary decodes the official way and still matches the model's plain vocabulary in t5x's
  check (`t5x.utils.verify_matching_vocabs` compares the task's vocabularies with `!=`, task first)."""
  byte = vocab.get_vocabulary("byte")
  wrapped = vocab.OfficialDecoding(byte)
  assert not wrapped != byte and wrapped == vocab.OfficialDecoding(seqio.ByteVocabulary())
  assert wrapped != seqio.ByteVocabulary(extra_ids=3) and wrapped.encode("ab") == byte.encode("ab")
