"""The T5 v1.1 encoder-decoder whose parameter tree is t5x's (`encoder/layers_0/attention/query/kernel`,
`decoder/layers_0/encoder_decoder_attention/...`, `token_embedder/embedding`, `decoder/logits_dense/kernel`).

Inputs follow t5x: `encoder_input_tokens` <int>[b, L_in], `decoder_input_tokens` <int>[b, L_out] (targets
shifted right, starting from pad 0) and `decoder_target_tokens` [b, L_out] (0 = pad, used for masks).
Every linear layer is built by the injected `dense` factory (default `layers.Dense`); `expert_weights`
<float>[b, E] is passed through to it untouched (the expert layer uses it for fixed per-example mixtures).

With `config.scan_layers` each stack runs its layers under `nn.scan` (t5x's and flaxformer's `scan_layers`):
one layer body is compiled per stack, and every collection holds `encoder/layers/...` with a leading
`layers` axis instead of `encoder/layers_{i}/...` (checkpoints/layout.py converts; checkpoints keep t5x's
per-layer names on disk).

With `config.remat_policy` each layer is rematerialised in the backward pass (`nn.remat`, flaxformer's and
MaxText's `remat_policy`): 'full' keeps only the layer's input, 'minimal' also its matmul outputs
(`dots_with_no_batch_dims_saveable`), 'none' every activation.
"""
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from phatgoose_jax.t5 import layers
from phatgoose_jax.t5.config import T5Config


def pre_norm_residual(cfg: T5Config, norm_name: str, x, sublayer, deterministic):
  """x + dropout(sublayer(RMSNorm(x))): T5's pre-norm residual sub-layer (call inside a compact module)."""
  h = layers.RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, cfg.autocast, name=norm_name)(x)
  return x + nn.Dropout(cfg.dropout_rate)(sublayer(h), deterministic=deterministic)


class EncoderLayer(nn.Module):
  config: T5Config
  dense: Callable

  @nn.compact
  def __call__(self, x, mask, position_bias_fn, deterministic, expert_weights):
    cfg, dense = self.config, self.dense
    attention = layers.MultiHeadAttention(cfg, dense, name="attention")
    x = pre_norm_residual(cfg, "pre_attention_layer_norm", x, lambda h: attention(
        h, h, mask, deterministic=deterministic, position_bias_fn=position_bias_fn, expert_weights=expert_weights),
        deterministic)
    mlp = layers.MlpBlock(cfg, dense, name="mlp")
    x = pre_norm_residual(cfg, "pre_mlp_layer_norm", x, lambda h: mlp(
        h, deterministic=deterministic, expert_weights=expert_weights), deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
  config: T5Config
  dense: Callable

  @nn.compact
  def __call__(self, y, encoded, self_mask, cross_mask, position_bias_fn, deterministic, decode, expert_weights):
    cfg, dense = self.config, self.dense
    self_attention = layers.MultiHeadAttention(cfg, dense, name="self_attention")
    y = pre_norm_residual(cfg, "pre_self_attention_layer_norm", y, lambda h: self_attention(
        h, h, self_mask, deterministic=deterministic, decode=decode, position_bias_fn=position_bias_fn,
        expert_weights=expert_weights), deterministic)
    cross_attention = layers.MultiHeadAttention(cfg, dense, cross=True, name="encoder_decoder_attention")
    y = pre_norm_residual(cfg, "pre_cross_attention_layer_norm", y, lambda h: cross_attention(
        h, encoded, cross_mask, deterministic=deterministic, decode=decode, expert_weights=expert_weights),
        deterministic)
    mlp = layers.MlpBlock(cfg, dense, name="mlp")
    y = pre_norm_residual(cfg, "pre_mlp_layer_norm", y, lambda h: mlp(
        h, deterministic=deterministic, expert_weights=expert_weights), deterministic)
    return nn.with_logical_constraint(y, ("batch", "length", "embed"))


REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def layer_class(cls, cfg: T5Config, static_argnums: tuple):
  """`cls`, or `cls` rematerialised under `cfg.remat_policy`; `static_argnums` (self = 0) are its non-array
  arguments."""
  if cfg.remat_policy == "none":
    return cls
  return nn.remat(cls, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers,
                  static_argnums=static_argnums)


def run_layers(make_layer: Callable, num_layers: int, scan: bool, x, *args):
  """x through `num_layers` layers `make_layer(name)` named `layers_{i}`, or through one layer named `layers`
  under `nn.scan`, its variables with a leading `layers` axis (call inside a compact module); `args` are shared
  by every layer."""
  if not scan:
    for i in range(num_layers):
      x = make_layer(f"layers_{i}")(x, *args)
    return x
  scanned = nn.scan(lambda module, carry, *shared: (module(carry, *shared), None), variable_axes={True: 0},
                    split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast,) * len(args),
                    length=num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
  return scanned(make_layer("layers"), x, *args)[0]


class Encoder(nn.Module):
  config: T5Config
  dense: Callable
  embedder: nn.Module

  @nn.compact
  def __call__(self, tokens, deterministic=True, expert_weights=None):
    """tokens <int>[b, L_in] -> encoded <float>[b, L_in, m]."""
    cfg = self.config
    relpos = layers.RelativePositionBiases(cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance,
                                           cfg.num_heads, cfg.dtype, name="relpos_bias")
    position_bias_fn = relpos(bidirectional=True)
    valid = tokens > 0
    mask = layers.attention_mask(valid, valid)
    drop = nn.Dropout(cfg.dropout_rate)
    x = drop(self.embedder(tokens), deterministic=deterministic)
    layer_cls = layer_class(EncoderLayer, cfg, static_argnums=(3, 4))  # position_bias_fn, deterministic
    layer = lambda name: layer_cls(cfg, self.dense, name=name)  # noqa: E731
    x = run_layers(layer, cfg.num_encoder_layers, cfg.scan_layers, x, mask, position_bias_fn, deterministic,
                   expert_weights)
    x = layers.RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, cfg.autocast, name="encoder_norm")(x)
    return drop(x, deterministic=deterministic)


class Decoder(nn.Module):
  config: T5Config
  dense: Callable
  embedder: nn.Module

  @nn.compact
  def __call__(self, encoded, encoder_tokens, decoder_input_tokens, decoder_target_tokens=None,
               deterministic=True, decode=False, expert_weights=None):
    """-> logits <float32>[b, L_out, vocab]. In `decode` mode, one step at a time against the cache."""
    cfg = self.config
    relpos = layers.RelativePositionBiases(cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance,
                                           cfg.num_heads, cfg.dtype, name="relpos_bias")
    position_bias_fn = relpos(bidirectional=False)
    targets = decoder_input_tokens if decoder_target_tokens is None else decoder_target_tokens
    query_valid = jnp.ones_like(targets, bool) if decode else targets > 0
    cross_mask = layers.attention_mask(query_valid, encoder_tokens > 0)
    self_mask = None if decode else layers.attention_mask(query_valid, query_valid) + layers.causal_mask(
        targets.shape[1])
    drop = nn.Dropout(cfg.dropout_rate)
    y = drop(self.embedder(decoder_input_tokens), deterministic=deterministic)
    layer_cls = layer_class(DecoderLayer, cfg, static_argnums=(5, 6, 7))  # position_bias_fn, deterministic, decode
    layer = lambda name: layer_cls(cfg, self.dense, name=name)  # noqa: E731
    y = run_layers(layer, cfg.num_decoder_layers, cfg.scan_layers, y, encoded, self_mask, cross_mask,
                   position_bias_fn, deterministic, decode, expert_weights)
    y = layers.RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, cfg.autocast, name="decoder_norm")(y)
    y = drop(y, deterministic=deterministic)
    logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.dtype, name="logits_dense",
                      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.d_model ** -0.5),
                                                               ("embed", "vocab")))(y)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))


class Transformer(nn.Module):
  """T5 v1.1 encoder-decoder with untied input embedding and output layer."""
  config: T5Config
  dense: Callable = layers.Dense

  def setup(self):
    cfg = self.config
    self.token_embedder = layers.Embed(cfg.vocab_size, cfg.d_model, cfg.dtype)
    self.encoder = Encoder(cfg, self.dense, self.token_embedder)
    self.decoder = Decoder(cfg, self.dense, self.token_embedder)

  def encode(self, encoder_input_tokens, enable_dropout=False, expert_weights=None):
    return self.encoder(encoder_input_tokens, not enable_dropout, expert_weights)

  def decode(self, encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens=None,
             enable_dropout=False, decode=False, expert_weights=None):
    return self.decoder(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                        not enable_dropout, decode, expert_weights)

  def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens=None, enable_dropout=False,
               decode=False, expert_weights=None):
    encoded = self.encode(encoder_input_tokens, enable_dropout, expert_weights)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens, enable_dropout,
                       decode, expert_weights)
