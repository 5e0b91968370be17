"""The encoder-decoder model behind t5x's `BaseModel` contract: init, loss, scoring and decoding (greedy
and sampled).

Variables are a dict of collections (`params`, and `lora` / `gates` / `experts` when experts are on).
Batches follow t5x's feature names: `encoder_input_tokens`, `decoder_input_tokens`,
`decoder_target_tokens`, optional `decoder_loss_weights` (all <int32>[b, L]).
"""
import functools
from typing import Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import seqio

from phatgoose_jax.t5.config import T5Config
from phatgoose_jax.experts.config import ExpertConfig
from phatgoose_jax.experts import sharded
from phatgoose_jax.experts.lora import ExpertDense
from phatgoose_jax.t5 import layers, layout
from phatgoose_jax.t5.network import Transformer

PAD_ID = 0
EOS_ID = 1
VARIABLE_COLLECTIONS = ("params", "lora", "gates", "experts")


def new_tokens(max_length: int) -> int:
  """The tokens greedy generation adds for the paper's generation length `max_length` (a task's official
  `max_gen_length`): Hugging Face `generate(max_length=L)` counts the decoder start token, so L - 1
  (src/models/interface_mixin.py:254-259)."""
  return max_length - 1


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


def greedy_step(logits: jax.Array) -> tuple:
  """The most likely next token of each row: <float32>[b, vocab] -> (argmax_v logits <int32>[b], its log p [b])."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  token = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
  return token, jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]


@jax.jit
def sample_step(logits: jax.Array, keys: jax.Array, steps: jax.Array, temperature: jax.Array,
                top_p: jax.Array) -> tuple:
  """The next token of each row, sampled with temperature and nucleus (top-p) filtering, or greedy.

  logits <float32>[b, vocab]; per row: keys <uint32>[b, 2], steps <int32>[b] (the row's decoding position),
  temperature >= 0 and top_p in (0, 1] <float32>[b]. Row i draws
    y ~ Categorical(q),  q_v = p_v 1[v in N] / sum_{u in N} p_u,  p = softmax(logits_i / T_i),
  where the nucleus N is the smallest set of most likely tokens whose mass sum_{u in N} p_u reaches top_p_i
  (a token is kept when the mass of the tokens more likely than it is below top_p_i), with the key
  fold_in(keys_i, steps_i); T_i = 0 is greedy, y = argmax_v logits_i (as is a top_p small enough that N holds
  one token). Returns (y <int32>[b], log p(y) <float32>[b] under the model's own distribution
  log_softmax(logits_i), whatever T and top_p, as `score_batch` scores it).
  """
  greedy, _ = greedy_step(logits)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  scaled = jax.nn.log_softmax(log_probs / jnp.where(temperature > 0, temperature, 1.0)[:, None], axis=-1)
  ordered = -jnp.sort(-scaled, axis=-1)
  mass_before = jnp.cumsum(jnp.exp(ordered), axis=-1) - jnp.exp(ordered)
  least_kept = jnp.min(jnp.where(mass_before < top_p[:, None], ordered, jnp.inf), axis=-1, keepdims=True)
  nucleus = jnp.where(scaled >= least_kept, scaled, -jnp.inf)
  row_keys = jax.vmap(jax.random.fold_in)(keys, steps)
  sampled = jax.vmap(jax.random.categorical)(row_keys, nucleus).astype(jnp.int32)
  token = jnp.where(temperature > 0, sampled, greedy)
  return token, jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]


def network(config: T5Config, experts: ExpertConfig = ExpertConfig()) -> Transformer:
  """The flax module: the T5 whose linear layers carry `experts` (plain dense layers when mode is 'none')."""
  dense = layers.Dense if experts.mode == "none" else functools.partial(ExpertDense, experts=experts,
                                                                        autocast=config.autocast)
  return Transformer(config, dense)


class EncoderDecoderModel:
  """A T5 v1.1 with optional experts behind t5x's `BaseModel` contract.

  `get_initial_variables`, `loss_fn`, `score_batch`, `predict_batch` and `predict_batch_with_aux` take
  t5x's arguments and feature names; where t5x passes `params` (the `params` collection) they take the
  variables dict of every collection the expert mode uses. A batch may carry `expert_weights`
  <float32>[batch, E]: a fixed per-example mixture of the routed experts (uniform, oracle, retrieval).
  Our trainer, evaluator and CLI all consume this one object; `phatgoose_jax.t5x_model` makes it a t5x
  model when t5x is installed.
  """
  FEATURE_CONVERTER_CLS = seqio.EncDecFeatureConverter

  def __init__(self, config: T5Config, experts: ExpertConfig = ExpertConfig(), length_normalize: bool = True):
    self.config = config
    self.experts = experts
    self.length_normalize = length_normalize
    self.module = network(config, experts)
    self._apply = sharded.mesh_jit(self.module.apply,
                                   static_argnames=("enable_dropout", "decode", "method", "mutable"))

  def get_initial_variables(self, rng: jax.Array, input_shapes: Optional[Mapping[str, tuple]] = None,
                            input_types=None) -> dict:
    """Fresh variables (boxed with logical axis metadata) for every collection the expert mode needs.

    `input_shapes` maps t5x feature names to shapes (default: one row of 8 tokens)."""
    del input_types
    shapes = dict(input_shapes or {})
    enc = jnp.ones(shapes.get("encoder_input_tokens", (1, 8)), jnp.int32)
    dec = jnp.ones(shapes.get("decoder_input_tokens", (1, 8)), jnp.int32)
    variables = self.module.init({"params": rng}, enc, dec, dec, mutable=list(VARIABLE_COLLECTIONS))
    return dict(flax.core.unfreeze(variables))

  def logits(self, variables, batch, dropout_rng=None, mutable=False):
    """Teacher-forced decoder logits <float32>[batch, target_length, vocab] (and the state of `mutable`)."""
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    return self._apply(variables, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                       batch["decoder_target_tokens"], enable_dropout=dropout_rng is not None,
                       expert_weights=batch.get("expert_weights"), rngs=rngs, mutable=mutable)

  def loss_fn(self, variables, batch, dropout_rng=None, num_groups: int = 1):
    """Token cross-entropy over non-pad targets (weights `decoder_loss_weights` if given), averaged per group of
    rows, then over the `num_groups` groups (row j in group j mod num_groups):

      loss = (1 / G) sum_g  sum_{t in g} w_t nll_t / sum_{t in g} w_t,

    the official loss of a batch split into G micro-batches: each micro-batch's token mean divided by the
    accumulation factor (src/procedures/trainer.py:145-151). One group weights every target token equally.
    """
    logits = self.logits(variables, batch, dropout_rng)
    targets = batch["decoder_target_tokens"]
    weights = batch.get("decoder_loss_weights", targets > 0).astype(jnp.float32)
    nll = -token_log_likelihoods(logits, targets)
    group_sums = lambda x: jnp.sum(x.reshape(-1, num_groups, x.shape[-1]), axis=(0, 2))  # noqa: E731
    loss = jnp.mean(group_sums(nll * weights) / jnp.maximum(group_sums(weights), 1.0))
    num_tokens = jnp.maximum(jnp.sum(weights), 1.0)
    accuracy = jnp.sum((jnp.argmax(logits, -1) == targets) * weights) / num_tokens
    return loss, {"loss": loss, "accuracy": accuracy, "num_tokens": jnp.sum(weights)}

  def score_batch(self, variables, batch, return_intermediates: bool = False):
    """Per-example target log-likelihood <float32>[batch] (algorithm.md §6).

    score = sum_t log p(y_t | x, y_<t) over non-pad targets, divided by their number when
    `length_normalize` (rank classification's length-normalised score). With `return_intermediates`,
    returns (score, {"sum_logprob", "mean_logprob", "num_target_tokens", "intermediates"}), the last being
    the sown `intermediates` collection (routing choices of a routed model) in the per-layer layout.
    """
    targets = batch["decoder_target_tokens"]
    logits, state = self.logits(variables, batch, mutable=("intermediates",))
    mask = (targets > 0).astype(jnp.float32)
    total = jnp.sum(token_log_likelihoods(logits, targets) * mask, axis=-1)
    count = jnp.sum(mask, axis=-1)
    mean = total / jnp.maximum(count, 1.0)
    score = mean if self.length_normalize else total
    if not return_intermediates:
      return score
    intermediates = layout.unstack_layers({"i": state.get("intermediates", {})}, self.config)["i"]
    return score, {"sum_logprob": total, "mean_logprob": mean, "num_target_tokens": count,
                   "intermediates": intermediates}

  def encode(self, variables, encoder_tokens, expert_weights=None):
    return self._apply(variables, encoder_tokens, expert_weights=expert_weights, method=Transformer.encode)

  def decode_step(self, variables, cache, encoded, encoder_tokens, tokens, expert_weights=None):
    """One cached decoder step: tokens <int32>[batch, 1] -> (logits <float32>[batch, 1, vocab], new cache)."""
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

  def decode_with_aux(self, variables, batch, choose, eos_id: int = EOS_ID):
    """Cached decoding, one token per row and step, until every row is done or the cache is full.

    `choose(logits <float32>[batch, vocab], t) -> (tokens <int32>[batch], log p(token) <float32>[batch])` picks
    step t's tokens. The cache holds `decoder_input_tokens`' positions; row i is done after EOS or after
    `decode_lengths[i]` tokens (optional <int32>[batch]; rows of length 0 never decode). Returns (tokens
    <int32>[batch, max_decode_length], zero after EOS, {"scores": <float32>[batch] the sum of the chosen tokens'
    log-probabilities, "token_scores": <float32>[batch, max_decode_length] each one, zero after EOS}).
    """
    encoder_tokens = batch["encoder_input_tokens"]
    expert_weights = batch.get("expert_weights")
    rows, max_decode_length = batch["decoder_input_tokens"].shape
    limits = batch.get("decode_lengths", jnp.full((rows,), max_decode_length, jnp.int32))
    encoded = self.encode(variables, encoder_tokens, expert_weights)
    cache = self.init_cache(variables, encoded, encoder_tokens, max_decode_length, expert_weights)

    def step(carry):
      t, cache, token, done, tokens, scores = carry
      logits, cache = self.decode_step(variables, cache, encoded, encoder_tokens, token[:, None], expert_weights)
      token, score = choose(logits[:, -1], t)
      token = jnp.where(done, PAD_ID, token)
      tokens = tokens.at[:, t].set(token)
      scores = scores.at[:, t].set(jnp.where(done, 0.0, score))
      return t + 1, cache, token, done | (token == eos_id) | (t + 1 >= limits), tokens, scores

    def running(carry):
      return (carry[0] < max_decode_length) & ~jnp.all(carry[3])

    init = (0, cache, jnp.zeros((rows,), jnp.int32), limits <= 0, jnp.zeros((rows, max_decode_length), jnp.int32),
            jnp.zeros((rows, max_decode_length), jnp.float32))
    *_, tokens, scores = jax.lax.while_loop(running, step, init)
    return tokens, {"scores": jnp.sum(scores, axis=1), "token_scores": scores}

  def predict_batch_with_aux(self, variables, batch, rng=None, eos_id: int = EOS_ID):
    """Greedy decoding with a KV cache, t5x style: as many steps as `decoder_input_tokens` has positions.

    Returns (tokens <int32>[batch, max_decode_length], zero after EOS; {"scores": <float32>[batch]} the
    sum of the chosen tokens' log-probabilities).
    """
    del rng
    tokens, aux = self.decode_with_aux(variables, batch, lambda logits, t: greedy_step(logits), eos_id)
    return tokens, {"scores": aux["scores"]}

  def sample_batch_with_aux(self, variables, batch, eos_id: int = EOS_ID):
    """Decoding in which each row draws its tokens with `sample_step`: the batch carries, per row,
    `decode_rng` <uint32>[batch, 2] (its key), `temperature` and `top_p` <float32>[batch], and optionally
    `decode_lengths`. Step t of row i uses the key fold_in(decode_rng[i], t), so a row's tokens depend on
    its own input and key only. Returns what `decode_with_aux` does."""
    steps = jnp.ones(batch["encoder_input_tokens"].shape[:1], jnp.int32)
    choose = lambda logits, t: sample_step(logits, batch["decode_rng"], steps * t, batch["temperature"],
                                           batch["top_p"])
    return self.decode_with_aux(variables, batch, choose, eos_id)

  def predict_batch(self, variables, batch, rng=None) -> jax.Array:
    """Greedy decodings <int32>[batch, max_decode_length] (see `predict_batch_with_aux`)."""
    return self.predict_batch_with_aux(variables, batch, rng)[0]

  @property
  def jit_score(self):
    """`score_batch`, compiled once per model configuration: equal models share the compiled code."""
    return functools.partial(_jit_score, self)

  @property
  def jit_predict(self):
    """`predict_batch_with_aux`, compiled once per model configuration."""
    return functools.partial(_jit_predict, self)

  @property
  def jit_sample(self):
    """`sample_batch_with_aux`, compiled once per model configuration."""
    return functools.partial(_jit_sample, self)

  def _key(self) -> tuple:
    return type(self), self.config, self.experts, self.length_normalize

  def __eq__(self, other) -> bool:
    """Models of one configuration compute the same function of (variables, batch)."""
    return isinstance(other, EncoderDecoderModel) and self._key() == other._key()

  def __hash__(self) -> int:
    return hash(self._key())


@sharded.mesh_jit(static_argnames=("model", "return_intermediates"))
def _jit_score(model: EncoderDecoderModel, variables, batch, return_intermediates: bool = False):
  return model.score_batch(variables, batch, return_intermediates)


@sharded.mesh_jit(static_argnames=("model",))
def _jit_predict(model: EncoderDecoderModel, variables, batch):
  return model.predict_batch_with_aux(variables, batch)


@sharded.mesh_jit(static_argnames=("model",))
def _jit_sample(model: EncoderDecoderModel, variables, batch):
  return model.sample_batch_with_aux(variables, batch)


def unbox(variables: dict) -> dict:
  """Plain arrays from a (possibly) logically-boxed variables tree."""
  return nn.meta.unbox(variables)


def num_parameters(tree: Optional[dict]) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree or {})))
