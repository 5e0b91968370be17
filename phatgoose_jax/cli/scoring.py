"""What `phatgoose score` and `phatgoose generate` run (the flags are in `cli/model.py`).

Each input line is `{"inputs": ..., "targets": ...}` (text, encoded with the vocabulary, EOS appended)
or `{"input_ids": [...], "target_ids": [...]}` (raw ids, used as they are: scoring ids alone reads no --vocab);
texts over `vocab.MAX_LENGTH` tokens are truncated with a warning that counts them (`--error_on_truncation`
refuses them). Results go one JSON object per input line, in order, to --output or standard output; --output
is opened before any work and written only with complete results (a NaN or Inf score is an error); all logging
goes to standard error.
The model is a `text_model.TextModel` (`phatgoose_jax.load`): a checkpoint of any format, routed over `--library`
when given; it encodes, checks, batches and decodes.
"""
import contextlib
import json
import os
import sys
from typing import Optional

import numpy as np

from phatgoose_jax import routers, text_model
from phatgoose_jax import library as lib
from phatgoose_jax import vocab as vocab_lib
from phatgoose_jax.cli import UsageError


def _data_hint(router: str, library: str) -> str:
  if not routers.spec(router).reads_texts:
    return ""
  free = ", ".join(r for r, spec in routers.ROUTERS.items() if not spec.needs)
  return (f"; --router {router} reads each expert's training data: run `phatgoose evaluate --base BASE --library "
          f"{library} --router {router} --task TASK --output_dir DIR` once (any TASK; it computes and caches what "
          f"the router needs), or choose a router that needs no data: {free}")


def load_model(args, texts: bool = True) -> text_model.TextModel:
  """The --base model (any checkpoint format), routed over --library's readable experts when given; with
  `texts` False (ids in, scores out) without a vocabulary, so that --vocab is not checked against it."""
  names = None
  if args.library:
    if not os.path.isdir(args.library):
      raise UsageError(f"no library directory {args.library}")
    library = lib.ExpertLibrary(args.library)
    for name, why in library.unreadable().items():
      print(f"warning: skipping expert {name!r}: {why}", file=sys.stderr)
    names = [m["name"] for m in library.list()]
  try:
    return text_model.load(args.base, args.library, args.router, args.top_k, names, args.dtype,
                           args.vocab if texts else None, args.batch_size)
  except (OSError, ValueError, ImportError) as e:
    raise UsageError(f"{e}{_data_hint(args.router, args.library) if args.library else ''}") from e


def read_jsonl(path: str) -> list[tuple]:
  """(line number, JSON object) of each non-blank line of --input, read before the model: UTF-8, valid JSON."""
  try:
    with open(path, "rb") as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise UsageError(f"cannot read --input {path!r}: {e.strerror}") from e
  objects = []
  for lineno, raw in enumerate(lines, 1):
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise UsageError(f"line {lineno} of --input {path!r} is not UTF-8 text ({e.reason} at byte {e.start + 1} "
                       f"of the line); re-encode the file as UTF-8, e.g. with iconv -t UTF-8") from e
    if line.strip():
      objects.append((lineno, _parse_line(line, lineno)))
  return objects


def has_text(objects: list[tuple]) -> bool:
  """Whether some line gives a text where it gives no ids (ids win when a line has both)."""
  return any(text in record and ids not in record
             for _, record in objects for text, ids in (("inputs", "input_ids"), ("targets", "target_ids")))


def records(objects: list[tuple], model: text_model.TextModel, need_targets: bool,
            error_on_truncation: bool = False) -> list[dict]:
  """Validated input lines: each {'input_ids': [...], 'target_ids': [...] or None}. Texts over
  `vocab.MAX_LENGTH` tokens are truncated, with a warning counting them (an error with `error_on_truncation`)."""
  out, truncated = [], []
  for lineno, record in objects:
    parsed, cut = _record(record, lineno, model, need_targets)
    out.append(parsed)
    truncated += [lineno] if cut else []
  _report_truncation(truncated, len(out), error_on_truncation)
  return out


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


def _ids(record, text_key, ids_key, model: text_model.TextModel, lineno) -> tuple:
  """(the ids of `ids_key` or of the text of `text_key`, or None; whether the text was truncated)."""
  try:
    if ids_key in record:
      return model.check_ids(record[ids_key], repr(ids_key)), False
    if text_key in record:
      if not isinstance(record[text_key], str):
        raise ValueError(f"{text_key!r} must be a string")
      return model.encode(record[text_key])
  except ValueError as e:
    raise UsageError(f"line {lineno}: {e}") from e
  return None, False


def _parse_line(line: str, lineno: int) -> dict:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise UsageError(f"line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
  if not isinstance(record, dict):
    raise UsageError(f"line {lineno}: expected a JSON object with 'inputs' or 'input_ids'")
  return record


def _record(record: dict, lineno: int, model: text_model.TextModel, need_targets: bool) -> tuple:
  """(the ids of one input line, whether a text of it was truncated)."""
  inputs, inputs_cut = _ids(record, "inputs", "input_ids", model, lineno)
  targets, targets_cut = _ids(record, "targets", "target_ids", model, lineno)
  if inputs is None:
    raise UsageError(f"line {lineno}: needs 'inputs' (text) or 'input_ids' (list of ids)")
  if need_targets and targets is None:
    raise UsageError(f"line {lineno}: needs 'targets' (text) or 'target_ids' (list of ids)")
  return {"input_ids": inputs, "target_ids": targets}, inputs_cut or targets_cut


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


def _prepare(args, need_targets: bool):
  """The model and the input records; generation always decodes text, scoring of ids needs no vocabulary."""
  if args.batch_size < 1:
    raise UsageError(f"--batch_size must be at least 1, got {args.batch_size}")
  objects = read_jsonl(args.input)
  model = load_model(args, texts=not need_targets or has_text(objects))
  return model, records(objects, model, need_targets, args.error_on_truncation)


def run_score(args) -> int:
  with output_file(args.output) as out:
    model, records = _prepare(args, need_targets=True)
    scores = model.score_ids([r["input_ids"] for r in records], [r["target_ids"] for r in records])
    write_jsonl([{"sum_logprob": s["sum_logprob"], "mean_logprob": s["mean_logprob"],
                  "num_target_tokens": s["num_tokens"]} for s in scores], out)
  return 0


def run_generate(args) -> int:
  if not 0 < args.max_decode_length <= vocab_lib.MAX_LENGTH:
    raise UsageError(f"--max_decode_length must be in 1..{vocab_lib.MAX_LENGTH}, got {args.max_decode_length}")
  with output_file(args.output) as out:
    model, records = _prepare(args, need_targets=False)
    outputs = model.generate_ids([r["input_ids"] for r in records], args.max_decode_length)
    write_jsonl([{"output": o["text"], "output_ids": o["token_ids"]} for o in outputs], out)
  return 0
