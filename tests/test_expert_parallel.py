"""The routed model on 8 simulated CPU devices: experts split over 'expert' at rest, each device routing its own
share of the tokens; outputs equal the unsharded model, and the routed layer's gradients equal the unsharded
layer's.

The 8-device part runs in a subprocess (`python tests/test_expert_parallel.py OUT`) started with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`, since the flag must be set before jax is imported.
"""
import functools
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import NamedSharding, PartitionSpec as P
from t5x import partitioning as t5x_partitioning

from phatgoose_jax import models, partitioning
from phatgoose_jax.experts import routing, sharded
from phatgoose_jax.experts.config import ExpertConfig
from phatgoose_jax.t5.config import preset

CONFIG = preset("tiny", vocab_size=256)  # a vocabulary the model axis divides
EXPERTS = ExpertConfig(mode="routed", num_experts=4, rank=4, top_k=2, impl="auto")
MESH = (2, 2, 2)


def make_inputs():
  """Variables with random experts and routers (init leaves B and the routers at zero) and a batch."""
  model = models.EncoderDecoderModel(CONFIG, EXPERTS)
  variables = jax.jit(model.get_initial_variables)(jax.random.key(0))
  keys = iter(jax.random.split(jax.random.key(1), 1000))
  variables["experts"] = jax.tree.map(
      lambda box: box.replace_boxed(jax.random.normal(next(keys), box.value.shape) * 0.5), variables["experts"],
      is_leaf=lambda x: isinstance(x, nn.Partitioned))
  rng = np.random.default_rng(0)
  targets = rng.integers(2, 256, (8, 6), dtype=np.int32)  # 48 and 40 tokens: the experts move (E r = 16)
  batch = {"encoder_input_tokens": rng.integers(2, 256, (8, 5), dtype=np.int32),
           "decoder_target_tokens": targets, "decoder_input_tokens": models.shift_right(targets)}
  return variables, batch


def layer_inputs(batch):
  """One routed layer's input, router and experts: u [batch, 6, 16], E = 4, r = 4, d_out = 24."""
  rng = np.random.default_rng(0)
  shapes = [(batch, 6, 16), (4, 16), (4, 16, 4), (4, 4, 24)]
  return [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]


def layer_grads(route, inputs):
  """Gradients of sum(update^2) w.r.t. (u, router, lora_a, lora_b) through `route`."""
  loss = lambda *x: jnp.sum(route(*x, top_k=2, scale=0.25, impl=EXPERTS.impl)[0] ** 2)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*inputs)


def sharded_outputs(variables, batch, mesh, rules):
  """(logits, placed variables, the jaxpr of the logits) on `mesh`, with it and `rules` as context."""
  model = models.EncoderDecoderModel(CONFIG, EXPERTS)
  logits = lambda v: model.logits(v, batch)
  placed = jax.device_put(partitioning.unbox(variables), partitioning.variables_shardings(variables, mesh, rules))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    assert sharded.context_mesh() is not None
    return logits(placed), placed, str(jax.make_jaxpr(logits)(placed))


def child(out: pathlib.Path):
  variables, batch = make_inputs()
  mesh = partitioning.make_mesh(*MESH)
  rules = partitioning.standard_logical_axis_rules()
  logits, placed, jaxpr = sharded_outputs(variables, batch, mesh, rules)
  # t5x's partitioner calls and lowers its programs under `with Mesh(...)`, not `jax.set_mesh`.
  t5x_logits = lambda v: models.EncoderDecoderModel(CONFIG, EXPERTS).logits(v, batch)
  t5x_fn = t5x_partitioning.PjittedFnWithContext(jax.jit(t5x_logits), mesh, rules)
  t5x_jaxpr = t5x_fn.lower(placed).as_text()
  grads = {}
  # The layer's input split over the batch axes only (a query's input) and over 'model' too (an output
  # projection's input), the experts split over 'expert' and their d_in over 'model' as stored; 4 rows of 6
  # tokens move their tokens to the experts (E r = 16 > 24 / data), 8 rows move the experts.
  for batch, layout in ((4, "experts_stay"), (8, "tokens_stay")):
    inputs = layer_inputs(batch)
    assert sharded.moves_experts(mesh, batch * 6, 4, 4) == (layout == "tokens_stay")
    for split, axes in (("in_split", ("mlp", "embed")), ("batch_split", ("embed", "mlp"))):
      u_spec = P(("data", "expert"), None, "model") if split == "in_split" else P(("data", "expert"))
      placed_inputs = [jax.device_put(x, NamedSharding(mesh, spec)) for x, spec in
                       zip(inputs, (u_spec, P("expert", "model"), P("expert", "model"), P("expert")))]
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        grads[f"{layout}_{split}"] = layer_grads(functools.partial(sharded.route, kernel_axes=axes),
                                                 placed_inputs)
  shapes = {"/".join(p.key for p in path): sorted({tuple(s.data.shape) for s in x.addressable_shards})
            for path, x in jax.tree_util.tree_leaves_with_path(placed)}
  np.savez(out / "sharded.npz", logits=np.asarray(logits), t5x_logits=np.asarray(t5x_fn(placed)),
           **{f"{name}_{i}": np.asarray(g) for name, gs in grads.items() for i, g in enumerate(gs)})
  (out / "report.json").write_text(json.dumps({"devices": jax.device_count(), "shard_map": "shard_map" in jaxpr,
                                               "t5x_shard_map": "sdy.manual_computation" in t5x_jaxpr,
                                               "shapes": {k: [list(s) for s in v] for k, v in shapes.items()}}))


def test_sharded_experts_equal_the_unsharded_model(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "report.json").read_text())
  assert report["devices"] == 8 and report["shard_map"] and report["t5x_shard_map"]
  shapes = report["shapes"]
  d, kv, r, e = CONFIG.d_model, CONFIG.joined_kv, EXPERTS.rank, EXPERTS.num_experts
  attention = "encoder/layers_0/attention"
  # Every device holds E/2 experts; LoRA and base widths split over model=2 as the base kernel's are.
  assert shapes[f"experts/{attention}/query/lora_a"] == [[e // 2, d, r]]
  assert shapes[f"experts/{attention}/query/lora_b"] == [[e // 2, r, kv // 2]]
  assert shapes[f"experts/{attention}/out/lora_a"] == [[e // 2, kv // 2, r]]
  assert shapes[f"experts/{attention}/query/router"] == [[e // 2, d]]
  assert shapes[f"params/{attention}/query/kernel"] == [[d, kv // 2]]
  assert shapes["experts/encoder/layers_0/mlp/wo/lora_a"] == [[e // 2, CONFIG.d_ff // 2, r]]

  variables, batch = make_inputs()
  got = np.load(tmp_path / "sharded.npz")
  logits = models.EncoderDecoderModel(CONFIG, EXPERTS).logits(partitioning.unbox(variables), batch)
  np.testing.assert_allclose(got["logits"], logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got["t5x_logits"], logits, rtol=1e-5, atol=1e-5)
  # An input split over 'model' (partial sums) and an output split over it: both equal one device's grads.
  for batch, layout in ((4, "experts_stay"), (8, "tokens_stay")):
    grads = layer_grads(routing.route, layer_inputs(batch))
    for name in (f"{layout}_in_split", f"{layout}_batch_split"):
      for i, g in enumerate(grads):
        scale = float(np.abs(g).max())
        np.testing.assert_allclose(got[f"{name}_{i}"] / scale, g / scale, atol=1e-6, err_msg=f"{name} {i}")


if __name__ == "__main__":
  child(pathlib.Path(sys.argv[1]))
