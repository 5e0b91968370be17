"""T5 v1.1 building blocks in flax.linen, with t5x's parameter names and logical axes (algorithm.md §1).

Shapes in docstrings: b batch, q/k query/key length, h heads, d d_kv, m d_model.
"""
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from phatgoose_jax.t5.config import T5Config

NEG_INF = -1e10


class Dense(nn.Module):
  """y = x @ kernel, no bias: every linear layer of the stack (t5x `DenseGeneral` with one input axis).

  The stack builds its linear layers through an injected factory with this signature (`dense=Dense`), so a
  layer that adds experts around the same `kernel` replaces it without editing the architecture
  (flaxformer style). `expert_weights` is passed through to that layer untouched; this one ignores it.
  x: <float>[batch, length, d_in] -> <float>[batch, length, features].
  """
  features: int
  kernel_axes: tuple
  kernel_init: Any = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, expert_weights=None):
    del expert_weights
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                        (x.shape[-1], self.features), jnp.float32)
    return x.astype(self.dtype) @ kernel.astype(self.dtype)


class RMSNorm(nn.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32, no bias (T5 LayerNorm).

  With `autocast`, as Hugging Face's `T5LayerNorm.forward` computes over the official's bf16 frozen scale under
  torch.autocast (transformers/models/t5/modeling_t5.py:65-72): the variance and the normalisation in float32,
  the normalised x rounded to the compute dtype, then multiplied by the rounded scale in that dtype."""
  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  autocast: bool = False

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), jnp.float32)
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    if self.autocast:
      return y.astype(self.dtype) * scale.astype(self.dtype)
    return (y * scale).astype(self.dtype)


def relative_position_bucket(relative_position, bidirectional, num_buckets, max_distance):
  """T5's bucketing of (key position - query position): exact below num_buckets/2, log-spaced above.

  Bidirectional buckets split the range in halves for keys after / before the query.
  """
  bucket = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    bucket += (relative_position > 0).astype(jnp.int32) * num_buckets
    distance = jnp.abs(relative_position)
  else:
    distance = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
  large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return bucket + jnp.where(distance < max_exact, distance, large)


def position_bias(table, query_positions, key_positions, *, bidirectional, max_distance, dtype):
  """table <f32>[h, num_buckets], query_positions <int>[q] (or [b, q]: each row's own, as a decoding cache's),
  key_positions <int>[k] -> bias <dtype>[1, h, q, k] (or [b, h, q, k])."""
  buckets = relative_position_bucket(key_positions[..., None, :] - query_positions[..., :, None], bidirectional,
                                     table.shape[1], max_distance)
  bias = jnp.moveaxis(jnp.take(table, buckets, axis=1), 0, -3)
  return (bias if bias.ndim == 4 else bias[None]).astype(dtype)


class RelativePositionBiases(nn.Module):
  """Per-head learned bias for each relative-position bucket; one table per stack, shared by its layers.

  Returns `position_bias_fn(query_positions, key_positions)`, a pure function of the table (no module inside),
  so the layers may call it under `nn.scan`."""
  num_buckets: int
  max_distance: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, bidirectional) -> Callable:
    table = self.param("rel_embedding",
                       nn.with_logical_partitioning(nn.initializers.normal(1.0), ("heads", "relpos_buckets")),
                       (self.num_heads, self.num_buckets), jnp.float32)
    return functools.partial(position_bias, table, bidirectional=bidirectional, max_distance=self.max_distance,
                             dtype=self.dtype)


def dot_product_attention(query, key, value, bias, dropout, deterministic, autocast=False):
  """softmax(q k^T + bias) v, no 1/sqrt(d) scaling (T5 folds it into the query init).

  query <float>[b, q, h, d], key/value [b, k, h, d], bias [b or 1, h, q, k] -> [b, q, h, d]. With `autocast`,
  q k^T + bias is rounded to the query's dtype before the float32 softmax, as Hugging Face's T5 attention adds
  the bf16 bias to the bf16 scores under torch.autocast (`scores += position_bias_masked` then
  `softmax(scores.float()).type_as(scores)` in the 4.x `T5Attention.forward` of the official runs; the same
  roundings in transformers/models/t5/modeling_t5.py:159-170, `eager_attention_forward`, of 5.x).
  """
  logits = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32) + bias.astype(jnp.float32)
  if autocast:
    logits = logits.astype(query.dtype).astype(jnp.float32)
  weights = jax.nn.softmax(logits, axis=-1).astype(query.dtype)
  weights = dropout(weights, deterministic=deterministic)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, value)


# The logical axes of each decoding cache variable (a scanned stack's carry a leading 'layers' axis too).
CACHE_AXES = {**dict.fromkeys(("cached_key", "cached_value", "cross_key", "cross_value"),
                              ("batch", "length", "heads", "kv")),
              "cache_index": ("batch",)}


class MultiHeadAttention(nn.Module):
  """Multi-head attention whose q, k, v, o projections are `dense` layers.

  In `decode` mode keys and values come from the `cache` collection. Self-attention (`cross` False) writes
  each step's at its row's position: `cached_key`, `cached_value` <float>[b, max_len, h, d] and
  `cache_index` <int32>[b], the next position of each row (rows may be at different positions, as the
  server's decoding slots are). Cross-attention (`cross` True) projects the encoder output once, when the cache
  is made, into `cross_key`, `cross_value` <float>[b, L_in, h, d], and reads them at every step.
  """
  config: T5Config
  dense: Callable = Dense
  cross: bool = False

  def _project(self, name, x, expert_weights):
    cfg = self.config
    dense = self.dense(features=cfg.joined_kv, kernel_axes=("embed", "joined_kv"), dtype=cfg.dtype, name=name,
                       kernel_init=nn.initializers.normal((cfg.d_model * (cfg.d_kv if name == "query" else 1)) ** -0.5))
    y = dense(x, expert_weights)
    return y.reshape(*y.shape[:-1], cfg.num_heads, cfg.d_kv)

  def _cache_variables(self, key):
    """The cache collection's variables, created zero-filled (every row at index 0) with the shape of `key`."""
    cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, key.shape, key.dtype)
    cache_index = self.variable("cache", "cache_index", jnp.zeros, key.shape[:1], jnp.int32)
    return cached_key, cached_value, cache_index

  def _update_cache(self, key, value):
    """Write this step's key/value at each row's cache index; returns the full cached keys/values and the
    indices <int32>[b]."""
    cached_key, cached_value, cache_index = self._cache_variables(key)
    index = cache_index.value
    write = jax.vmap(lambda cached, x, i: jax.lax.dynamic_update_slice(cached, x.astype(cached.dtype), (i, 0, 0)))
    cached_key.value = write(cached_key.value, key, index)
    cached_value.value = write(cached_value.value, value, index)
    cache_index.value = index + key.shape[1]
    return cached_key.value, cached_value.value, index

  def _cross_cache(self, inputs_kv, expert_weights):
    """Cross-attention keys and values in decode mode: projected once from the encoder output, read after."""
    if self.has_variable("cache", "cross_key"):
      return self.get_variable("cache", "cross_key"), self.get_variable("cache", "cross_value")
    key, value = self._project("key", inputs_kv, expert_weights), self._project("value", inputs_kv, expert_weights)
    self.put_variable("cache", "cross_key", key)
    self.put_variable("cache", "cross_value", value)
    return key, value

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, bias, *, deterministic=True, decode=False, position_bias_fn=None,
               expert_weights=None):
    """inputs_q <float>[b, q, m], inputs_kv [b, k, m], bias (mask) [b, 1, q, k] or None.

    `position_bias_fn(query_positions, key_positions)` adds relative-position biases (self-attention).
    """
    cfg = self.config
    query = self._project("query", inputs_q, expert_weights)
    if decode and self.cross:
      key, value = self._cross_cache(inputs_kv, expert_weights)
    else:
      key, value = self._project("key", inputs_kv, expert_weights), self._project("value", inputs_kv, expert_weights)
    query_positions = jnp.arange(query.shape[1])
    key_positions = jnp.arange(key.shape[1])
    if decode and not self.cross:
      if self.has_variable("cache", "cached_key"):
        key, value, index = self._update_cache(key, value)
        query_positions = index[:, None] + query_positions  # [b, q]
        key_positions = jnp.arange(key.shape[1])
        bias = jnp.where(key_positions <= query_positions[..., None], 0.0, NEG_INF)[:, None]
      else:
        self._cache_variables(key)
    total_bias = jnp.zeros((1, 1, 1, 1), jnp.float32) if bias is None else bias
    if position_bias_fn is not None:
      total_bias = total_bias + position_bias_fn(query_positions, key_positions)
    dropout = nn.Dropout(cfg.dropout_rate)
    out = dot_product_attention(query, key, value, total_bias, dropout, deterministic, cfg.autocast)
    out = out.reshape(*out.shape[:2], cfg.joined_kv)
    out = nn.with_logical_constraint(out, ("batch", "length", "joined_kv"))
    return self.dense(features=cfg.d_model, kernel_axes=("joined_kv", "embed"), dtype=cfg.dtype, name="out",
                      kernel_init=nn.initializers.normal(cfg.joined_kv ** -0.5))(out, expert_weights)


class MlpBlock(nn.Module):
  """Gated-GELU feed-forward: wo(dropout(gelu(wi_0 x) * wi_1 x)).

  With `config.autocast`, gelu(wi_0 x) * wi_1 x and its dropout in float32 from the bf16 projections, rounded
  once by `wo`: torch.autocast on CUDA runs the `pow` of Hugging Face's tanh GELU (`NewGELUActivation`) in
  float32, so the product is float32 until `T5DenseGatedActDense` casts it to `wo`'s dtype after the dropout."""
  config: T5Config
  dense: Callable = Dense

  @nn.compact
  def __call__(self, x, *, deterministic=True, expert_weights=None):
    cfg = self.config
    init_in = nn.initializers.normal(cfg.d_model ** -0.5)
    wi = lambda name: self.dense(features=cfg.d_ff, kernel_axes=("embed", "mlp"), kernel_init=init_in,  # noqa: E731
                                 dtype=cfg.dtype, name=name)(x, expert_weights)
    gate, linear = wi("wi_0"), wi("wi_1")
    if cfg.autocast:
      gate, linear = gate.astype(jnp.float32), linear.astype(jnp.float32)
    hidden = nn.gelu(gate, approximate=True) * linear
    hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
    hidden = nn.Dropout(cfg.dropout_rate)(hidden, deterministic=deterministic)
    return self.dense(features=cfg.d_model, kernel_axes=("mlp", "embed"), dtype=cfg.dtype, name="wo",
                      kernel_init=nn.initializers.normal(cfg.d_ff ** -0.5))(hidden, expert_weights)


class Embed(nn.Module):
  """Token embedding table <f32>[vocab, m] (t5x `token_embedder/embedding`)."""
  num_embeddings: int
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    table = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
                       (self.num_embeddings, self.features), jnp.float32)
    return jnp.take(table, tokens, axis=0).astype(self.dtype)


def attention_mask(query_valid, key_valid) -> jax.Array:
  """Additive mask [b, 1, q, k]: 0 where both positions are valid, -1e10 elsewhere."""
  valid = query_valid[:, None, :, None] & key_valid[:, None, None, :]
  return jnp.where(valid, 0.0, NEG_INF).astype(jnp.float32)


def causal_mask(length: int) -> jax.Array:
  """Additive [1, 1, q, k] mask forbidding keys after the query."""
  idx = jnp.arange(length)
  return jnp.where(idx[None, :] <= idx[:, None], 0.0, NEG_INF)[None, None]

