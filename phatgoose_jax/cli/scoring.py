"""What `phatgoose score` and `phatgoose generate` run (the flags are in `cli/model.py`).

Each input line is `{"inputs": ..., "targets": ...}` (text, encoded with the vocabulary, EOS appended)
or `{"input_ids": [...], "target_ids": [...]}` (raw ids, used as they are); texts over `vocab.MAX_LENGTH`
tokens are truncated with a warning that counts them (`--error_on_truncation` refuses them). Results go one
JSON object per input line, in order, to --output or standard output; --output is opened before any work
and written only with complete results (a NaN or Inf score is an error); all logging goes to standard error.
The model comes from `assembly.load_model`: a checkpoint of any format, routed over `--library` when given.
"""
import contextlib
import json
import os
import sys
from typing import Optional

import numpy as np

from phatgoose_jax import assembly, routers
from phatgoose_jax import library as lib
from phatgoose_jax import vocab as vocab_lib
from phatgoose_jax.cli import UsageError
from phatgoose_jax.models import pad_tokens, shift_right


def _data_hint(router: str, library: str) -> str:
  if not set(routers.spec(router).needs) & {"data", "examples"}:
    return ""
  free = ", ".join(r for r, spec in routers.ROUTERS.items() if not spec.needs)
  return (f"; --router {router} reads each expert's training data: run `phatgoose evaluate --base BASE --library "
          f"{library} --router {router} --task TASK --output_dir DIR` once (any TASK; it computes and caches what "
          f"the router needs), or choose a router that needs no data: {free}")


def load_model(args) -> assembly.LoadedModel:
  """The --base model (any checkpoint format), routed over --library's readable experts when given."""
  if args.library and args.router == "oracle":
    raise UsageError("the oracle router needs each example's label; it cannot run on inputs alone")
  names = None
  if args.library:
    if not os.path.isdir(args.library):
      raise UsageError(f"no library directory {args.library}")
    library = lib.ExpertLibrary(args.library)
    for name, why in library.unreadable().items():
      print(f"warning: skipping expert {name!r}: {why}", file=sys.stderr)
    names = [m["name"] for m in library.list()]
  try:
    return assembly.load_model(args.base, args.library, args.router, args.top_k, names, dtype=args.dtype)
  except (OSError, ValueError, ImportError) as e:
    raise UsageError(f"{e}{_data_hint(args.router, args.library) if args.library else ''}") from e


def read_jsonl(path: str, vocabulary, vocab_size: int, need_targets: bool,
               error_on_truncation: bool = False) -> list[dict]:
  """Parsed and validated input lines: each {'input_ids': [...], 'target_ids': [...] or None}. Texts over
  `vocab.MAX_LENGTH` tokens are truncated, with a warning counting them (an error with `error_on_truncation`)."""
  try:
    with open(path, "rb") as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise UsageError(f"cannot read --input {path!r}: {e.strerror}") from e
  records, truncated = [], []
  for lineno, raw in enumerate(lines, 1):
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise UsageError(f"line {lineno} of --input {path!r} is not UTF-8 text ({e.reason} at byte {e.start + 1} "
                       f"of the line); re-encode the file as UTF-8, e.g. with iconv -t UTF-8") from e
    if line.strip():
      record, cut = _parse_line(line, lineno, vocabulary, vocab_size, need_targets)
      records.append(record)
      truncated += [lineno] if cut else []
  _report_truncation(truncated, len(records), error_on_truncation)
  return records


def _report_truncation(lines: list, total: int, error: bool) -> None:
  """A warning (or, with `error`, a usage error) naming the input lines whose text was truncated."""
  if not lines:
    return
  shown = ", ".join(map(str, lines[:10])) + (", ..." if len(lines) > 10 else "")
  what = (f"{len(lines)} of {total} examples (lines {shown}) have inputs or targets longer than "
          f"{vocab_lib.MAX_LENGTH} tokens")
  if error:
    raise UsageError(f"{what}; shorten them, or leave out --error_on_truncation to truncate them")
  print(f"warning: {what}; they are truncated to {vocab_lib.MAX_LENGTH} tokens (EOS kept); "
        f"--error_on_truncation refuses them instead", file=sys.stderr)


def _ids(record, text_key, ids_key, vocabulary, vocab_size, lineno) -> tuple:
  """(the ids of `ids_key` or of the text of `text_key`, or None; whether the text was truncated)."""
  if ids_key in record:
    ids = record[ids_key]
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
      raise UsageError(f"line {lineno}: {ids_key!r} must be a non-empty list of integers")
    bad = [i for i in ids if not 0 < i < vocab_size]
    if bad:
      raise UsageError(f"line {lineno}: {ids_key!r} has ids outside the vocabulary (1..{vocab_size - 1}): {bad[:5]}")
    return ids, False
  if text_key in record:
    if not isinstance(record[text_key], str):
      raise UsageError(f"line {lineno}: {text_key!r} must be a string")
    try:
      vocab_lib.check_fits(vocabulary, vocab_size)  # text needs the model's own vocabulary; raw ids do not
    except ValueError as e:
      raise UsageError(f"line {lineno}: {e}") from e
    ids = vocab_lib.encode(vocabulary, record[text_key])
    limit = vocab_lib.MAX_LENGTH
    return ids, len(ids) == limit and len(vocab_lib.encode(vocabulary, record[text_key], limit + 1)) > limit
  return None, False


def _parse_line(line, lineno, vocabulary, vocab_size, need_targets) -> tuple:
  """(the record of one input line, whether a text of it was truncated)."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise UsageError(f"line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
  if not isinstance(record, dict):
    raise UsageError(f"line {lineno}: expected a JSON object with 'inputs' or 'input_ids'")
  inputs, inputs_cut = _ids(record, "inputs", "input_ids", vocabulary, vocab_size, lineno)
  targets, targets_cut = _ids(record, "targets", "target_ids", vocabulary, vocab_size, lineno)
  if inputs is None:
    raise UsageError(f"line {lineno}: needs 'inputs' (text) or 'input_ids' (list of ids)")
  if need_targets and targets is None:
    raise UsageError(f"line {lineno}: needs 'targets' (text) or 'target_ids' (list of ids)")
  return {"input_ids": inputs, "target_ids": targets}, inputs_cut or targets_cut


def bucket(length: int) -> int:
  """Pad lengths to the next power of two (at least 8) so few shapes get compiled."""
  return max(8, 1 << (length - 1).bit_length())


def pad(rows: list, batch_size: int) -> np.ndarray:
  return pad_tokens(rows, bucket(max(len(r) for r in rows)), batch_size)


def batches(records: list, batch_size: int):
  for start in range(0, len(records), batch_size):
    yield records[start:start + batch_size]


def score_records(loaded: assembly.LoadedModel, records: list, batch_size: int) -> list[dict]:
  """Per-record {'sum_logprob', 'mean_logprob', 'num_target_tokens'} (algorithm.md §6 rank-classification score)."""
  results = []
  for chunk in batches(records, batch_size):
    enc = pad([r["input_ids"] for r in chunk], batch_size)
    tgt = pad([r["target_ids"] for r in chunk], batch_size)
    batch = {"encoder_input_tokens": enc, "decoder_input_tokens": shift_right(tgt), "decoder_target_tokens": tgt}
    _, scores = loaded.model.jit_score(loaded.variables, loaded.with_expert_weights(batch), return_intermediates=True)
    scores = {k: np.asarray(scores[k])[:len(chunk)] for k in ("sum_logprob", "mean_logprob", "num_target_tokens")}
    results += [{"sum_logprob": float(scores["sum_logprob"][i]), "mean_logprob": float(scores["mean_logprob"][i]),
                 "num_target_tokens": int(scores["num_target_tokens"][i])} for i in range(len(chunk))]
  return results


def generate_records(loaded: assembly.LoadedModel, records: list, batch_size: int, max_decode_length: int) -> list[list]:
  """Greedy output ids (up to and excluding EOS) per record."""
  outputs = []
  for chunk in batches(records, batch_size):
    enc = pad([r["input_ids"] for r in chunk], batch_size)
    batch = {"encoder_input_tokens": enc, "decoder_input_tokens": np.zeros((len(enc), max_decode_length), np.int32)}
    tokens = np.asarray(loaded.model.jit_predict(loaded.variables, loaded.with_expert_weights(batch))[0])
    for row in tokens[:len(chunk)]:
      row = list(row)
      outputs.append([int(t) for t in row[:row.index(1)] if t > 0] if 1 in row else [int(t) for t in row if t > 0])
  return outputs


@contextlib.contextmanager
def output_file(path: Optional[str]):
  """--output opened before any work (so an unwritable path fails first, exit code 2), or None for standard
  output. An existing file keeps its content until `write_jsonl` replaces it; a file this run created is
  removed again when the run fails."""
  if not path:
    yield None
    return
  existed = os.path.exists(path)
  try:
    f = open(path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
  except OSError as e:
    raise UsageError(f"cannot write --output {path!r}: {e.strerror}; pass a writable path") from e
  try:
    with f:
      yield f
  except BaseException:
    if not existed:
      with contextlib.suppress(OSError):
        os.remove(path)
    raise


def write_jsonl(rows: list[dict], out) -> None:
  """`rows` as JSON lines, replacing the content of `out` (an `output_file`, None for standard output); a NaN
  or Inf value is an error, never written."""
  try:
    text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows)
  except ValueError as e:
    bad = [i + 1 for i, r in enumerate(rows) if not all(np.isfinite(v) for v in r.values() if isinstance(v, float))]
    raise UsageError(f"non-finite results (NaN or Inf) for {len(bad)} of {len(rows)} examples (numbers {bad[:10]} "
                     f"in input order): the model's weights or inputs produce them; check the checkpoint (for a "
                     f"library, `phatgoose library verify`)") from e
  if out is None:
    sys.stdout.write(text)
    return
  out.truncate(0)
  out.write(text)


def _prepare(args, need_targets):
  if args.batch_size < 1:
    raise UsageError(f"--batch_size must be at least 1, got {args.batch_size}")
  try:
    vocabulary = vocab_lib.get_vocabulary(args.vocab)
  except (FileNotFoundError, ValueError) as e:
    raise UsageError(str(e)) from e
  loaded = load_model(args)
  records = read_jsonl(args.input, vocabulary, loaded.model.config.vocab_size, need_targets,
                       args.error_on_truncation)
  return vocabulary, loaded, records


def run_score(args) -> int:
  with output_file(args.output) as out:
    _, loaded, records = _prepare(args, need_targets=True)
    write_jsonl(score_records(loaded, records, args.batch_size), out)
  return 0


def run_generate(args) -> int:
  with output_file(args.output) as out:
    vocabulary, loaded, records = _prepare(args, need_targets=False)
    outputs = generate_records(loaded, records, args.batch_size, args.max_decode_length)
    write_jsonl([{"output": vocab_lib.decode(vocabulary, ids), "output_ids": ids} for ids in outputs], out)
  return 0
