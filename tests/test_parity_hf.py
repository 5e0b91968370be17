"""Numerical parity with Hugging Face's PyTorch T5ForConditionalGeneration (the reference implementation)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from phatgoose_jax import cli
from phatgoose_jax.checkpoints.hf import load_hf
from phatgoose_jax.models import EncoderDecoderModel, new_tokens, shift_right
from phatgoose_jax.t5 import layout

CONFIGS = [
    dict(d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2, num_decoder_layers=2,
         relative_attention_num_buckets=8, relative_attention_max_distance=20),
    dict(d_model=24, d_kv=10, d_ff=40, num_heads=3, num_layers=1, num_decoder_layers=3,
         relative_attention_num_buckets=16, relative_attention_max_distance=32),
    dict(d_model=16, d_kv=16, d_ff=32, num_heads=2, num_layers=3, num_decoder_layers=1,
         relative_attention_num_buckets=32, relative_attention_max_distance=128),
]


def hf_model(tmp_path, seed, **sizes):
  torch.manual_seed(seed)
  config = transformers.T5Config(vocab_size=120, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                 dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **sizes)
  model = transformers.T5ForConditionalGeneration(config).eval()
  with torch.no_grad():  # random, non-trivial norms and biases
    for name, p in model.named_parameters():
      if "layer_norm" in name or "relative_attention_bias" in name:
        p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "layer_norm" in name else 0.0))
  model.save_pretrained(tmp_path)
  return model


def padded_batch(seed, vocab=120, batch=3, in_len=11, out_len=9):
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, vocab, (batch, in_len)).astype(np.int32)
  tgt = rng.integers(2, vocab, (batch, out_len)).astype(np.int32)
  enc[0, 7:] = 0
  enc[2, 4:] = 0
  tgt[1, 5:] = 0
  return enc, tgt


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_encoder_and_logits_match_transformers(tmp_path, index, scan_layers):
  """Unrolled, and with each stack under nn.scan (the checkpoint's per-layer weights stacked)."""
  reference = hf_model(tmp_path, index, **CONFIGS[index])
  config, params = load_hf(str(tmp_path))
  config = config.replace(dropout_rate=0.0, scan_layers=scan_layers)
  model = EncoderDecoderModel(config)
  params = layout.for_model({"params": params}, config)["params"]
  enc, tgt = padded_batch(index)
  dec_in = shift_right(tgt)
  with torch.no_grad():
    out = reference(input_ids=torch.tensor(enc, dtype=torch.long), attention_mask=torch.tensor(enc > 0),
                    decoder_input_ids=torch.tensor(dec_in, dtype=torch.long),
                    decoder_attention_mask=torch.tensor(np.concatenate([np.ones_like(tgt[:, :1]), tgt[:, :-1]], 1) > 0))
  variables = {"params": params}
  encoded = np.asarray(model.encode(variables, enc))
  logits = np.asarray(model.logits(variables, {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
                                               "decoder_target_tokens": tgt}))
  enc_valid, tgt_valid = enc > 0, tgt > 0
  assert np.abs(encoded[enc_valid] - out.encoder_last_hidden_state.numpy()[enc_valid]).max() <= 1e-4
  assert np.abs(logits[tgt_valid] - out.logits.numpy()[tgt_valid]).max() <= 1e-4


@pytest.mark.parametrize("max_length", [2, 4, 8])
def test_greedy_generation_of_a_protocol_length_equals_transformers_generate(tmp_path, max_length):
  """The paper's generation length L is Hugging Face `generate(max_length=L)`: L counts the decoder start
  token, so `new_tokens(L)` = L - 1 greedy tokens (src/models/interface_mixin.py:254-259)."""
  reference = hf_model(tmp_path, 3, **CONFIGS[0])
  config, params = load_hf(str(tmp_path))
  enc, _ = padded_batch(3)
  with torch.no_grad():
    hf = reference.generate(input_ids=torch.tensor(enc, dtype=torch.long), attention_mask=torch.tensor(enc > 0),
                            max_length=max_length, num_beams=1, do_sample=False).numpy()[:, 1:]
  steps = new_tokens(max_length)
  ours = np.asarray(EncoderDecoderModel(config.replace(dropout_rate=0.0)).predict_batch(
      {"params": params}, {"encoder_input_tokens": enc, "decoder_input_tokens": np.zeros((len(enc), steps), np.int32)}))
  np.testing.assert_array_equal(ours, np.pad(hf, [(0, 0), (0, steps - hf.shape[1])]))
  assert steps == max_length - 1


def test_cli_score_matches_transformers_log_likelihoods(tmp_path, capsys):
  reference = hf_model(tmp_path / "hf", 7, **CONFIGS[0])
  enc, tgt = padded_batch(7)
  lines = [{"input_ids": [int(t) for t in e if t > 0], "target_ids": [int(t) for t in g if t > 0]}
           for e, g in zip(enc, tgt)]
  (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
  assert cli.main(["score", "--base", str(tmp_path / "hf"), "--input", str(tmp_path / "in.jsonl")]) == 0
  got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert len(got) == len(lines)
  for record, result in zip(lines, got):
    ids = torch.tensor([record["target_ids"]])
    with torch.no_grad():
      logits = reference(input_ids=torch.tensor([record["input_ids"]]), labels=ids).logits
    token_ll = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[0, :, 0].numpy()
    assert result["num_target_tokens"] == len(record["target_ids"])
    np.testing.assert_allclose(result["sum_logprob"], token_ll.sum(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(result["mean_logprob"], token_ll.mean(), rtol=1e-5, atol=1e-5)


def test_cli_reports_bad_lines_with_line_numbers(tmp_path, capsys):
  hf_model(tmp_path / "hf", 8, **CONFIGS[0])
  cases = {"[1, 2]\n": "line 1", '{"input_ids": [3], "target_ids": [5]}\nnot json\n': "line 2: not valid JSON",
           '{"input_ids": [3, 999], "target_ids": [5]}\n': "outside the vocabulary",
           '{"input_ids": [3]}\n': "line 1: needs 'targets'"}
  for i, (text, message) in enumerate(cases.items()):
    (tmp_path / f"in{i}.jsonl").write_text(text)
    code = cli.main(["score", "--base", str(tmp_path / "hf"), "--input", str(tmp_path / f"in{i}.jsonl")])
    out, err = capsys.readouterr()
    assert code == 2 and message in err and out == ""
  code = cli.main(["score", "--base", str(tmp_path / "hf"), "--input", str(tmp_path / "missing.jsonl")])
  assert code == 2 and "missing.jsonl" in capsys.readouterr().err



def test_t5x_checkpoint_scores_like_the_hf_directory(tmp_path):
  """The same weights through a t5x checkpoint directory give the same CLI scores as the HF directory."""
  from phatgoose_jax.checkpoints.t5x import save_t5x
  hf_model(tmp_path / "hf", 9, **CONFIGS[1])
  _, params = load_hf(str(tmp_path / "hf"))
  save_t5x(str(tmp_path / "t5x"), params, step=1100000)
  (tmp_path / "in.jsonl").write_text('{"input_ids": [5, 6, 7, 1], "target_ids": [9, 8, 1]}\n')
  outputs = []
  for kind in ("hf", "t5x"):  # one --base flag: the format is recognised from the files
    run = subprocess.run([sys.executable, "-m", "phatgoose_jax.cli", "score", "--base", str(tmp_path / kind),
                          "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / f"{kind}.jsonl")],
                         capture_output=True, text=True, check=True)
    assert run.stdout == "" and "cuda" not in run.stderr.lower()  # native start-up lines hidden
    outputs.append(json.loads((tmp_path / f"{kind}.jsonl").read_text()))
  assert outputs[1]["num_target_tokens"] == 3
  np.testing.assert_allclose(outputs[1]["sum_logprob"], outputs[0]["sum_logprob"], rtol=1e-6)
