"""Fault injection through the `phatgoose` command: bad input, broken files, permission errors, unwritable
outputs, mixed / corrupt / data-less libraries, NaN results and over-long texts. Each must end in one line
naming the problem and the fix, exit code 2, and leave nothing half-written."""
import json
import os
import shutil

import gin
import numpy as np
import pytest
from safetensors.numpy import save_file

from phatgoose_jax import cli
from phatgoose_jax import library as lib
from phatgoose_jax import vocab
from phatgoose_jax.checkpoints import hf, names
from phatgoose_jax.demo import suite

import random_trees as trees

CFG = trees.TINY


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("base"))
  hf.save_hf(path, CFG, trees.random_params())
  return path


@pytest.fixture(scope="module")
def library_dir(tmp_path_factory, base_dir):
  """A library of two gated experts, x and y, imported from a reference-layout file."""
  return trees.imported_library(tmp_path_factory.mktemp("library"), base_dir, "x,y")


@pytest.fixture
def library_copy(tmp_path, library_dir):
  path = str(tmp_path / "lib")
  shutil.copytree(library_dir, path)
  return path


@pytest.fixture
def inputs(tmp_path):
  path = tmp_path / "in.jsonl"
  path.write_text(json.dumps({"inputs": "a question", "targets": "an answer"}) + "\n")
  return str(path)


def fails_in_one_line(capsys, argv, *expected):
  """Run the command; it must exit 2 with one stderr line holding every `expected` text."""
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  assert code == 2, (out, err)
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
  for text in expected:
    assert text in err, err
  return err


def test_score_refuses_non_utf8_input(tmp_path, base_dir, capsys):
  path = tmp_path / "latin1.jsonl"
  path.write_bytes(json.dumps({"inputs": "ok", "targets": "ok"}).encode() + b"\n" +
                   '{"inputs": "caf\u00e9", "targets": "x"}\n'.encode("latin-1"))
  fails_in_one_line(capsys, ["score", "--base", base_dir, "--input", str(path)], "line 2", "not UTF-8",
                    "iconv")


def test_score_refuses_a_missing_vocab_file(base_dir, inputs, capsys):
  fails_in_one_line(capsys, ["score", "--base", base_dir, "--input", inputs, "--vocab", "/no/such/spiece.model"],
                    "no SentencePiece model at '/no/such/spiece.model'", "--vocab byte")


def test_score_refuses_batch_size_zero(base_dir, inputs, capsys):
  fails_in_one_line(capsys, ["score", "--base", base_dir, "--input", inputs, "--batch_size", "0"],
                    "--batch_size must be at least 1, got 0")


@pytest.mark.parametrize("kind", ["truncated", "not safetensors"])
def test_library_add_refuses_a_broken_expert_file(tmp_path, base_dir, capsys, kind):
  path = str(tmp_path / "expert.safetensors")
  lora, _ = trees.random_expert(0)
  save_file({f"lora/{k}": v for k, v in lora.items()}, path)
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2] if kind == "truncated" else b"\x80\x02PK torch pickle" * 10)
  library = str(tmp_path / "lib")
  fails_in_one_line(capsys, ["library", "add", path, "--library", library, "--base", base_dir, "--name", "e"],
                    "is not a readable safetensors file", "pass a native checkpoint directory")
  assert lib.ExpertLibrary(library).names() == []


@pytest.mark.parametrize("command", ["add", "remove", "list", "verify"])
def test_permission_errors_in_library_commands_are_one_line(tmp_path, base_dir, library_copy, capsys, monkeypatch,
                                                            command):
  """As on a library directory the user may not write (or read): the os call raises EACCES."""
  flat = str(tmp_path / "expert.safetensors")
  save_file({f"lora/{k}": v for k, v in trees.random_expert(5)[0].items()}, flat)

  def denied(path, *args, **kwargs):
    raise PermissionError(13, "Permission denied", path)
  call = {"add": "mkdir", "remove": "rename", "list": "listdir", "verify": "listdir"}[command]
  argv = {"add": ["add", flat, "--name", "new", "--base", base_dir], "remove": ["remove", "x"], "list": ["list"],
          "verify": ["verify"]}[command]
  monkeypatch.setattr(os, call, denied)
  fails_in_one_line(capsys, ["library", *argv, "--library", library_copy], "Permission denied",
                    "check its permissions")
  monkeypatch.undo()
  assert sorted(os.listdir(library_copy)) == ["x", "y"]


def test_unwritable_output_fails_before_any_work(tmp_path, library_dir, inputs, capsys):
  """The base model does not even exist: the output error must come first."""
  for output in (str(tmp_path / "no_dir" / "out.jsonl"), str(tmp_path)):
    for command in ("score", "generate"):
      fails_in_one_line(capsys, [command, "--base", str(tmp_path / "missing_base"), "--input", inputs,
                                 "--output", output], "cannot write --output", "pass a writable path")


def test_a_failed_run_leaves_outputs_as_they_were(tmp_path, base_dir, capsys):
  bad = tmp_path / "bad.jsonl"
  bad.write_text("{not json\n")
  kept, fresh = tmp_path / "kept.jsonl", tmp_path / "fresh.jsonl"
  kept.write_text("previous results\n")
  for output in (kept, fresh):
    fails_in_one_line(capsys, ["score", "--base", base_dir, "--input", str(bad), "--output", str(output)],
                      "line 1: not valid JSON")
  assert kept.read_text() == "previous results\n" and not fresh.exists()


def test_texts_over_the_length_are_counted_and_can_be_refused(tmp_path, base_dir, capsys):
  path = tmp_path / "long.jsonl"
  rows = [{"inputs": "x" * (vocab.MAX_LENGTH + 5), "targets": "y"}, {"inputs": "short", "targets": "z"},
          {"inputs": "fits", "targets": "y" * (vocab.MAX_LENGTH - 1)}, {"inputs": "q", "targets": "y" * 2000}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  output = tmp_path / "out.jsonl"
  output.write_text("previous results\n")
  code = cli.main(["score", "--base", base_dir, "--input", str(path), "--output", str(output)])
  _, err = capsys.readouterr()
  assert code == 0 and "warning: 2 of 4 examples (lines 1, 4) have inputs or targets longer than 512 tokens" in err
  results = [json.loads(line) for line in output.read_text().splitlines()]
  assert [r["num_target_tokens"] for r in results] == [2, 2, vocab.MAX_LENGTH, vocab.MAX_LENGTH]
  fails_in_one_line(capsys, ["score", "--base", base_dir, "--input", str(path), "--error_on_truncation"],
                    "2 of 4 examples (lines 1, 4)", "longer than 512 tokens")


def test_nonfinite_scores_are_an_error_not_json(tmp_path, inputs, capsys):
  flat = names.flatten(trees.random_params())
  flat["decoder/logits_dense/kernel"] = flat["decoder/logits_dense/kernel"] * np.float32(np.nan)
  broken = str(tmp_path / "nan_base")
  hf.save_hf(broken, CFG, names.unflatten(flat))
  output = tmp_path / "out.jsonl"
  fails_in_one_line(capsys, ["score", "--base", broken, "--input", inputs, "--output", str(output)],
                    "non-finite results (NaN or Inf) for 1 of 1 examples")
  assert not output.exists()


def test_score_refuses_a_mixed_library_naming_the_entry(tmp_path, base_dir, library_copy, inputs, capsys):
  other = lib.ExpertLibrary(str(tmp_path / "other"))
  other.add("odd", trees.random_expert(3, rank=2)[0], base=lib.ExpertLibrary(library_copy).manifest("x")["base"])
  shutil.copytree(os.path.join(other.path, "odd"), os.path.join(library_copy, "odd"))
  fails_in_one_line(capsys, ["score", "--base", base_dir, "--input", inputs, "--library", library_copy],
                    "mixes experts", "'odd' (its LoRA rank is 2")
  code = cli.main(["library", "verify", "--library", library_copy])
  out, _ = capsys.readouterr()
  assert code == 1 and "error: odd: does not fit the library: its LoRA rank is 2" in out


@pytest.mark.parametrize("router", ["average_activation", "retrieval"])
def test_data_routers_without_cached_data_say_what_to_run(base_dir, library_dir, inputs, capsys, router):
  fails_in_one_line(capsys, ["score", "--base", base_dir, "--input", inputs, "--library", library_dir,
                             "--router", router],
                    f"--router {router} reads each expert's training data",
                    f"run `phatgoose evaluate --base BASE --library {library_dir} --router {router}")


def test_a_corrupt_manifest_is_listed_and_can_be_removed(base_dir, library_copy, inputs, capsys):
  with open(os.path.join(library_copy, "y", lib.MANIFEST), "w") as f:
    f.write("{truncated")
  code = cli.main(["score", "--base", base_dir, "--input", inputs, "--library", library_copy, "--top_k", "1"])
  out, err = capsys.readouterr()
  assert code == 0 and "warning: skipping expert 'y': corrupt manifest" in err and "sum_logprob" in out
  code = cli.main(["library", "list", "--library", library_copy])
  out, _ = capsys.readouterr()
  lines = out.splitlines()
  assert code == 0 and lines[1].split()[0] == "x"
  assert lines[2].startswith("y") and "CORRUPT: corrupt manifest" in lines[2]
  code = cli.main(["library", "list", "--library", library_copy, "--json"])
  listed = json.loads(capsys.readouterr()[0])
  assert code == 0 and [e["name"] for e in listed] == ["x", "y"] and "corrupt manifest" in listed[1]["corrupt"]
  assert cli.main(["library", "remove", "y", "--library", library_copy]) == 0
  assert cli.main(["library", "verify", "--library", library_copy]) == 0
  assert sorted(os.listdir(library_copy)) == ["x"]


def test_verify_repair_restores_an_entry_hidden_by_a_killed_replace(library_copy, capsys):
  """The state an earlier version left when killed between the two renames of a replace."""
  trash = os.path.join(library_copy, ".trash-y-abc123")
  os.makedirs(trash)
  os.rename(os.path.join(library_copy, "y"), os.path.join(trash, "y"))
  with lib._locked(library_copy):  # a writer holds the lock: nothing can be recovered yet
    code = cli.main(["library", "verify", "--library", library_copy])
  out, _ = capsys.readouterr()
  assert code == 1 and "only copy of ['y']" in out and "safe to delete" not in out and "--repair" in out
  code = cli.main(["library", "verify", "--library", library_copy, "--repair"])  # opening alone recovers, too
  out, _ = capsys.readouterr()
  assert code == 0 and "2 entries, 0 errors" in out and sorted(os.listdir(library_copy)) == ["x", "y"]


def test_evaluate_refuses_an_unknown_precision(tmp_path, base_dir, capsys):
  fails_in_one_line(capsys, ["evaluate", "--base", base_dir, "--task", "demo_upper_eval", "--output_dir",
                             str(tmp_path / "out"), "--precision", "fp16"], "--precision", "float32, bfloat16")
  assert "fp16" not in gin.config_str()  # a refused configuration leaves no binding behind for the next run


@pytest.fixture(scope="module")
def wide_base(tmp_path_factory):
  """A tiny model whose embedding (1024 rows) no test vocabulary (bytes: 259 ids) fits, and a library of one
  expert trained on it (on the byte-level demo tasks, registered here)."""
  suite.register(0, suite.SuiteSizes(train=8, validation=4, held_out=3))
  path = str(tmp_path_factory.mktemp("wide"))
  config = CFG.replace(vocab_size=1024)
  params = trees.random_params(config)
  hf.save_hf(path, config, params)
  library = lib.ExpertLibrary(path + "_library")
  lora, gates = trees.random_expert(0)
  library.add("upper", lora, base=lib.base_fingerprint(config, params), gates=gates, dataset="demo_upper")
  return path



@pytest.fixture(autouse=True)
def no_stage_bindings_after():
  """A CLI stage run in-process leaves its run file's bindings in gin (e.g. `train.train_gate.task`): none of
  this module's outlives its test, for the tests that run after it in the same worker."""
  yield
  gin.clear_config()

@pytest.mark.parametrize("command", ["evaluate", "train-expert", "train-gate", "assemble", "route-stats", "serve"])
def test_every_stage_that_reads_text_refuses_a_vocabulary_the_model_does_not_fit(tmp_path, wide_base, library_dir,
                                                                                 command, capsys, monkeypatch):
  """Before any data or weights are read: the one-line error names the vocabulary and the embedding."""
  monkeypatch.setattr(hf, "load_hf", lambda *a, **k: pytest.fail("weights were read"))
  flags = {"evaluate": ["--task", "demo_upper_eval", "--output_dir", str(tmp_path / "o")],
           "route-stats": ["--task", "demo_upper_eval", "--library", library_dir, "--output_dir", str(tmp_path / "o")],
           "train-expert": ["--task", "demo_upper", "--library", str(tmp_path / "l"), "--workdir", str(tmp_path / "w")],
           "train-gate": ["--task", "demo_upper", "--library", library_dir, "--name", "x",
                          "--workdir", str(tmp_path / "w")],
           "assemble": ["--library", wide_base + "_library", "--router", "average_activation_pooled",
                        "--output", str(tmp_path / "a")],
           "serve": []}[command]
  fails_in_one_line(capsys, [command, "--base", wide_base] + flags, "the byte vocabulary (259 ids) does not match the "
                    "model's embedding of 1024 rows")
  assert not os.path.exists(tmp_path / "w") and not os.path.exists(tmp_path / "a")
