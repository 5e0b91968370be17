"""The stages on a tiny model for a few steps: base -> expert -> gate -> assemble -> evaluate -> route stats."""
import json
import os

import gin
import numpy as np
import pytest

from phatgoose_jax import library as lib
from phatgoose_jax import assembly, data, main, train
from phatgoose_jax import evaluate as stages
from phatgoose_jax.checkpoints import native
from phatgoose_jax.cli import main as cli_main
from phatgoose_jax.demo import suite
from phatgoose_jax.evaluation import evaluator


SMALL = ["evaluate.runner.batch_size = 16", "assembly.router_inputs.activation_examples = 16",
         "assembly.router_inputs.retrieval_examples = 16",
         "data.resolve.jsonl_vocabulary = 'byte'"]
SKILLS = ("demo_reverse", "demo_upper")
HELD_OUT = data.HeldOut(frozenset(suite.HELD_OUT_TASKS), suite.is_held_out)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """A base, a two-expert gated library, and an assembled routed checkpoint."""
  root = tmp_path_factory.mktemp("pipeline")
  main.parse(["demo_smoke.gin"], SMALL)  # the smoke demo's model, lengths and step counts
  suite.register(0, suite.SuiteSizes(train=32, validation=8, held_out=6))
  base = train.train_multitask(task=suite.PRETRAIN_TASK, output=str(root / "base"), workdir=str(root / "w_base"),
                               finetune="full", num_steps=4, held_out=HELD_OUT)
  library = str(root / "library")
  manifests = {}
  for i, task in enumerate(SKILLS):
    manifests[task] = train.train_expert(base=base, task=task, library=library, num_steps=3, seed=i,
                                         workdir=str(root / f"w_{task}"), held_out=HELD_OUT)
  gated = {task: train.train_gate(base=base, library=library, name=task, num_steps=2,
                                  workdir=str(root / f"w_{task}_gate"), held_out=HELD_OUT) for task in SKILLS}
  routed = assembly.assemble(base=base, library=library, output=str(root / "routed"), router="phatgoose")
  yield {"root": root, "base": base, "library": library, "manifests": manifests, "gated": gated, "routed": routed}
  gin.clear_config()


def test_base_checkpoint_holds_params(built):
  restored = native.load_native(built["base"])
  assert set(restored.state) == {"params"}
  assert restored.t5_config.vocab_size == 259


def test_train_expert_adds_a_library_entry(built):
  manifest = built["manifests"]["demo_reverse"]
  assert manifest["dataset"] == "demo_reverse" and manifest["rank"] == 16 and not manifest["gate"]
  assert manifest["training"]["expert"]["num_steps"] == 3
  expert = lib.ExpertLibrary(built["library"]).load("demo_reverse")
  assert any(np.any(v) for k, v in expert.lora.items() if k.endswith("lora_b"))  # B starts at zero


def test_train_gate_stores_a_nonzero_gate_beside_the_same_expert(built):
  library = lib.ExpertLibrary(built["library"])
  assert library.names() == sorted(SKILLS)
  expert = library.load("demo_upper")
  assert expert.manifest["gate"] and set(expert.manifest["training"]) == {"expert", "gate"}
  assert any(np.any(v) for v in expert.gates.values())
  assert expert.manifest["weights"]["sha256"] != built["manifests"]["demo_upper"]["weights"]["sha256"]


def test_training_resumes_from_its_checkpoint(built):
  workdir = os.path.join(built["root"], "w_demo_reverse")
  steps = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  assert "3" in steps


def test_assembled_checkpoint_loads_as_a_routed_model(built):
  restored = native.load_native(built["routed"])
  assert restored.expert_config.mode == "routed" and restored.expert_config.num_experts == 2
  loaded = assembly.load(built["routed"])
  assert loaded.expert_weights is None and "experts" in loaded.variables
  task = suite.HELD_OUT_TASKS[0]

  def scores(model):
    runner = stages.runner(model, data.vocabulary(task))
    seqio_eval, rows = evaluator.seqio_evaluator(task, runner, max_examples=4)
    return np.array([s for _, s in sorted(runner.score_fn(task, rows)(seqio_eval.cached_model_datasets[task]))])

  assembled = scores(loaded)
  assert assembled.size > 4 and np.all(np.isfinite(assembled))
  np.testing.assert_array_equal(assembled, scores(assembly.load(built["base"], built["library"], "phatgoose")))


def test_evaluate_writes_json_and_markdown(built):
  out = os.path.join(built["root"], "eval")
  results = stages.evaluate(task=suite.HELD_OUT_MIXTURE, output_dir=out, base=built["routed"])
  assert set(results["tasks"]) == set(suite.HELD_OUT_TASKS) and 0.0 <= results["score"] <= 1.0
  with open(os.path.join(out, "results.json")) as f:
    assert json.load(f)["model"]["score"] == results["score"]
  with open(os.path.join(out, "results.md")) as f:
    assert f.read().startswith("| method |")


def test_route_stats_writes_json_and_png(built):
  out = os.path.join(built["root"], "routes")
  stats = stages.route_stats(task=suite.HELD_OUT_TASKS[0], output_dir=out, base=built["base"],
                             library=built["library"], router="phatgoose")
  fractions = stats[suite.HELD_OUT_TASKS[0]]
  assert len(fractions) == 36  # 2 encoder layers x 7 modules + 2 decoder layers x 11
  assert all(abs(sum(f) - 1.0) < 1e-6 and len(f) == 2 for f in fractions.values())
  assert os.path.isfile(os.path.join(out, "route_stats.json"))
  assert os.path.getsize(os.path.join(out, f"{suite.HELD_OUT_TASKS[0]}.png")) > 0


def test_held_out_tasks_and_examples_are_refused(built):
  with pytest.raises(data.HeldOutError):
    train.train_expert(base=built["base"], task=suite.HELD_OUT_TASKS[0], library=built["library"],
                       workdir=os.path.join(built["root"], "never"), num_steps=1, held_out=HELD_OUT)
  with pytest.raises(data.HeldOutError):
    HELD_OUT.check_texts(["reverse: cat | upper: dog"])
  assert not os.path.exists(os.path.join(built["root"], "never"))


def test_cli_evaluate_and_assemble(built, capsys):
  out = os.path.join(built["root"], "cli_eval")
  bindings = ["--gin_file", "demo_smoke.gin"] + [b for line in SMALL for b in ("--gin", line)]
  argv = ["evaluate", "--base", built["base"], "--library", built["library"], "--router", "arrow",
          "--task", suite.HELD_OUT_TASKS[1], "--output_dir", out] + bindings
  assert cli_main(argv) == 0
  assert json.loads(capsys.readouterr().out)["name"] == suite.HELD_OUT_TASKS[1]
  assert os.path.isfile(os.path.join(out, "results.json"))
  assert cli_main(["assemble", "--base", built["base"], "--library", built["library"], "--output",
                   os.path.join(built["root"], "merged"), "--router", "merged"] + bindings) == 0
  assert native.read_configs(os.path.join(built["root"], "merged"))[1].mode == "lora"


def test_a_flan_pool_library_is_never_evaluated_on_t0_held_out(built, tmp_path):
  """The FLAN guard follows the experts' datasets even when the caller names no pool (algorithm.md §6)."""
  expert = lib.ExpertLibrary(built["library"]).load(SKILLS[0])
  flan_library = lib.ExpertLibrary(str(tmp_path / "flan"))
  flan_library.add("wsc_expert", expert.lora, base=expert.manifest["base"], gates=expert.gates,
                   dataset="flan_super_glue_wsc")
  with pytest.raises(ValueError, match="must not be evaluated on T0 held-out"):
    stages.evaluate(task="t0_held_out", output_dir=str(tmp_path / "out"), base=built["base"],
                    library=str(tmp_path / "flan"))


def test_own_jsonl_data_trains_an_expert_and_is_evaluated(built, tmp_path):
  """`--task path.jsonl`: a user's training file becomes an expert, an evaluation file is scored by rank
  classification through the same data path (README, "Your own data")."""
  words = ["cat", "dog", "bird", "fish", "frog", "mole", "newt", "owl"]
  (tmp_path / "reverse.jsonl").write_text("".join(
      json.dumps({"inputs": f"reverse: {w}", "targets": w[::-1]}) + "\n" for w in words))
  (tmp_path / "quiz.jsonl").write_text("".join(
      json.dumps({"inputs": f"reverse: {w}", "choices": [w, w[::-1]], "answer": 1}) + "\n" for w in words[:4]))
  library = str(tmp_path / "lib")
  manifest = train.train_expert(base=built["base"], task=str(tmp_path / "reverse.jsonl"), library=library,
                                name="mine", num_steps=2, workdir=str(tmp_path / "w"))
  assert manifest["dataset"] == str(tmp_path / "reverse.jsonl")
  features = data.examples(str(tmp_path / "reverse.jsonl"), "train", {"inputs": 16, "targets": 8})
  assert list(features["inputs_pretokenized"]) == [f"reverse: {w}" for w in words]
  results = stages.evaluate(task=str(tmp_path / "quiz.jsonl"), output_dir=str(tmp_path / "out"), base=built["base"],
                            library=library, router="merged")
  assert results["tasks"]["jsonl_quiz"]["num_examples"] == 4
