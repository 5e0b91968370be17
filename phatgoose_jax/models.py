"""The encoder-decoder model's small t5x-style interface: init, loss, scoring and greedy decoding.

Variables are a dict of collections (`params`, and `lora` / `gates` / `experts` when experts are on).
Batches follow t5x's feature names: `encoder_input_tokens`, `decoder_input_tokens`,
`decoder_target_tokens`, optional `decoder_loss_weights` (all <int32>[b, L]).
"""
import functools
from typing import Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from phatgoose_jax.t5.config import ExpertConfig, T5Config
from phatgoose_jax.t5.network import Transformer

PAD_ID = 0
EOS_ID = 1
VARIABLE_COLLECTIONS = ("params", "lora", "gates", "experts")


def shift_right(targets: np.ndarray) -> np.ndarray:
  """Decoder inputs: the targets shifted right by one, starting from pad (T5 has no BOS)."""
  targets = np.asarray(targets)
  return np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)


def pad_tokens(rows, length: int, num_rows: Optional[int] = None) -> np.ndarray:
  """<int32>[num_rows or len(rows), length]: each row of ids truncated to `length`, zero-padded (pad 0)."""
  out = np.zeros((len(rows) if num_rows is None else num_rows, length), np.int32)
  for i, row in enumerate(rows):
    out[i, :min(len(row), length)] = row[:length]
  return out


def token_log_likelihoods(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(target_t | ...) for each position: <float32>[b, L]."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


class EncoderDecoderModel:
  """A T5 v1.1 with optional experts, and the functions that train, score and decode with it."""

  def __init__(self, config: T5Config, experts: ExpertConfig = ExpertConfig()):
    self.config = config
    self.experts = experts
    self.module = Transformer(config, experts)
    self._apply = jax.jit(self.module.apply, static_argnames=("enable_dropout", "decode", "method", "mutable"))

  def init_variables(self, rng: jax.Array, input_length: int = 8, target_length: int = 8) -> dict:
    """Fresh variables (boxed with logical axis metadata) for every collection the expert mode needs."""
    enc = jnp.ones((1, input_length), jnp.int32)
    dec = jnp.ones((1, target_length), jnp.int32)
    variables = self.module.init({"params": rng}, enc, dec, dec, mutable=list(VARIABLE_COLLECTIONS))
    return dict(flax.core.unfreeze(variables))

  def logits(self, variables, batch, expert_weights=None, dropout_rng=None) -> jax.Array:
    """Teacher-forced decoder logits <float32>[b, L_out, vocab]."""
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    return self._apply(variables, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                             batch["decoder_target_tokens"], enable_dropout=dropout_rng is not None,
                             expert_weights=expert_weights, rngs=rngs)

  def loss_fn(self, variables, batch, dropout_rng=None):
    """Mean token cross-entropy over non-pad targets (weights `decoder_loss_weights` if given)."""
    logits = self.logits(variables, batch, batch.get("expert_weights"), dropout_rng)
    targets = batch["decoder_target_tokens"]
    weights = batch.get("decoder_loss_weights", targets > 0).astype(jnp.float32)
    nll = -token_log_likelihoods(logits, targets)
    num_tokens = jnp.maximum(jnp.sum(weights), 1.0)
    loss = jnp.sum(nll * weights) / num_tokens
    accuracy = jnp.sum((jnp.argmax(logits, -1) == targets) * weights) / num_tokens
    return loss, {"loss": loss, "accuracy": accuracy, "num_tokens": jnp.sum(weights)}

  def score_batch(self, variables, batch, expert_weights=None) -> dict:
    """Per-example target log-likelihood, summed and averaged over non-pad target tokens (algorithm.md §6).

    Returns {"sum_logprob", "mean_logprob", "num_target_tokens"}, each <float32>[b].
    """
    targets = batch["decoder_target_tokens"]
    token_ll = token_log_likelihoods(self.logits(variables, batch, expert_weights), targets)
    mask = (targets > 0).astype(jnp.float32)
    total = jnp.sum(token_ll * mask, axis=-1)
    count = jnp.sum(mask, axis=-1)
    return {"sum_logprob": total, "mean_logprob": total / jnp.maximum(count, 1.0), "num_target_tokens": count}

  def decode_step(self, variables, cache, encoded, encoder_tokens, tokens, expert_weights=None):
    """One cached decoder step: tokens <int>[b, 1] -> (logits <float32>[b, 1, vocab], new cache)."""
    logits, state = self._apply({**variables, "cache": cache}, encoded, encoder_tokens, tokens,
                                      decode=True, expert_weights=expert_weights, method=Transformer.decode,
                                      mutable="cache")
    return logits, state["cache"]

  def init_cache(self, variables, encoded, encoder_tokens, max_decode_length: int, expert_weights=None):
    """Zero key/value caches of length `max_decode_length` for every decoder self-attention."""
    dummy = jnp.zeros((encoder_tokens.shape[0], max_decode_length), jnp.int32)
    _, state = self._apply(variables, encoded, encoder_tokens, dummy, decode=True,
                                 expert_weights=expert_weights, method=Transformer.decode, mutable="cache")
    return state["cache"]

  def encode(self, variables, encoder_tokens, expert_weights=None):
    return self._apply(variables, encoder_tokens, expert_weights=expert_weights, method=Transformer.encode)

  def predict_batch(self, variables, encoder_tokens, max_decode_length: int, expert_weights=None,
                    eos_id: int = EOS_ID) -> jax.Array:
    """Greedy decoding with a KV cache. Returns <int32>[b, max_decode_length], zero-padded after EOS."""
    encoded = self.encode(variables, encoder_tokens, expert_weights)
    cache = self.init_cache(variables, encoded, encoder_tokens, max_decode_length, expert_weights)
    batch = encoder_tokens.shape[0]

    def step(carry, _):
      cache, token, done = carry
      logits, cache = self.decode_step(variables, cache, encoded, encoder_tokens, token[:, None], expert_weights)
      token = jnp.where(done, PAD_ID, jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32))
      return (cache, token, done | (token == eos_id)), token

    init = (cache, jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool))
    _, tokens = jax.lax.scan(step, init, None, length=max_decode_length)
    return tokens.T

  @functools.cached_property
  def jit_score(self):
    return jax.jit(self.score_batch)

  @functools.cached_property
  def jit_predict(self):
    return jax.jit(self.predict_batch, static_argnames=("max_decode_length", "eos_id"))


def unbox(variables: dict) -> dict:
  """Plain arrays from a (possibly) logically-boxed variables tree."""
  return nn.meta.unbox(variables)


def num_parameters(tree: Optional[dict]) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree or {})))
