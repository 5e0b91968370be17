"""SpectR routing (algorithm.md §5) against numpy: the reference code's factorisation and score, top-k choice,
mixed update, the library router, and the routed model's cached decoding."""
import math

import jax
import numpy as np
import pytest

from phatgoose_jax import library as lib
from phatgoose_jax import routers
from phatgoose_jax.checkpoints import names
from phatgoose_jax.experts import routing
from phatgoose_jax.models import EncoderDecoderModel
from phatgoose_jax.routers import spectr
from phatgoose_jax.t5.config import preset

from random_trees import cached_decoding_logits, random_batch, random_expert, random_params

CFG = preset("tiny")
RANK = 4


def reference_a_prime(lora_a, lora_b):
  """The reference code's `A' = V^T` <[r, d_in]>: r right singular vectors of Delta = B A (B A = lora_b^T lora_a^T)."""
  delta = np.asarray(lora_b, np.float64).T @ np.asarray(lora_a, np.float64).T
  _, _, vt = np.linalg.svd(delta)
  return vt[:lora_a.shape[1]]


def numpy_scores(u, loras):
  """s_e = ||A'_e u||_2 / (10 sqrt(d_in)) per token and expert <[n, E]>."""
  d_in = u.shape[-1]
  return np.stack([np.linalg.norm(u @ reference_a_prime(a, b).T, axis=-1) for a, b in loras], -1) / (
      10 * math.sqrt(d_in))


def random_loras(seed, num=3, d_in=12, d_out=10):
  rng = np.random.default_rng(seed)
  return [(rng.standard_normal((d_in, RANK)).astype(np.float32), rng.standard_normal((RANK, d_out)).astype(np.float32))
          for _ in range(num)]


def test_spectral_basis_spans_the_right_singular_vectors_of_the_update():
  (lora_a, lora_b), = random_loras(0, num=1)
  basis = spectr.spectral_basis(lora_a, lora_b)
  expected = reference_a_prime(lora_a, lora_b).T
  assert basis.shape == (12, RANK)
  np.testing.assert_allclose(basis.T @ basis, np.eye(RANK), atol=1e-5)
  np.testing.assert_allclose(np.abs(np.sum(basis * expected, axis=0)), np.ones(RANK), atol=1e-5)


def test_scores_match_the_reference_formula():
  loras = random_loras(1)
  u = np.random.default_rng(2).standard_normal((5, 12)).astype(np.float32)
  bases = np.stack([spectr.spectral_basis(a, b) for a, b in loras])
  np.testing.assert_allclose(np.asarray(routing.spectr_scores(u, bases)), numpy_scores(u, loras), rtol=1e-5)


def test_route_picks_the_top_k_projection_norms_and_mixes_expert_outputs():
  loras = random_loras(3, num=4)
  u = 5.0 * np.random.default_rng(4).standard_normal((2, 6, 12)).astype(np.float32)
  bases = np.stack([spectr.spectral_basis(a, b) for a, b in loras])
  lora_a, lora_b = np.stack([a for a, _ in loras]), np.stack([b for _, b in loras])
  update, weights, index = routing.route(u, bases, lora_a, lora_b, top_k=2, scale=0.5, score="spectr")
  scores = numpy_scores(u.reshape(-1, 12), loras)
  top = np.argsort(-scores, axis=-1)[:, :2]
  np.testing.assert_array_equal(np.sort(np.asarray(index).reshape(-1, 2), -1), np.sort(top, -1))
  kept = np.take_along_axis(scores, top, -1)
  w = np.exp(kept - kept.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  expected = sum(w[:, j, None] * np.stack([u.reshape(-1, 12)[t] @ lora_a[top[t, j]] @ lora_b[top[t, j]]
                                           for t in range(len(top))]) for j in range(2)) * 0.5
  np.testing.assert_allclose(np.asarray(update).reshape(-1, 10), expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def params():
  return random_params()


@pytest.fixture(scope="module")
def library(tmp_path_factory, params):
  library = lib.ExpertLibrary(str(tmp_path_factory.mktemp("spectr") / "lib"))
  for i, name in enumerate(["a", "b", "c"]):
    lora, gates = random_expert(i, RANK)
    library.add(name, lora, base=lib.base_fingerprint(CFG, params), gates=gates, dataset=f"{name}_data")
  return library


def test_library_router_holds_each_experts_basis_and_caches_it(library):
  assert "spectr" in routers.PER_TOKEN
  config, collection = routers.build("spectr", library, ["a", "b", "c"], top_k=2)[:2]
  assert config.score == "spectr" and config.num_experts == 3
  path = "decoder/layers_0/encoder_decoder_attention/out"
  lora = library.load("b").lora
  basis = names.flatten(collection)[f"{path}/router"][1]
  np.testing.assert_allclose(basis, spectr.spectral_basis(lora[f"{path}/lora_a"], lora[f"{path}/lora_b"]),
                             atol=1e-6)
  assert "spectr" in library.derived_kinds("b")


def test_routed_model_with_spectr_decodes_with_cache_as_the_full_forward(library, params):
  routed = routers.build("spectr", library, ["a", "b", "c"], top_k=2)
  model = EncoderDecoderModel(CFG, routed.expert_config)
  variables = jax.tree.map(np.asarray, routed.variables(params))
  batch = random_batch()
  full = np.asarray(model.logits(variables, batch))
  assert np.all(np.isfinite(full))
  valid = batch["decoder_target_tokens"] > 0
  np.testing.assert_allclose(cached_decoding_logits(model, variables, batch)[valid], full[valid], atol=1e-4)
