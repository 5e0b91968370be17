"""Routing (algorithm.md §4, §5) against an independent numpy computation, and its failure modes."""
import importlib
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phatgoose_jax import routers
from phatgoose_jax.experts import routing, sharded
from phatgoose_jax.experts.config import ExpertConfig


def np_standardize(x):
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)


def np_route(u, router, a, b, k, scale, score="standardized"):
  """algorithm.md §4 token by token, in float64 numpy: scores, softmax, top-k, renormalise, mix OUTPUTS."""
  d_in = u.shape[-1]
  out = np.zeros(u.shape[:-1] + (b.shape[-1],))
  for idx in np.ndindex(*u.shape[:-1]):
    x = u[idx].astype(np.float64)
    if score == "standardized":
      s = np.array([np_standardize(x) @ np_standardize(v) for v in router]) / np.sqrt(d_in)
    else:
      s = np.abs(router @ x) / (10 * np.sqrt(d_in))
    p = np.exp(s - s.max())
    p /= p.sum()
    top = np.argsort(-p, kind="stable")[:k]
    w = p[top] / (p[top].sum() + 1e-6)
    out[idx] = sum(w_j * ((x @ a[e]) @ b[e]) * scale for w_j, e in zip(w, top))
  return out


def random_case(num_experts, d_in=12, d_out=10, rank=3, seed=0):
  rng = np.random.default_rng(seed)
  u = rng.normal(size=(2, 5, d_in)).astype(np.float32)
  router = rng.normal(size=(num_experts, d_in)).astype(np.float32)
  a = rng.normal(size=(num_experts, d_in, rank)).astype(np.float32)
  b = rng.normal(size=(num_experts, rank, d_out)).astype(np.float32)
  return u, router, a, b


@pytest.mark.parametrize("num_experts", [1, 3, 7])
@pytest.mark.parametrize("k_choice", ["1", "2", "E"])
@pytest.mark.parametrize("impl", ["dense", "gather", "ragged", "blocks"])
def test_route_matches_numpy(num_experts, k_choice, impl):
  k = num_experts if k_choice == "E" else min(int(k_choice), num_experts)
  u, router, a, b = random_case(num_experts, seed=num_experts * 10 + k)
  got, _, _ = routing.route(u, router, a, b, top_k=k, scale=0.25, impl=impl)
  np.testing.assert_allclose(np.asarray(got), np_route(u, router, a, b, k, 0.25), rtol=1e-4, atol=1e-4)


def test_arrow_scores_match_numpy():
  u, router, a, b = random_case(5, seed=3)
  router /= np.linalg.norm(router, axis=-1, keepdims=True)
  got, _, _ = routing.route(u, router, a, b, top_k=2, scale=1.0, score="arrow")
  np.testing.assert_allclose(np.asarray(got), np_route(u, router, a, b, 2, 1.0, "arrow"), rtol=1e-4, atol=1e-4)


def test_arrow_is_sign_invariant():
  u, router, _, _ = random_case(4, seed=4)
  np.testing.assert_allclose(routing.arrow_scores(u, router), routing.arrow_scores(u, -router), rtol=1e-6)


def test_outputs_are_mixed_not_parameters():
  """Mixing weights of (A, B) first gives sum_ij w_i w_j B_j A_i u, which differs from sum_i w_i B_i A_i u."""
  u, router, a, b = random_case(3, seed=5)
  got, weights, index = routing.route(u, router, a, b, top_k=2, scale=1.0)
  w = np.asarray(weights)[..., None, None]
  a_mix = (np.asarray(a)[np.asarray(index)] * w).sum(-3)
  b_mix = (np.asarray(b)[np.asarray(index)] * w).sum(-3)
  param_mixed = np.einsum("bli,blir,blro->blo", u, a_mix, b_mix)
  assert np.abs(np.asarray(got) - param_mixed).max() > 1e-2
  np.testing.assert_allclose(np.asarray(got), np_route(u, router, a, b, 2, 1.0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("router_kind", ["zero", "constant"])
def test_degenerate_router_vectors_give_finite_uniform_scores(router_kind):
  """LN of a zero or constant vector is 0 (not NaN): every score is 0 and the softmax is uniform."""
  u, router, a, b = random_case(4, seed=6)
  router = np.zeros_like(router) if router_kind == "zero" else np.full_like(router, 3.0)
  scores = np.asarray(routing.phatgoose_scores(u, router))
  assert np.all(np.isfinite(scores))
  np.testing.assert_allclose(scores, 0.0, atol=1e-6)
  got, weights, _ = routing.route(u, router, a, b, top_k=2, scale=1.0)
  assert np.all(np.isfinite(np.asarray(got)))
  np.testing.assert_allclose(np.asarray(weights), 0.5, atol=1e-5)


@pytest.mark.parametrize("offset", [0.0, 3.0])
def test_standardized_scores_match_numpy_without_centred_activations(offset):
  """The float32 scores use u . LN(v) and u's mean and variance, not LN(u): equal to LN(u) . LN(v) / sqrt(d)
  in float64 numpy, also for activations whose mean is far from 0."""
  rng = np.random.default_rng(4)
  u = (rng.normal(size=(64, 256)) * 0.7 + offset).astype(np.float32)
  router = rng.normal(size=(36, 256)).astype(np.float32)
  want = np_standardize(u.astype(np.float64)) @ np_standardize(router.astype(np.float64)).T / 16.0
  got = np.asarray(routing.phatgoose_scores(jnp.asarray(u), jnp.asarray(router)))
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("num_experts", [3, 166, 2 ** 22])
def test_sort_by_expert_is_the_stable_argsort(num_experts):
  """The int32 key sort (and its argsort fallback when E P passes int32) gives numpy's stable order and the
  ids in that order; the inverse permutation undoes it."""
  flat = np.random.default_rng(num_experts % 97).integers(0, min(num_experts, 40), 1000).astype(np.int32)
  order, expert = jax.jit(routing.sort_by_expert, static_argnums=1)(jnp.asarray(flat), num_experts)
  np.testing.assert_array_equal(np.asarray(order), np.argsort(flat, kind="stable"))
  np.testing.assert_array_equal(np.asarray(expert), np.sort(flat))
  np.testing.assert_array_equal(np.asarray(routing.inverse_permutation(order))[np.asarray(order)], np.arange(1000))


def test_top_k_weights_renormalise():
  scores = np.array([[0.3, -1.0, 2.0, 0.5]], np.float32)
  w, idx = routing.top_k_weights(scores, 2)
  p = np.exp(scores) / np.exp(scores).sum()
  np.testing.assert_array_equal(np.asarray(idx), [[2, 3]])
  np.testing.assert_allclose(np.asarray(w), p[:, [2, 3]] / (p[:, [2, 3]].sum() + 1e-6), rtol=1e-6)


def test_route_jits_under_grad():
  u, router, a, b = random_case(3, seed=7)
  loss = lambda a_: routing.route(u, router, a_, b, top_k=2, scale=1.0, impl="gather")[0].sum()  # noqa: E731
  grad = jax.jit(jax.grad(loss))(a)
  assert np.all(np.isfinite(np.asarray(grad))) and np.abs(np.asarray(grad)).sum() > 0


def routed_case(num_experts, k, tokens=300, d_in=24, d_out=20, rank=4, seed=0):
  """Token activations with a router, experts scaled so that outputs are O(1), and the top-k choice."""
  u, router, a, b = random_case(num_experts, d_in, d_out, rank, seed)
  u = np.random.default_rng(seed).normal(size=(3, tokens // 3, d_in)).astype(np.float32)
  weights, index = routing.top_k_weights(routing.phatgoose_scores(u, router), k)
  return u, router, a * 0.3, b * 0.3, weights, index


EXPERTS_AND_K = [(1, 1), (3, 1), (3, 2), (36, 1), (36, 2), (166, 1), (166, 2)]


@pytest.mark.parametrize("num_experts,k", EXPERTS_AND_K)
def test_blocks_equal_dense_reference(num_experts, k):
  u, _, a, b, weights, index = routed_case(num_experts, k, seed=num_experts + k)
  want = routing.mix_dense(u, a, b, weights, index, 0.5)
  got = jax.jit(routing.mix_blocks, static_argnums=5)(u, a, b, weights, index, 0.5)
  assert float(jnp.abs(want).max()) > 0.1
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_experts,k", [(1, 1), (3, 2), (36, 1), (166, 2)])
def test_blocks_gradients_equal_dense_reference(num_experts, k):
  """d/d(u, router, lora_a, lora_b) of <route(...), c> through the blocks path equals the dense reference's."""
  u, router, a, b, _, _ = routed_case(num_experts, k, tokens=120, seed=num_experts * 3 + k)
  cotangent = np.random.default_rng(1).normal(size=u.shape[:-1] + (b.shape[-1],)).astype(np.float32)

  def loss(impl):
    def f(*args):
      return jnp.sum(routing.route(*args, top_k=k, scale=0.5, impl=impl)[0] * cotangent)
    return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))

  want, got = loss("dense")(u, router, a, b), loss("blocks")(u, router, a, b)
  for name, w, g in zip(["u", "router", "lora_a", "lora_b"], want, got):
    assert float(jnp.abs(w).max()) > 0 or (name == "router" and num_experts == 1), name  # one expert: w = 1
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("num_experts,k", [(3, 2), (36, 2), (166, 1)])
def test_expert_blocks_layout(num_experts, k):
  """Every (token, choice) pair sits in exactly one slot, each block holds one expert's pairs, and the
  static block count bounds the padded groups."""
  index = np.asarray(routed_case(num_experts, k, seed=9)[-1])
  flat = index.reshape(-1)
  block = routing.block_size(flat.size, num_experts, 4)
  slot, block_expert = map(np.asarray, routing.expert_blocks(index, num_experts, block))
  assert len(np.unique(slot)) == flat.size and slot.max() < len(block_expert) * block
  slot_pair = np.asarray(routing.place(jnp.arange(flat.size), slot, len(block_expert) * block, flat.size))
  np.testing.assert_array_equal(slot_pair[slot], np.arange(flat.size))
  slot_expert = np.where(slot_pair < flat.size, flat[np.minimum(slot_pair, flat.size - 1)], -1)
  per_block = slot_expert.reshape(-1, block)
  assert np.all((per_block == block_expert[:, None]) | (per_block == -1))
  sizes = np.bincount(flat, minlength=num_experts)
  assert np.sum(-(-sizes // block)) <= len(block_expert)


def test_blocks_memory_is_bounded():
  """No temporary of the gather path's tokens k d_in r or the dense path's tokens E d_out floats: the
  compiled blocks path needs O(tokens k (r + d_out)) plus one chunk."""
  tokens, d_in, d_out, rank, num_experts, k = 4096, 64, 64, 16, 166, 2
  shapes = [jax.ShapeDtypeStruct(s, jnp.float32) for s in
            [(tokens, d_in), (num_experts, d_in), (num_experts, d_in, rank), (num_experts, rank, d_out)]]

  def temp_bytes(impl):
    fn = jax.jit(lambda u, r, a, b: routing.route(u, r, a, b, top_k=k, scale=1.0, impl=impl)[0])
    return fn.lower(*shapes).compile().memory_analysis().temp_size_in_bytes

  bound = 4 * (4 * tokens * k * (rank + d_out) + 4 * routing.CHUNK_ROWS * (d_in + d_out))
  assert temp_bytes("blocks") < bound < min(4 * tokens * num_experts * d_out, 4 * tokens * k * d_in * rank)
  assert temp_bytes("gather") > bound and temp_bytes("dense") > bound


def test_auto_is_gather_for_a_decoding_step_blocks_above_never_dense():
  assert jax.default_backend() == "cpu"
  assert routing.resolve_impl("auto", 2 * 8) == routing.resolve_impl("auto", routing.GATHER_MAX_PAIRS) == "gather"
  assert routing.resolve_impl("auto", routing.GATHER_MAX_PAIRS + 1) == routing.resolve_impl("auto") == "blocks"
  assert routing.resolve_impl("gather", 10 ** 6) == "gather"


def test_every_router_and_the_config_default_to_auto():
  builders = [routers.ROUTERS[name].builder for name in routers.ROUTED]
  functions = [getattr(importlib.import_module(f"phatgoose_jax.routers.{b.split(':')[0]}"), b.split(":")[1])
               for b in builders] + [routers.options, routers.routed, routing.route, sharded.route]
  assert {inspect.signature(f).parameters["impl"].default for f in functions} == {"auto"}
  assert ExpertConfig().impl == "auto"


@pytest.mark.parametrize("impl", ["dense", "gather", "blocks"])
def test_per_row_routing_equals_each_rows_own_router_over_its_own_subset(impl):
  """RowRouting: row i scores by its own router over its own experts with its own k <= the config's, exactly
  (up to float32 rounding) the route of a model holding only those experts."""
  num, d_in, d_out, rank, k = 6, 12, 10, 3, 3
  rng = np.random.default_rng(3)
  u = rng.normal(size=(4, 5, d_in)).astype(np.float32)
  a = rng.normal(size=(num, d_in, rank)).astype(np.float32)
  b = rng.normal(size=(num, rank, d_out)).astype(np.float32)
  vectors = {"standardized": rng.normal(size=(num, d_in)).astype(np.float32),
             "arrow": rng.normal(size=(num, d_in)).astype(np.float32),
             "spectr": np.linalg.qr(rng.normal(size=(num, d_in, rank)))[0].astype(np.float32)}
  subsets = [[0, 1, 2, 3, 4, 5], [1, 3], [5, 0, 2], [4]]
  scorers, ks = [0, 1, 2, 0], [3, 2, 1, 1]
  mask = np.zeros((4, num), bool)
  for i, s in enumerate(subsets):
    mask[i, s] = True
  rows = routing.RowRouting(jnp.asarray(scorers, jnp.int32), jnp.asarray(mask), jnp.asarray(ks, jnp.int32))
  got, weights, index = routing.route(u, vectors, a, b, top_k=k, scale=0.5, score="per_row", impl=impl, rows=rows)
  for i, subset in enumerate(subsets):
    keep = sorted(subset)  # the library's order
    name = routing.ROW_SCORES[scorers[i]]
    want, _, _ = routing.route(u[i:i + 1], vectors[name][keep], a[keep], b[keep], top_k=ks[i], scale=0.5,
                               score=name, impl="dense")
    np.testing.assert_allclose(np.asarray(got[i:i + 1]), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert np.all(np.isin(np.asarray(index[i, :, :ks[i]]), subset))
    assert np.all(np.asarray(weights[i, :, ks[i]:]) == 0)
  calls = []
  with jax.disable_jit():  # a score no row asks for is not computed
    real = routing.SCORES["spectr"]
    routing.SCORES["spectr"] = lambda *args: calls.append(1) or real(*args)
    try:
      routing.route(u, vectors, a, b, top_k=k, scale=0.5, score="per_row", impl="dense",
                    rows=rows._replace(scorer=jnp.zeros(4, jnp.int32)))
    finally:
      routing.SCORES["spectr"] = real
  assert not calls
