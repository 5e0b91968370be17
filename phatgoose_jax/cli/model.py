"""`phatgoose score` and `phatgoose generate`: a base or routed T5 on JSONL inputs.

Model flags (shared with other commands through `add_model_flags` / `load_model`):
  one of --hf_dir DIR | --t5x_dir DIR | --checkpoint DIR, then --dtype, --vocab, and for a routed
  model --library DIR --router NAME --top_k K.
Each input line is `{"inputs": ..., "targets": ...}` (text, encoded with the vocabulary, EOS appended)
or `{"input_ids": [...], "target_ids": [...]}` (raw ids, used as they are). Results go one JSON object per
input line, in order, to --output or standard output; all logging goes to standard error.
"""
import dataclasses
import json
import sys
from typing import Callable, Optional

import numpy as np

from phatgoose_jax import vocab as vocab_lib
from phatgoose_jax.cli import UsageError
from phatgoose_jax.models import EncoderDecoderModel, pad_tokens, shift_right


@dataclasses.dataclass
class LoadedModel:
  """A model ready to run: its variables, and per-example fixed expert weights for per-example routers."""
  model: EncoderDecoderModel
  variables: dict
  expert_weights_fn: Optional[Callable[[np.ndarray], np.ndarray]] = None

  def expert_weights(self, encoder_tokens):
    return None if self.expert_weights_fn is None else self.expert_weights_fn(encoder_tokens)


def add_model_flags(parser, routed=True):
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--hf_dir", help="Hugging Face T5 directory (config.json + safetensors or .bin)")
  source.add_argument("--t5x_dir", help="t5x checkpoint directory (checkpoint_N/ or its parent)")
  source.add_argument("--checkpoint", help="a checkpoint saved by phatgoose (orbax)")
  parser.add_argument("--preset", help="T5 size of a t5x checkpoint (default: inferred from its shapes)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
  parser.add_argument("--vocab", default="byte", help="'byte' or the path of a SentencePiece .model")
  parser.add_argument("--batch_size", type=int, default=16)
  if routed:
    parser.add_argument("--library", help="expert library directory: run the routed model")
    parser.add_argument("--router", default="phatgoose", help="router name (see `phatgoose library --help`)")
    parser.add_argument("--top_k", type=int, default=2, help="experts per token (1..E)")


def load_base(args):
  """(T5Config, params) from whichever source flag was given; errors become UsageErrors."""
  from phatgoose_jax.checkpoints import hf, native, t5x
  from phatgoose_jax.t5.config import preset
  try:
    if args.hf_dir:
      config, params = hf.load_hf(args.hf_dir)
    elif args.t5x_dir:
      config, params = t5x.load_t5x(args.t5x_dir, preset(args.preset) if args.preset else None)
    else:
      restored = native.load_native(args.checkpoint)
      config, params = restored.t5_config, restored.state["params"]
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise UsageError(str(e)) from e
  return config.replace(dtype=args.dtype, dropout_rate=0.0), params


def load_model(args) -> LoadedModel:
  config, params = load_base(args)
  if getattr(args, "library", None):
    from phatgoose_jax.cli.library import load_routed
    return load_routed(args, config, params)
  return LoadedModel(EncoderDecoderModel(config), {"params": params})


def read_jsonl(path: str, vocabulary, vocab_size: int, need_targets: bool) -> list[dict]:
  """Parsed and validated input lines: each {'input_ids': [...], 'target_ids': [...] or None}."""
  try:
    with open(path) as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise UsageError(f"cannot read --input {path!r}: {e.strerror}") from e
  return [_parse_line(line, i + 1, vocabulary, vocab_size, need_targets) for i, line in enumerate(lines)
          if line.strip()]


def _ids(record, text_key, ids_key, vocabulary, vocab_size, lineno):
  if ids_key in record:
    ids = record[ids_key]
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
      raise UsageError(f"line {lineno}: {ids_key!r} must be a non-empty list of integers")
    bad = [i for i in ids if not 0 < i < vocab_size]
    if bad:
      raise UsageError(f"line {lineno}: {ids_key!r} has ids outside the vocabulary (1..{vocab_size - 1}): {bad[:5]}")
    return ids
  if text_key in record:
    if not isinstance(record[text_key], str):
      raise UsageError(f"line {lineno}: {text_key!r} must be a string")
    return vocab_lib.encode(vocabulary, record[text_key])
  return None


def _parse_line(line, lineno, vocabulary, vocab_size, need_targets):
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise UsageError(f"line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
  if not isinstance(record, dict):
    raise UsageError(f"line {lineno}: expected a JSON object with 'inputs' or 'input_ids'")
  inputs = _ids(record, "inputs", "input_ids", vocabulary, vocab_size, lineno)
  targets = _ids(record, "targets", "target_ids", vocabulary, vocab_size, lineno)
  if inputs is None:
    raise UsageError(f"line {lineno}: needs 'inputs' (text) or 'input_ids' (list of ids)")
  if need_targets and targets is None:
    raise UsageError(f"line {lineno}: needs 'targets' (text) or 'target_ids' (list of ids)")
  return {"input_ids": inputs, "target_ids": targets}


def bucket(length: int) -> int:
  """Pad lengths to the next power of two (at least 8) so few shapes get compiled."""
  return max(8, 1 << (length - 1).bit_length())


def pad(rows: list, batch_size: int) -> np.ndarray:
  return pad_tokens(rows, bucket(max(len(r) for r in rows)), batch_size)


def batches(records: list, batch_size: int):
  for start in range(0, len(records), batch_size):
    yield records[start:start + batch_size]


def score_records(loaded: LoadedModel, records: list, batch_size: int) -> list[dict]:
  """Per-record {'sum_logprob', 'mean_logprob', 'num_target_tokens'} (algorithm.md §6 rank-classification score)."""
  results = []
  for chunk in batches(records, batch_size):
    enc = pad([r["input_ids"] for r in chunk], batch_size)
    tgt = pad([r["target_ids"] for r in chunk], batch_size)
    batch = {"encoder_input_tokens": enc, "decoder_input_tokens": shift_right(tgt), "decoder_target_tokens": tgt}
    scores = loaded.model.jit_score(loaded.variables, batch, loaded.expert_weights(enc))
    scores = {k: np.asarray(v)[:len(chunk)] for k, v in scores.items()}
    results += [{"sum_logprob": float(scores["sum_logprob"][i]), "mean_logprob": float(scores["mean_logprob"][i]),
                 "num_target_tokens": int(scores["num_target_tokens"][i])} for i in range(len(chunk))]
  return results


def generate_records(loaded: LoadedModel, records: list, batch_size: int, max_decode_length: int) -> list[list]:
  """Greedy output ids (up to and excluding EOS) per record."""
  outputs = []
  for chunk in batches(records, batch_size):
    enc = pad([r["input_ids"] for r in chunk], batch_size)
    tokens = np.asarray(loaded.model.jit_predict(loaded.variables, enc, max_decode_length=max_decode_length,
                                                  expert_weights=loaded.expert_weights(enc)))
    for row in tokens[:len(chunk)]:
      row = list(row)
      outputs.append([int(t) for t in row[:row.index(1)] if t > 0] if 1 in row else [int(t) for t in row if t > 0])
  return outputs


def write_jsonl(rows: list[dict], path: Optional[str]):
  text = "".join(json.dumps(r) + "\n" for r in rows)
  if path:
    with open(path, "w") as f:
      f.write(text)
  else:
    sys.stdout.write(text)


def _prepare(args, need_targets):
  vocabulary = vocab_lib.get_vocabulary(args.vocab) if args.vocab == "byte" or args.vocab.endswith(".model") \
      else None
  if vocabulary is None:
    raise UsageError(f"--vocab must be 'byte' or a SentencePiece .model path, got {args.vocab!r}")
  loaded = load_model(args)
  records = read_jsonl(args.input, vocabulary, loaded.model.config.vocab_size, need_targets)
  return vocabulary, loaded, records


def run_score(args) -> int:
  _, loaded, records = _prepare(args, need_targets=True)
  write_jsonl(score_records(loaded, records, args.batch_size), args.output)
  return 0


def run_generate(args) -> int:
  vocabulary, loaded, records = _prepare(args, need_targets=False)
  outputs = generate_records(loaded, records, args.batch_size, args.max_decode_length)
  write_jsonl([{"output": vocab_lib.decode(vocabulary, ids), "output_ids": ids} for ids in outputs], args.output)
  return 0


def register(subparsers):
  score = subparsers.add_parser("score", help="per-example target log-likelihoods of a JSONL file")
  add_model_flags(score)
  score.add_argument("--input", required=True, help="JSONL: {inputs, targets} or {input_ids, target_ids}")
  score.add_argument("--output", help="JSONL results (default: standard output)")
  score.set_defaults(func=run_score)
  generate = subparsers.add_parser("generate", help="greedy decoding of a JSONL file of inputs")
  add_model_flags(generate)
  generate.add_argument("--input", required=True, help="JSONL: {inputs} or {input_ids}")
  generate.add_argument("--output", help="JSONL results (default: standard output)")
  generate.add_argument("--max_decode_length", type=int, default=64)
  generate.set_defaults(func=run_generate)
