"""The same training steps on 1 device and on 8 simulated CPU devices (2x2x2 and 4x2x1 meshes) agree.

The 8-device runs happen in a subprocess (`python tests/test_sharding_devices.py OUT.npz`) started with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`, since the flag must be set before jax is imported.
"""
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from phatgoose_jax import partitioning
from phatgoose_jax.training import data, optimizers, trainer as trainer_lib

VOCAB, EMBED, HIDDEN, RANK, EXPERTS, LENGTH, STEPS = 16, 8, 16, 2, 2, 5, 4
MESHES = {"2x2x2": (2, 2, 2), "4x2x1": (4, 2, 1)}


def boxed(init, names):
  return nn.with_logical_partitioning(init, names)


class TinyRoutedLM(nn.Module):
  """h = gelu(x W_i + sum_e softmax(x R^T)_e (x A_e) B_e); logits = (h W_o) E^T."""

  @nn.compact
  def __call__(self, tokens):
    emb = self.param("embedding", boxed(nn.initializers.normal(1.0), ("vocab", "embed")), (VOCAB, EMBED))
    wi = self.param("wi", boxed(nn.initializers.lecun_normal(), ("embed", "mlp")), (EMBED, HIDDEN))
    wo = self.param("wo", boxed(nn.initializers.lecun_normal(), ("mlp", "embed")), (HIDDEN, EMBED))
    key = self.make_rng("params") if self.is_initializing() else None
    init = nn.initializers.normal(0.5)
    a = self.variable("experts", "lora_a", boxed(init, ("expert", "embed", "rank")), key, (EXPERTS, EMBED, RANK))
    b = self.variable("experts", "lora_b", boxed(init, ("expert", "rank", "mlp")), key, (EXPERTS, RANK, HIDDEN))
    r = self.variable("experts", "router", boxed(init, ("expert", "embed")), key, (EXPERTS, EMBED))
    x = emb[tokens]
    p = jax.nn.softmax(x @ r.value.T)
    delta = jnp.einsum("ble,bleh->blh", p, jnp.einsum("bld,edr,erh->bleh", x, a.value, b.value))
    h = nn.gelu(x @ wi + delta / RANK)
    return (h @ wo) @ emb.T


def run(mesh_shape):
  """Train STEPS steps of params + experts on a (data, model, expert) mesh; eval loss after every step."""
  model = TinyRoutedLM()
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, LENGTH), jnp.int32))

  def loss_fn(v, batch, rng):
    logits = model.apply(v, batch["inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean(), {}

  rng = np.random.default_rng(0)
  examples = {k: rng.integers(0, VOCAB, (32, LENGTH), dtype=np.int32) for k in ("inputs", "targets")}
  batches = data.DeterministicBatches(examples, batch_size=8, seed=0)
  fixed = batches(100)
  losses = []
  eval_loss = jax.jit(lambda v: loss_fn(v, fixed, None)[0])
  eval_fn = lambda v: losses.append(float(eval_loss(v))) or {"loss": losses[-1]}
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  t = trainer_lib.Trainer(loss_fn, variables, trainable=["params/.*", "experts/.*"], accum_steps=2,
                          optimizer=optimizers.make_optimizer(learning_rate=1e-2, num_steps=STEPS),
                          mesh=partitioning.make_mesh(*mesh_shape, devices=devices), eval_fn=eval_fn,
                          eval_every=1)
  final = trainer_lib.flatten(t.train(batches, STEPS))
  specs = {k: str(x.sharding.spec) for k, x in trainer_lib.flatten(t.state["params"]).items()}
  return losses, {k: np.asarray(v) for k, v in final.items()}, specs


def test_one_device_and_eight_devices_agree(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "report.json").read_text())
  assert report["devices"] == 8

  losses, final, _ = run((1, 1, 1))
  assert losses[-1] < losses[0]
  for name in MESHES:
    np.testing.assert_allclose(report[name]["losses"], losses, rtol=1e-5)
    other = np.load(tmp_path / f"{name}.npz")
    for k, v in final.items():
      np.testing.assert_allclose(other[k], v, rtol=1e-4, atol=1e-6, err_msg=f"{name} {k}")
  specs = report["2x2x2"]["specs"]
  assert specs["params/wi"] == str(jax.sharding.PartitionSpec(None, "model"))
  assert specs["experts/lora_a"] == str(jax.sharding.PartitionSpec("expert", None, None))
  assert specs["experts/lora_b"] == str(jax.sharding.PartitionSpec("expert", None, "model"))


if __name__ == "__main__":
  out = pathlib.Path(sys.argv[1])
  report = {"devices": jax.device_count()}
  for name, shape in MESHES.items():
    losses, final, specs = run(shape)
    np.savez(out / f"{name}.npz", **final)
    report[name] = {"losses": losses, "specs": specs}
  (out / "report.json").write_text(json.dumps(report))
