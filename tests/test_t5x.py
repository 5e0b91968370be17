"""Our T5 under real t5x: the offline train and eval examples as t5x's own commands, frozen sub-trees, the
params layout t5x checkpoints need, and routed scores equal to our model's (algorithm.md §4-§6)."""
import json
import os
import pathlib
import subprocess
import sys

import flax
import gin
import jax
import numpy as np
import optax
import pytest
import seqio

t5x = pytest.importorskip("t5x")

from flax.linen import partitioning as flax_partitioning  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
import t5x.partitioning  # noqa: E402
import t5x.utils  # noqa: E402

from phatgoose_jax import library as lib  # noqa: E402
from phatgoose_jax import assembly, models, t5x_model  # noqa: E402
from phatgoose_jax.checkpoints import names, native  # noqa: E402
from phatgoose_jax.experts.config import ExpertConfig  # noqa: E402
from phatgoose_jax.t5.config import PRESETS  # noqa: E402

from random_trees import TINY, random_batch, random_expert, random_params  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN_STEPS = 2
# Tiny step counts and batches, so each command is dominated by t5x's start-up and compilation.
TRAIN_OVERRIDES = [f"--gin.TRAIN_STEPS={TRAIN_STEPS}", f"--gin.EVAL_PERIOD={TRAIN_STEPS}",
                   "--gin.EVAL_STEPS=1", "--gin.BATCH_SIZE=8", "--gin.TASK_FEATURE_LENGTHS={'inputs': 24, 'targets': 24}"]
BYTES = seqio.ByteVocabulary()
SHAPES = {"encoder_input_tokens": (1, 4), "decoder_input_tokens": (1, 4)}


def run_t5x(script, *args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
  done = subprocess.run([sys.executable, "-m", f"t5x.{script}", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-4000:]


def restore_params(checkpoint_dir) -> dict:
  """The flat `target` (params) of a t5x orbax checkpoint."""
  state = ocp.PyTreeCheckpointer().restore(str(checkpoint_dir / "state"))
  return flax.traverse_util.flatten_dict(state["target"], sep="/")


def assert_only_lora_changed(before_dir, after_dir):
  """Between two checkpoints of the expert stage exactly params/lora changed; the rest is t5x's T5 1.1 tree."""
  before, after = restore_params(before_dir), restore_params(after_dir)
  assert set(before) == set(after)
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  lora = {k for k in before if k.startswith("lora/")}
  assert lora and changed == lora
  assert set(before) - lora == set(names.param_shapes(TINY))


def assert_seqio_scores_are_ours(checkpoint, outputs):
  """t5x's eval through seqio: each candidate's score is our model's mean log-likelihood on the checkpoint's
  weights, and the metric is rank-classification accuracy over those scores (algorithm.md §6)."""
  metrics = json.loads((outputs / "demo_reverse_eval-metrics.jsonl").read_text().splitlines()[-1])
  rows = [json.loads(line) for line in (outputs / f"demo_reverse_eval-{TRAIN_STEPS:06d}.jsonl").open()]
  assert metrics["step"] == TRAIN_STEPS and len(rows) > 100

  best = {}
  for row in rows:
    idx = row["input"]["idx"]
    if idx not in best or row["score"] > best[idx][0]:
      best[idx] = (row["score"], row["input"]["is_correct"])
  assert metrics["accuracy"] == pytest.approx(np.mean([correct for _, correct in best.values()]))

  target = restore_params(checkpoint)
  variables = {c: flax.traverse_util.unflatten_dict({k[len(c) + 1:]: v for k, v in target.items()
                                                     if k.startswith(f"{c}/")}, sep="/") for c in ("lora",)}
  variables["params"] = flax.traverse_util.unflatten_dict(
      {k: v for k, v in target.items() if not k.startswith("lora/")}, sep="/")
  ours = models.EncoderDecoderModel(TINY.replace(dropout_rate=0.0), ExpertConfig(mode="lora", rank=4))
  sample = rows[:16]
  inputs, targets = ([r["input"][k] for r in sample] for k in ("inputs", "targets"))
  targets = models.pad_tokens(targets, max(map(len, targets)))
  batch = {"encoder_input_tokens": models.pad_tokens(inputs, max(map(len, inputs))),
           "decoder_target_tokens": targets, "decoder_input_tokens": models.shift_right(targets)}
  np.testing.assert_allclose(ours.jit_score(variables, batch), [r["score"] for r in sample], rtol=1e-4, atol=1e-5)


def test_offline_examples_train_an_expert_then_evaluate_it_through_seqio(tmp_path):
  """Both example commands in order (one test, so that parallel test workers train once)."""
  model_dir = tmp_path / "expert"
  run_t5x("train", "--gin_file=gin/t5x/examples/tiny_offline_train_expert.gin", f"--gin.MODEL_DIR='{model_dir}'",
          *TRAIN_OVERRIDES)
  checkpoint = model_dir / f"checkpoint_{TRAIN_STEPS}"
  assert_only_lora_changed(model_dir / "checkpoint_0", checkpoint)
  run_t5x("eval", "--gin_file=gin/t5x/examples/tiny_offline_eval.gin", f"--gin.CHECKPOINT_PATH='{checkpoint}'",
          f"--gin.EVAL_OUTPUT_DIR='{tmp_path / 'eval'}'")
  assert_seqio_scores_are_ours(checkpoint, tmp_path / "eval" / "inference_eval")


@pytest.mark.parametrize("size", sorted(PRESETS))
def test_model_gin_files_bind_the_presets(size):
  gin.clear_config()
  gin.add_config_file_search_path(str(REPO))
  try:
    gin.parse_config_file(f"gin/t5x/models/t5_1_1_{size}.gin")
    model = gin.query_parameter("%MODEL").scoped_configurable_fn()
  finally:
    gin.clear_config()
  assert isinstance(model, t5x.models.EncoderDecoderModel)
  assert model.config == PRESETS[size].replace(dropout_rate=0.1)
  assert model.experts.mode == "none"


def test_params_hold_the_stock_base_tree_and_expert_subtrees_with_logical_axes():
  experts = ExpertConfig(mode="gated", rank=4)
  model = t5x_model.T5xEncoderDecoderModel(TINY, BYTES, BYTES, None, experts=experts)
  variables = jax.eval_shape(lambda rng: model.get_initial_variables(rng, SHAPES), jax.random.PRNGKey(0))
  flat = flax.traverse_util.flatten_dict(variables["params"], sep="/")
  base = {k: v.shape for k, v in flat.items() if not k.startswith(("lora/", "gates/"))}
  assert base == {k: tuple(s) for k, s in names.param_shapes(TINY).items()}
  ours = jax.eval_shape(models.EncoderDecoderModel(TINY, experts).get_initial_variables, jax.random.PRNGKey(0))
  expected_axes = {}
  for collection in ("params", "lora", "gates"):
    boxed = flax.traverse_util.flatten_dict(ours[collection], is_leaf=lambda _, v: hasattr(v, "names"), sep="/")
    prefix = "" if collection == "params" else f"{collection}/"
    expected_axes.update({prefix + k: tuple(v.names) for k, v in boxed.items()})
  axes = flax.traverse_util.flatten_dict(flax_partitioning.get_axis_names(variables["params_axes"]), sep="/")
  assert {k: tuple(v) for k, v in axes.items()} == expected_axes


def test_pjit_partitioner_shards_params_and_optimizer_state_by_our_logical_axes():
  optimizer = t5x_model.train_only(["lora"], optax.adamw(1e-3))
  model = t5x_model.T5xEncoderDecoderModel(TINY, BYTES, BYTES, optimizer, experts=ExpertConfig(mode="lora", rank=4))
  partitioner = t5x.partitioning.PjitPartitioner(
      num_partitions=1, logical_axis_rules=t5x.partitioning.standard_logical_axis_rules())
  initializer = t5x.utils.TrainStateInitializer(optimizer_def=optimizer, init_fn=model.get_initial_variables,
                                                input_shapes=SHAPES, partitioner=partitioner)
  specs = flax.traverse_util.flatten_dict(initializer.train_state_axes.state_dict(), sep="/")
  query = "encoder/layers_0/attention/query"
  assert specs[f"target/{query}/kernel"] == P(None, "model")  # ('embed', 'joined_kv')
  assert specs[f"target/lora/{query}/lora_a"] == P(None, None)  # ('embed', 'rank')
  assert specs[f"target/lora/{query}/lora_b"] == P(None, "model")  # ('rank', 'joined_kv')
  moments = {k: v for k, v in specs.items() if k.startswith("state/") and k.endswith(f"{query}/lora_b")}
  assert len(moments) == 2 and set(moments.values()) == {P(None, "model")}  # AdamW's mu and nu
  assert not any(k.startswith("state/") and k.endswith(f"{query}/kernel") for k in specs)  # frozen: no state


def test_train_only_updates_its_subtrees_and_freezes_the_rest():
  params = flax.core.freeze({"encoder": {"kernel": np.ones(3, np.float32)},
                             "lora": {"lora_a": np.ones(2, np.float32)},
                             "gates": {"gate": np.ones(2, np.float32)}})
  optimizer = t5x_model.train_only(["lora"], optax.sgd(0.5))
  state = optimizer.init_state(params)
  grads = jax.tree.map(np.ones_like, params)
  new_params, _ = optimizer.apply_gradient(optimizer.hyper_params, params, state, grads)
  np.testing.assert_array_equal(new_params["lora"]["lora_a"], [0.5, 0.5])
  np.testing.assert_array_equal(new_params["encoder"]["kernel"], params["encoder"]["kernel"])
  np.testing.assert_array_equal(new_params["gates"]["gate"], params["gates"]["gate"])


@pytest.fixture(scope="module")
def expert_library(tmp_path_factory):
  """(library path, base checkpoint path, base params): three gated experts trained on a native base."""
  base = random_params()
  base_dir = str(tmp_path_factory.mktemp("base"))
  native.save_native(base_dir, {"params": base}, TINY)
  library = lib.ExpertLibrary(str(tmp_path_factory.mktemp("library")))
  for seed, name in enumerate(["a", "b", "c"]):
    lora, gates = random_expert(seed, rank=4)
    library.add(name, lora, base=lib.base_fingerprint(TINY, base), gates=gates, dataset=f"{name}_data")
  return library.path, base_dir, base


def test_routed_scores_under_t5x_equal_our_loaders(expert_library):
  """t5x's score_batch (sum over weighted token scores, and our mean of it) on the library's routed model ==
  the sum and mean log-likelihoods of the model our CLI loads (`assembly.load_model`) on the same experts."""
  path, base_dir, base = expert_library
  routing = t5x_model.library_routing(path, base_dir, "phatgoose", top_k=2, impl="dense")
  model = t5x_model.T5xEncoderDecoderModel(TINY, BYTES, BYTES, None, routing=routing, length_normalize=True)
  initial = jax.jit(lambda rng: model.get_initial_variables(rng, SHAPES))(jax.random.PRNGKey(0))
  batch = random_batch()
  batch["decoder_loss_weights"] = (batch["decoder_target_tokens"] > 0).astype(np.int32)
  params = {**jax.tree.map(np.asarray, base), "experts": initial["params"]["experts"]}
  mean, intermediates = jax.jit(model.score_batch, static_argnums=2)(params, batch, True)
  total = np.sum(intermediates["decoder"]["token_scores"][0], axis=-1)
  ours = assembly.load_model(base_dir, library=path, router="phatgoose", top_k=2, impl="dense")
  assert ours.model.experts == model.experts
  _, our = ours.model.jit_score(ours.variables, batch, return_intermediates=True)
  np.testing.assert_allclose(total, our["sum_logprob"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mean, our["mean_logprob"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(mean * our["num_target_tokens"], total, rtol=1e-5)


def test_an_assembled_checkpoint_gives_t5x_the_same_experts_as_its_library(expert_library, tmp_path):
  path, base_dir, _ = expert_library
  out = assembly.assemble(base=base_dir, library=path, output=str(tmp_path / "routed"), router="phatgoose")
  from_checkpoint = t5x_model.assembled_routing(out, base_dir)
  from_library = t5x_model.library_routing(path, base_dir, "phatgoose", top_k=2, impl="auto")
  assert from_checkpoint.expert_config == from_library.expert_config
  jax.tree.map(np.testing.assert_array_equal, from_checkpoint.collection, from_library.collection)
  native.save_native(str(tmp_path / "other"), {"params": random_params(seed=1)}, TINY)
  with pytest.raises(ValueError, match="another base model"):
    t5x_model.assembled_routing(out, str(tmp_path / "other"))


def test_library_routing_checks_the_base_fingerprint(expert_library, tmp_path):
  native.save_native(str(tmp_path), {"params": random_params(seed=1)}, TINY)
  with pytest.raises(lib.LibraryError, match="another base model"):
    t5x_model.library_routing(expert_library[0], str(tmp_path))


def test_routers_with_per_example_weights_are_refused(expert_library):
  with pytest.raises(ValueError, match="per-example weights"):
    t5x_model.library_routing(expert_library[0], expert_library[1], "uniform")


def test_routing_and_expert_config_are_exclusive(expert_library):
  routing = t5x_model.library_routing(*expert_library[:2], "phatgoose", top_k=1)
  with pytest.raises(ValueError, match="either"):
    t5x_model.T5xEncoderDecoderModel(TINY, BYTES, BYTES, None, experts=ExpertConfig(mode="lora"), routing=routing)


def test_routing_that_does_not_fit_the_model_lists_the_differences(expert_library):
  routing = t5x_model.library_routing(*expert_library[:2], "phatgoose", top_k=1)
  model = t5x_model.T5xEncoderDecoderModel(TINY.replace(d_ff=48), BYTES, BYTES, None, routing=routing)
  with pytest.raises(ValueError, match="wi_0/lora_b: configured"):
    jax.eval_shape(lambda rng: model.get_initial_variables(rng, SHAPES), jax.random.PRNGKey(0))


def test_packed_batches_are_refused_with_the_fix():
  model = t5x_model.T5xEncoderDecoderModel(TINY, BYTES, BYTES, None)
  batch = random_batch()
  params = jax.eval_shape(lambda rng: model.get_initial_variables(rng, SHAPES), jax.random.PRNGKey(0))["params"]
  batch["encoder_segment_ids"] = np.ones_like(batch["encoder_input_tokens"])
  with pytest.raises(ValueError, match="pack = False"):
    jax.eval_shape(lambda p: model.loss_fn(p, batch, None), params)
