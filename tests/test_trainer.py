"""The trainer: bitwise resume, accumulation == big batch, frozen leaves, schedule, keep-best, bad checkpoints."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from phatgoose_jax.training import data, optimizers, trainer as trainer_lib

VOCAB, EMBED, HIDDEN, RANK, LENGTH = 16, 8, 16, 2, 6


def boxed(init, names):
  return nn.with_logical_partitioning(init, names)


class TinyGatedLM(nn.Module):
  """emb -> gelu(x W_i + sigmoid(x . v) (x A) B) W_o -> logits over the tied embedding; dropout on h."""
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, tokens, train=True):
    emb = self.param("embedding", boxed(nn.initializers.normal(1.0), ("vocab", "embed")), (VOCAB, EMBED))
    wi = self.param("wi", boxed(nn.initializers.lecun_normal(), ("embed", "mlp")), (EMBED, HIDDEN))
    wo = self.param("wo", boxed(nn.initializers.lecun_normal(), ("mlp", "embed")), (HIDDEN, EMBED))
    key = self.make_rng("params") if self.is_initializing() else None
    a = self.variable("lora", "lora_a", boxed(nn.initializers.normal(0.5), ("embed", "rank")), key,
                      (EMBED, RANK))
    b = self.variable("lora", "lora_b", boxed(nn.initializers.normal(0.5), ("rank", "mlp")), key,
                      (RANK, HIDDEN))
    v = self.variable("gates", "gate", boxed(nn.initializers.normal(0.5), ("embed",)), key, (EMBED,))
    x = emb[tokens]
    gate = jax.nn.sigmoid(x @ v.value)[..., None]
    h = nn.gelu(x @ wi + gate * (x @ a.value) @ b.value / RANK)
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    return (h @ wo) @ emb.T


def make_model(dropout_rate=0.0, seed=0):
  model = TinyGatedLM(dropout_rate)
  variables = jax.jit(model.init)({"params": jax.random.key(seed), "dropout": jax.random.key(1)},
                         jnp.zeros((2, LENGTH), jnp.int32))

  def loss_fn(variables, batch, rng):
    """Token-weighted mean cross-entropy: sum(l * m) / sum(m), with num_tokens = sum(m)."""
    logits = model.apply(variables, batch["inputs"], rngs={"dropout": rng})
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    m = batch["weights"].astype(jnp.float32)
    return (losses * m).sum() / m.sum(), {"num_tokens": m.sum()}

  return variables, loss_fn


def make_examples(n=24, seed=0):
  rng = np.random.default_rng(seed)
  weights = (np.arange(LENGTH)[None] < rng.integers(1, LENGTH + 1, size=(n, 1))).astype(np.int32)
  return {"inputs": rng.integers(0, VOCAB, (n, LENGTH), dtype=np.int32),
          "targets": rng.integers(0, VOCAB, (n, LENGTH), dtype=np.int32), "weights": weights}


def leaves_equal(a, b):
  return jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b))


class RecordingBatches:
  def __init__(self, batches):
    self.batches, self.steps = batches, []

  def __call__(self, step):
    self.steps.append(step)
    return self.batches(step)


def test_resume_is_bitwise_identical(tmp_path):
  variables, loss_fn = make_model(dropout_rate=0.3)
  batches = data.DeterministicBatches(make_examples(), batch_size=8, seed=3)
  kw = dict(trainable=["lora/.*", "gates/.*"], accum_steps=2, checkpoint_every=2, seed=5,
            optimizer=optimizers.make_optimizer(learning_rate=1e-2, num_steps=6, warmup_fraction=0.5),
            eval_fn=lambda v: {"loss": 0.0}, eval_every=2)
  straight = trainer_lib.Trainer(loss_fn, variables, workdir=str(tmp_path / "a"), **kw).train(batches, 6)

  first = RecordingBatches(batches)
  trainer_lib.Trainer(loss_fn, variables, workdir=str(tmp_path / "b"), **kw).train(first, 3)
  second = RecordingBatches(batches)
  resumed_trainer = trainer_lib.Trainer(loss_fn, variables, workdir=str(tmp_path / "b"), **kw)
  assert int(resumed_trainer.state["step"]) == 3
  resumed = resumed_trainer.train(second, 6)

  assert first.steps == [0, 1, 2] and second.steps == [3, 4, 5]
  assert leaves_equal(straight, resumed)
  assert not leaves_equal(straight["lora"], nn.meta.unbox(variables)["lora"])
  assert list((tmp_path / "a" / "tensorboard").glob("events.out.tfevents*"))


def test_accumulation_equals_one_big_batch():
  variables, loss_fn = make_model()
  batches = data.DeterministicBatches(make_examples(), batch_size=8, seed=0)
  results = []
  for accum in (1, 4):
    t = trainer_lib.Trainer(loss_fn, variables, trainable=["lora/.*"], optimizer=optax.sgd(0.5),
                            accum_steps=accum, log_every=1)
    results.append(t.train(batches, 2)["lora"])
    assert [h["step"] for h in t.history] == [1, 2] and t.local_rows(8) == slice(0, 8)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), *results)
  assert not leaves_equal(results[0], nn.meta.unbox(variables)["lora"])


def test_frozen_leaves_stay_out_of_the_optimizer_and_unchanged():
  variables, loss_fn = make_model()
  plain = nn.meta.unbox(variables)
  t = trainer_lib.Trainer(loss_fn, variables, trainable=["gates/.*"])
  state_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(t.state["opt_state"])}
  assert state_paths and all("gates" in p for p in state_paths if "count" not in p)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(t.state) if jnp.issubdtype(x.dtype, jnp.floating))
  out = t.train(data.DeterministicBatches(make_examples(), 8), 3)
  assert leaves_equal({"params": out["params"], "lora": out["lora"]},
                      {"params": plain["params"], "lora": plain["lora"]})
  assert not leaves_equal(out["gates"], plain["gates"])


def test_trainable_patterns_must_match():
  variables, loss_fn = make_model()
  with pytest.raises(ValueError, match="match no variable"):
    trainer_lib.Trainer(loss_fn, variables, trainable=["experts/.*"])


def test_warmup_then_constant_schedule():
  s = optimizers.warmup_constant_schedule(learning_rate=5e-3, num_steps=1000, warmup_fraction=0.06)
  np.testing.assert_allclose([s(0), s(30), s(59), s(60), s(999)],
                             [0.0, 2.5e-3, 5e-3 * 59 / 60, 5e-3, 5e-3], rtol=1e-6)
  assert float(optimizers.warmup_constant_schedule(1.0, 10, 0.0)(0)) == 1.0


def test_optimizer_clips_and_offers_adafactor():
  params = {"w": jnp.ones((4, 3))}
  grads = {"w": jnp.full((4, 3), 100.0)}
  sgd_like = optimizers.make_optimizer(num_steps=10, warmup_fraction=0.0, clip_norm=1.0)
  clipped, _ = optax.clip_by_global_norm(1.0).update(grads, optax.clip_by_global_norm(1.0).init(params))
  assert abs(float(optax.tree.norm(clipped)) - 1.0) < 1e-6
  updates, _ = sgd_like.update(grads, sgd_like.init(params), params)
  np.testing.assert_allclose(updates["w"], -5e-3, rtol=1e-4)
  ada = optimizers.make_optimizer("adafactor", num_steps=10)
  updates, _ = jax.jit(ada.update)(grads, ada.init(params), params)
  assert bool(jnp.all(jnp.isfinite(updates["w"])))
  with pytest.raises(ValueError, match="unknown optimizer"):
    optimizers.make_optimizer("lion")


def test_keep_best_keeps_the_best_step(tmp_path):
  variables, loss_fn = make_model()
  by_step = {0: 9.0, 2: 5.0, 4: 1.0, 6: 3.0}
  seen = {}

  def eval_fn(v):
    step = len(seen) * 2
    seen[step] = jax.tree.map(np.asarray, v["lora"])
    return {"loss": by_step[step]}

  t = trainer_lib.Trainer(loss_fn, variables, workdir=str(tmp_path), checkpoint_every=2, eval_every=2,
                          keep=1, eval_fn=eval_fn)
  t.train(data.DeterministicBatches(make_examples(), 8), 6)
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [4, 6]
  assert t.best_step == 4
  assert leaves_equal(t.best_variables()["lora"], seen[4])


def _train_two_steps(workdir):
  variables, loss_fn = make_model()
  trainer_lib.Trainer(loss_fn, variables, workdir=str(workdir)).train(
      data.DeterministicBatches(make_examples(), 8), 2)
  return variables, loss_fn


# After a failed restore, orbax's async machinery may report a callback on its closed event loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage,only_arrays", [("garbage", False), ("truncate", False), ("truncate", True)])
def test_corrupt_checkpoint_names_its_path(tmp_path, damage, only_arrays):
  variables, loss_fn = _train_two_steps(tmp_path)
  step_dir = tmp_path / "checkpoints" / "2"
  files = [p for p in step_dir.rglob("*") if p.is_file() and (p.parent.name == "d" or not only_arrays)]
  assert files
  for p in files:
    if damage == "garbage":
      p.write_bytes(b"\x00not a checkpoint\xff" * 3)
    else:
      p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
  with pytest.raises(trainer_lib.CheckpointError, match=str(step_dir)):
    trainer_lib.Trainer(loss_fn, variables, workdir=str(tmp_path))


def test_half_written_checkpoint_is_ignored(tmp_path):
  variables, loss_fn = _train_two_steps(tmp_path)
  tmp = tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-1234"
  tmp.mkdir()
  (tmp / "junk").write_bytes(b"partial")
  t = trainer_lib.Trainer(loss_fn, variables, workdir=str(tmp_path))
  assert int(t.state["step"]) == 2


def test_batches_are_a_pure_function_of_seed_and_step():
  examples = make_examples(n=10)
  a, b = data.DeterministicBatches(examples, 4, seed=1), data.DeterministicBatches(examples, 4, seed=1)
  assert all(leaves_equal(a(s), b(s)) for s in (0, 3, 7, 2))
  seen = np.concatenate([a.indices(s) for s in range(5)])  # 20 positions = 2 epochs of 10
  assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
  assert not np.array_equal(seen[:10], seen[10:])
  assert not np.array_equal(a.indices(0), data.DeterministicBatches(examples, 4, seed=2).indices(0))
  listed = data.DeterministicBatches([{k: v[i] for k, v in examples.items()} for i in range(10)], 4, seed=1)
  assert leaves_equal(listed(3), a(3))


def test_batch_must_split_into_micro_batches():
  variables, loss_fn = make_model()
  t = trainer_lib.Trainer(loss_fn, variables, accum_steps=3)
  with pytest.raises(ValueError, match="not divisible by accum_steps=3"):
    t.train(data.DeterministicBatches(make_examples(), 8), 1)


class StepMetrics:
  """A fake validation metric by step, recording the steps validated and the `lora` leaves seen there."""

  def __init__(self, by_step, key="score"):
    self.by_step, self.key, self.seen, self.trainer = by_step, key, {}, None

  def __call__(self, variables):
    step = int(self.trainer.state["step"])
    self.seen[step] = jax.tree.map(np.asarray, variables["lora"])
    return {self.key: self.by_step[step]}


def _selecting_trainer(tmp_path, metrics, **kw):
  variables, loss_fn = make_model()
  t = trainer_lib.Trainer(loss_fn, variables, workdir=str(tmp_path), eval_fn=metrics, best_fn=lambda m: m["score"],
                          best_mode="max", **kw)
  metrics.trainer = t
  return t


def expected_best(scores: dict, mode: str = "max") -> int:
  """The official rule, independently: walk the validations in order, replace the kept one when the new
  result is >= (<= for a loss) the kept one (src/procedures/evaluator.py:122-136)."""
  best = None
  for step in sorted(scores):
    if best is None or (scores[step] >= scores[best] if mode == "max" else scores[step] <= scores[best]):
      best = step
  return best


def test_selection_validates_step_0_every_interval_and_the_last_step_ties_to_the_later(tmp_path):
  by_step = {0: 0.5, 100: 0.75, 200: 0.75, 250: 0.25}
  metrics = StepMetrics(by_step)
  t = _selecting_trainer(tmp_path, metrics, eval_every=100, checkpoint_every=250)
  t.train(data.DeterministicBatches(make_examples(), 8), 250)
  assert sorted(metrics.seen) == [0, 100, 200, 250]
  assert t.best_step == expected_best(by_step) == 200
  assert leaves_equal(t.best_variables()["lora"], metrics.seen[200])
  assert not leaves_equal(metrics.seen[100], metrics.seen[200])


def test_step_0_is_a_candidate(tmp_path):
  by_step = {0: 0.9, 2: 0.5, 4: 0.1}
  metrics = StepMetrics(by_step)
  t = _selecting_trainer(tmp_path, metrics, eval_every=2, checkpoint_every=4)
  t.train(data.DeterministicBatches(make_examples(), 8), 4)
  assert t.best_step == expected_best(by_step) == 0
  assert leaves_equal(t.best_variables()["lora"], nn.meta.unbox(make_model()[0])["lora"])


def test_a_minimised_loss_also_ties_to_the_later_step(tmp_path):
  by_step = {0: 3.0, 2: 1.0, 4: 1.0, 6: 2.0}
  metrics = StepMetrics(by_step, key="loss")
  variables, loss_fn = make_model()
  t = trainer_lib.Trainer(loss_fn, variables, workdir=str(tmp_path), eval_fn=metrics, eval_every=2,
                          checkpoint_every=6)
  metrics.trainer = t
  t.train(data.DeterministicBatches(make_examples(), 8), 6)
  assert t.best_step == expected_best(by_step, "min") == 4
  assert leaves_equal(t.best_variables()["lora"], metrics.seen[4])


class Crash(RuntimeError):
  pass


def test_a_resumed_run_selects_as_an_uninterrupted_one(tmp_path):
  by_step = {0: 0.2, 2: 0.6, 4: 0.6, 6: 0.4}
  batches = data.DeterministicBatches(make_examples(), 8, seed=1)
  straight = _selecting_trainer(tmp_path / "a", StepMetrics(by_step), eval_every=2, checkpoint_every=2)
  straight.train(batches, 6)

  def crashing(step):
    if step == 5:
      raise Crash("interrupted")
    return batches(step)

  with pytest.raises(Crash):
    _selecting_trainer(tmp_path / "b", StepMetrics(by_step), eval_every=2, checkpoint_every=2).train(crashing, 6)
  resumed = _selecting_trainer(tmp_path / "b", StepMetrics(by_step), eval_every=2, checkpoint_every=2)
  assert int(resumed.state["step"]) == 4
  resumed.train(batches, 6)
  assert straight.best_step == resumed.best_step == 4
  assert leaves_equal(straight.best_variables(), resumed.best_variables())


def official_micro_batch_gradient(model, variables, batch, num_groups):
  """The official accumulation (src/procedures/trainer.py:145-151) computed directly: the gradient of
  sum_g loss_g / G, loss_g the token mean of micro-batch g (rows j = g mod G), as Hugging Face's cross-entropy
  (ignore_index on pad targets) averages it."""
  def official(lora):
    total = 0.0
    for g in range(num_groups):
      micro = {k: v[g::num_groups] for k, v in batch.items()}
      logits = model.logits({**variables, "lora": lora}, micro)
      targets = micro["decoder_target_tokens"]
      nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]
      total = total + jnp.sum(jnp.where(targets > 0, nll, 0.0)) / jnp.sum(targets > 0) / num_groups
    return total
  return jax.grad(official)(variables["lora"])


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_the_batch_loss_is_the_mean_of_each_official_micro_batch_token_mean(accum_steps):
  """Four micro-batches of 7, 3, 7 and 11 target tokens: one SGD step of lr 1 moves the LoRA by minus the official
  gradient, whether the batch is computed at once or in 2 accumulated parts (train.training_loss); the
  token-weighted loss of the whole batch has another gradient."""
  from phatgoose_jax import train  # pylint: disable=import-outside-toplevel
  from phatgoose_jax.experts.config import ExpertConfig  # pylint: disable=import-outside-toplevel
  from phatgoose_jax.models import EncoderDecoderModel, shift_right  # pylint: disable=import-outside-toplevel
  from phatgoose_jax.t5.config import preset  # pylint: disable=import-outside-toplevel
  model = EncoderDecoderModel(preset("tiny", dropout_rate=0.0), ExpertConfig(mode="lora", rank=4))
  variables = nn.meta.unbox(model.get_initial_variables(jax.random.key(0)))
  variables["lora"] = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(1), x.shape),
                                   variables["lora"])
  rng = np.random.default_rng(0)
  lengths = np.array([1, 2, 5, 6, 6, 1, 2, 5])  # row j is in micro-batch j mod 4: 1+6, 2+1, 5+2, 6+5 tokens
  targets = np.where(np.arange(6)[None] < lengths[:, None], rng.integers(2, 259, (8, 6)), 0).astype(np.int32)
  batch = {"encoder_input_tokens": rng.integers(2, 259, (8, 5)).astype(np.int32),
           "decoder_input_tokens": shift_right(targets), "decoder_target_tokens": targets}
  expected = official_micro_batch_gradient(model, variables, batch, 4)
  loss_fn, weight_key = train.training_loss(model, loss_groups=4, accum_steps=accum_steps)
  t = trainer_lib.Trainer(loss_fn, variables, trainable=["lora/.*"], optimizer=optax.sgd(1.0),
                          accum_steps=accum_steps, loss_weight_key=weight_key)
  moved = t.train(lambda step: batch, 1)["lora"]
  got = jax.tree.map(lambda before, after: before - after, variables["lora"], moved)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=1e-7), got, expected)
  token_weighted = jax.grad(lambda lora: model.loss_fn({**variables, "lora": lora}, batch)[0])(variables["lora"])
  assert not np.allclose(jax.tree.leaves(token_weighted)[0], jax.tree.leaves(expected)[0], rtol=1e-2)
