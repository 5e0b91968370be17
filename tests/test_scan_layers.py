"""Stacks under nn.scan (`T5Config.scan_layers`): the same function as the unrolled network on the stacked
variables, the per-layer layout on disk and in the library, and one layer body compiled per stack."""
import jax
import numpy as np
import pytest

from phatgoose_jax import library as lib
from phatgoose_jax import checkpoints, models, partitioning
from phatgoose_jax.checkpoints import names, native
from phatgoose_jax.experts.config import ExpertConfig
from phatgoose_jax.t5 import layout
from phatgoose_jax.t5.config import preset

CFG = preset("tiny", dropout_rate=0.0, num_encoder_layers=3, num_decoder_layers=2)
SCANNED = CFG.replace(scan_layers=True)
MODES = {"none": ExpertConfig(), "lora": ExpertConfig(mode="lora", rank=4),
         "gated": ExpertConfig(mode="gated", rank=4),
         "routed": ExpertConfig(mode="routed", rank=4, num_experts=3, top_k=2, impl="dense")}
BATCH = {"encoder_input_tokens": np.array([[5, 6, 7, 1, 0], [9, 3, 1, 0, 0]], np.int32),
         "decoder_input_tokens": np.array([[0, 8, 9, 3], [0, 4, 0, 0]], np.int32),
         "decoder_target_tokens": np.array([[8, 9, 3, 1], [4, 1, 0, 0]], np.int32)}


def per_layer_variables(experts, seed=0):
  """Unrolled-model variables with every collection perturbed (so B, gates and routers are not zero)."""
  variables = partitioning.unbox(models.EncoderDecoderModel(CFG, experts).get_initial_variables(jax.random.key(seed)))
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def assert_trees_equal(a, b, atol=0.0):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol), a, b)


def test_layout_round_trip_is_exact_and_depth_is_checked():
  variables = per_layer_variables(MODES["routed"])
  stacked = layout.stack_layers(variables, CFG)
  assert stacked["experts"]["encoder"]["layers"]["mlp"]["wo"]["lora_a"].shape == (3, 3, CFG.d_ff, 4)
  assert "layers_0" not in stacked["params"]["encoder"] and "encoder_norm" in stacked["params"]["encoder"]
  assert_trees_equal(layout.unstack_layers(stacked, CFG), variables)
  assert layout.stack_layers(stacked, CFG) == stacked  # already stacked: unchanged
  with pytest.raises(ValueError, match="lacks"):
    layout.stack_layers(variables, CFG.replace(num_encoder_layers=4))
  with pytest.raises(ValueError, match="leading axes"):
    layout.unstack_layers(stacked, CFG.replace(num_encoder_layers=4))


def test_the_scanned_tree_is_the_stacked_per_layer_tree_with_a_layers_axis():
  for experts in MODES.values():
    boxed = jax.eval_shape(models.EncoderDecoderModel(SCANNED, experts).get_initial_variables, jax.random.key(0))
    per_layer = jax.eval_shape(models.EncoderDecoderModel(CFG, experts).get_initial_variables, jax.random.key(0))
    want = jax.eval_shape(lambda v: layout.stack_layers(v, CFG), partitioning.unbox(per_layer))
    assert jax.tree.map(lambda x: x.shape, partitioning.unbox(boxed)) == jax.tree.map(lambda x: x.shape, want)
    kernel = boxed["params"]["encoder"]["layers"]["mlp"]["wi_0"]["kernel"]
    assert kernel.names == ("layers", "embed", "mlp")  # the logical axis every rule set maps (replicated)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_scanned_logits_decoding_and_routes_equal_the_unrolled_network(mode):
  variables = per_layer_variables(MODES[mode])
  unrolled = models.EncoderDecoderModel(CFG, MODES[mode])
  scanned = models.EncoderDecoderModel(SCANNED, MODES[mode])
  stacked = layout.for_model(variables, SCANNED)
  np.testing.assert_allclose(scanned.logits(stacked, BATCH), unrolled.logits(variables, BATCH), atol=2e-5)
  (want, aux_want), (got, aux_got) = (m.score_batch(v, BATCH, return_intermediates=True)
                                      for m, v in ((unrolled, variables), (scanned, stacked)))
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert_trees_equal(aux_got["intermediates"], aux_want["intermediates"], atol=1e-5)  # per-layer names
  if mode == "routed":
    assert "encoder/layers_2/mlp/wo/route_index" in names.flatten(aux_got["intermediates"])
  decode = dict(BATCH, decoder_input_tokens=np.zeros((2, 6), np.int32))
  np.testing.assert_array_equal(scanned.predict_batch(stacked, decode), unrolled.predict_batch(variables, decode))


def test_scanned_lora_gradients_equal_the_unrolled_ones_layer_for_layer():
  variables = per_layer_variables(MODES["lora"])
  grad = lambda model, v: jax.grad(lambda lora: model.loss_fn({**v, "lora": lora}, BATCH)[0])(v["lora"])  # noqa: E731
  want = grad(models.EncoderDecoderModel(CFG, MODES["lora"]), variables)
  got = grad(models.EncoderDecoderModel(SCANNED, MODES["lora"]), layout.for_model(variables, SCANNED))
  assert_trees_equal(layout.unstack_layers({"lora": got}, SCANNED)["lora"], want, atol=1e-5)


def test_the_base_fingerprint_and_native_checkpoints_keep_the_per_layer_layout(tmp_path):
  variables = per_layer_variables(MODES["lora"])
  stacked = layout.for_model(variables, SCANNED)
  assert lib.base_fingerprint(SCANNED, stacked["params"]) == lib.base_fingerprint(CFG, variables["params"])
  native.save_native(str(tmp_path / "ckpt"), stacked, SCANNED, MODES["lora"])
  loaded = checkpoints.load(str(tmp_path / "ckpt"))
  assert not loaded.config.scan_layers and "layers_0" in loaded.variables["params"]["encoder"]
  assert_trees_equal(loaded.variables, variables)


def test_one_layer_body_is_compiled_per_stack():
  """The scanned program's size does not grow with depth (the unrolled one's does)."""
  def hlo_size(config):
    model = models.EncoderDecoderModel(config, MODES["routed"])
    abstract = partitioning.unbox(jax.eval_shape(model.get_initial_variables, jax.random.key(0)))
    return len(jax.jit(model.score_batch).lower(abstract, BATCH).as_text())
  shallow, deep = (preset("tiny", num_encoder_layers=n, num_decoder_layers=n) for n in (2, 8))
  assert hlo_size(deep.replace(scan_layers=True)) == hlo_size(shallow.replace(scan_layers=True))
  assert hlo_size(deep) > 2 * hlo_size(shallow)


@pytest.mark.parametrize("scan", [False, True])
def test_rematerialised_layers_give_the_same_gradients_and_keep_fewer_activations(scan):
  """`remat_policy` changes what the backward pass keeps, not what it computes: LoRA gradients equal the
  policy 'none' ones, and the compiled gradient's temporaries shrink below the policy 'none' ones."""
  config = (SCANNED if scan else CFG).replace(d_ff=256)
  batch = {k: np.tile(v, (16, 8)) for k, v in BATCH.items()}  # 32 x 40 / 32 tokens: activations dominate
  def grad_fn(policy):
    model = models.EncoderDecoderModel(config.replace(remat_policy=policy), MODES["lora"])
    return model, jax.jit(lambda v: jax.grad(lambda lora: model.loss_fn({**v, "lora": lora}, batch)[0])(v["lora"]))
  model, plain = grad_fn("none")
  variables = layout.for_model(partitioning.unbox(model.get_initial_variables(jax.random.key(0))), config)
  variables["lora"] = jax.tree.map(lambda x: x + 0.1, variables["lora"])
  want, temps = plain(variables), {"none": plain.lower(variables).compile().memory_analysis().temp_size_in_bytes}
  for policy in ("minimal", "full"):
    fn = grad_fn(policy)[1]
    assert_trees_equal(fn(variables), want, atol=1e-6)
    temps[policy] = fn.lower(variables).compile().memory_analysis().temp_size_in_bytes
  assert max(temps["full"], temps["minimal"]) < temps["none"], temps
