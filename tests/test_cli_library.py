"""`phatgoose library ...` round trips on a tiny model saved as a Hugging Face directory."""
import json
import os

import numpy as np
import pytest

from phatgoose_jax import cli
from phatgoose_jax import library as lib
from phatgoose_jax.checkpoints import hf, names, native, peft, reference
from phatgoose_jax.t5.config import ALL_TARGETS, preset
from phatgoose_jax.experts.config import ExpertConfig

import random_trees as trees

CFG = preset("tiny")
RANK = 4


def random_params(seed=0):
  return trees.random_params(CFG, seed)


def random_expert(seed, targets=ALL_TARGETS):
  return trees.random_expert(seed, RANK, targets, CFG, lora_scale=1.0)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("base"))
  hf.save_hf(path, CFG, random_params())
  return path


def run(capsys, *argv):
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def test_add_list_verify_remove_export(tmp_path, base_dir, capsys):
  library = str(tmp_path / "lib")
  lora, gates = random_expert(0)
  checkpoint = str(tmp_path / "native")
  native.save_native(checkpoint, {"lora": names.unflatten(lora), "gates": names.unflatten(gates)}, CFG,
                     ExpertConfig(mode="gated", rank=RANK))
  flat_file = str(tmp_path / "expert.safetensors")
  from safetensors.numpy import save_file
  other, _ = random_expert(1)
  save_file({f"lora/{k}": v for k, v in other.items()}, flat_file)

  assert run(capsys, "library", "add", checkpoint, "--library", library, "--base", base_dir, "--name", "gated",
             "--dataset", "ag_news", "--training", '{"steps": 100}')[0] == 0
  assert run(capsys, "library", "add", flat_file, "--library", library, "--base", base_dir, "--name", "plain")[0] == 0
  code, out, _ = run(capsys, "library", "list", "--library", library, "--json")
  listed = {m["name"]: m for m in json.loads(out)}
  assert code == 0 and sorted(listed) == ["gated", "plain"]
  assert listed["gated"]["gate"] and not listed["plain"]["gate"] and listed["gated"]["dataset"] == "ag_news"
  assert listed["gated"]["training"]["steps"] == 100
  assert listed["gated"]["training"]["expert_config"]["mode"] == "gated"
  code, out, _ = run(capsys, "library", "list", "--library", library)
  assert code == 0 and out.splitlines()[0].split()[:3] == ["name", "dataset", "rank"] and "ag_news" in out

  code, _, err = run(capsys, "library", "add", flat_file, "--library", library, "--base", base_dir, "--name", "plain")
  assert code == 2 and "already has an expert named 'plain'" in err

  assert run(capsys, "library", "verify", "--library", library)[0] == 0
  out_dir = str(tmp_path / "peft")
  assert run(capsys, "library", "export-peft", "--library", library, "--name", "plain", "--out", out_dir)[0] == 0
  exported = peft.load_peft(out_dir, CFG)
  for k, v in other.items():
    np.testing.assert_allclose(exported.lora[k], v, rtol=1e-6)
  assert run(capsys, "library", "import-peft", out_dir, "--base", base_dir, "--library", library,
             "--name", "back")[0] == 0
  back = lib.ExpertLibrary(library).load("back")
  for k, v in other.items():
    np.testing.assert_allclose(back.lora[k], v, rtol=1e-6)

  weights = os.path.join(library, "back", lib.WEIGHTS)
  with open(weights, "r+b") as f:
    f.seek(-3, os.SEEK_END)
    f.write(b"\xff\xff\xff")
  code, out, _ = run(capsys, "library", "verify", "--library", library)
  assert code == 1 and "error: back:" in out and "corrupt" in out
  assert run(capsys, "library", "remove", "back", "--library", library)[0] == 0
  assert run(capsys, "library", "verify", "--library", library)[0] == 0
  assert lib.ExpertLibrary(library).names() == ["gated", "plain"]


def test_import_reference_then_assemble(tmp_path, base_dir, capsys):
  experts = [random_expert(i) for i in range(3)]
  path = str(tmp_path / "reference.safetensors")
  reference.save_reference(path, [e[0] for e in experts], [e[1] for e in experts], prefix="model.")
  library = str(tmp_path / "lib")
  code, _, err = run(capsys, "library", "import-reference", path, "--base", base_dir, "--library", library,
                     "--names", "x,y")
  assert code == 2 and "--names gives 2 names but" in err
  assert run(capsys, "library", "import-reference", path, "--base", base_dir, "--library", library,
             "--names", "x,y,z")[0] == 0
  loaded = lib.ExpertLibrary(library).load("y")
  gate = "decoder/layers_1/mlp/wi_1/gate"
  np.testing.assert_array_equal(loaded.gates[gate], experts[1][1][gate])
  np.testing.assert_allclose(loaded.lora["encoder/layers_0/attention/key/lora_a"],
                             experts[1][0]["encoder/layers_0/attention/key/lora_a"], rtol=1e-2)

  out = str(tmp_path / "routed")
  assert run(capsys, "assemble", "--base", base_dir, "--library", library, "--router", "phatgoose", "--output", out,
             "--gin", "assembly.routing.top_k = 1", "--gin", "assembly.routing.impl = 'dense'")[0] == 0
  saved = native.load_native(out)
  assert saved.expert_config == ExpertConfig(mode="routed", rank=RANK, num_experts=3, top_k=1, impl="dense")
  router = saved.state["experts"]["encoder"]["layers_1"]["mlp"]["wo"]["router"]
  for i in range(3):
    np.testing.assert_array_equal(np.asarray(router[i]), experts[i][1]["encoder/layers_1/mlp/wo/gate"])


def test_refusals_are_usage_errors(tmp_path, base_dir, capsys):
  library = str(tmp_path / "lib")
  lora, _ = random_expert(0, targets=("query", "value"))
  flat_file = str(tmp_path / "qv.safetensors")
  from safetensors.numpy import save_file
  save_file({f"lora/{k}": v for k, v in lora.items()}, flat_file)
  assert run(capsys, "library", "add", flat_file, "--library", library, "--base", base_dir, "--name", "qv")[0] == 0
  full = str(tmp_path / "full.safetensors")
  save_file({f"lora/{k}": v for k, v in random_expert(1)[0].items()}, full)
  code, _, err = run(capsys, "library", "add", full, "--library", library, "--base", base_dir, "--name", "all")
  assert code == 2 and "it targets ['query', 'key'" in err
  code, _, err = run(capsys, "library", "list", "--library", str(tmp_path / "missing"))
  assert code == 2 and "no library directory" in err


def test_score_with_a_library_routes_its_experts(tmp_path, base_dir, capsys):
  """`phatgoose score --library DIR --router R`: per-token and per-example routers, refusals as usage errors."""
  experts = [random_expert(i) for i in range(2)]
  path = str(tmp_path / "reference.safetensors")
  reference.save_reference(path, [e[0] for e in experts], [e[1] for e in experts])
  library = str(tmp_path / "lib")
  assert run(capsys, "library", "import-reference", path, "--base", base_dir, "--library", library)[0] == 0
  inputs = tmp_path / "in.jsonl"
  inputs.write_text(json.dumps({"input_ids": [5, 6, 7, 1], "target_ids": [8, 9, 1]}) + "\n")
  common = ["score", "--base", base_dir, "--input", str(inputs), "--library", library]
  scores = {}
  for router in ("phatgoose", "uniform"):
    code, out, err = run(capsys, *common, "--router", router, "--top_k", "1")
    assert code == 0, err
    scores[router] = json.loads(out.splitlines()[0])
  assert scores["phatgoose"] != scores["uniform"]
  code, _, err = run(capsys, *common, "--router", "oracle")
  assert code == 2 and "needs each example's label" in err
  other = str(tmp_path / "other_base")
  hf.save_hf(other, CFG, random_params(seed=1))
  code, _, err = run(capsys, "score", "--base", other, "--input", str(inputs), "--library", library)
  assert code == 2 and "another base model" in err


def test_every_base_format_is_accepted_and_an_assembled_checkpoint_scores_like_its_library(tmp_path, base_dir, capsys):
  """`--base` takes a native checkpoint as well as a Hugging Face one (the same fingerprint), and `score` on
  an assembled checkpoint gives the scores of the library-routed model: the experts come with it."""
  native_base = str(tmp_path / "native_base")
  native.save_native(native_base, {"params": hf.load_hf(base_dir)[1]}, CFG)
  library = str(tmp_path / "lib")
  for i in range(2):
    lora, gates = random_expert(i)
    flat = str(tmp_path / f"e{i}.safetensors")
    from safetensors.numpy import save_file
    save_file({**{f"lora/{k}": v for k, v in lora.items()}, **{f"gates/{k}": v for k, v in gates.items()}}, flat)
    base = native_base if i == 0 else base_dir
    assert run(capsys, "library", "add", flat, "--library", library, "--base", base, "--name", f"e{i}")[0] == 0
  routed = str(tmp_path / "routed")
  assert run(capsys, "assemble", "--base", native_base, "--library", library, "--output", routed,
             "--gin", "assembly.routing.top_k = 1")[0] == 0
  inputs = tmp_path / "in.jsonl"
  inputs.write_text('{"input_ids": [5, 6, 7], "target_ids": [8, 9]}\n{"input_ids": [3], "target_ids": [4, 2]}\n')
  code, from_checkpoint, _ = run(capsys, "score", "--base", routed, "--input", str(inputs))
  assert code == 0
  code, from_library, _ = run(capsys, "score", "--base", base_dir, "--library", library, "--top_k", "1",
                              "--input", str(inputs))
  assert code == 0 and from_checkpoint == from_library
  plain = run(capsys, "score", "--base", base_dir, "--input", str(inputs))[1]
  assert plain != from_checkpoint  # the experts were not dropped
