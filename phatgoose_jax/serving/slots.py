"""Iteration-level decoding: `slots` sequences of one model, each with its own rows of the KV cache, joining
and leaving between decoder steps.

The device state holds, per slot: the decoder cache (`EncoderDecoderModel.init_cache`: self-attention keys and
values `max_new_tokens` long at the row's own `cache_index`, cross-attention keys and values `max_input` long),
the prompt's tokens (the cross-attention mask), the last token, the step, the sampling key, temperature and
top-p (`models.sample_step`), and the row's routing inputs (`expert_weights`: a fixed mixture or a
`routing.RowRouting`). `admit` encodes the joining prompts in one batch and writes their caches into free
slots; `step` runs one decoder step of every slot and hands back the sequences it finished. A step attends over
the first bucket(longest live sequence) cache positions and bucket(longest live prompt) encoder positions, so
it costs what the live sequences need. Programs are compiled once per bucket: (joining rows, prompt length)
for `admit`, (cache window, encoder window) for `step` (`warm_up` compiles them all).

Row i's step t draws with fold_in(key_i, t) from its own logits, as `TextModel.generate` does, so a
sequence's tokens do not depend on the slots beside it or on when it joined.
"""
import dataclasses
import functools
import itertools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from phatgoose_jax import text_model
from phatgoose_jax.experts import sharded
from phatgoose_jax.models import EOS_ID, sample_step

SELF_KV, CROSS_KV = ("cached_key", "cached_value"), ("cross_key", "cross_value")


@dataclasses.dataclass
class Sequence:
  """One sequence to decode: its prompt, settings and routing inputs (numpy, no batch axis, or None), and
  `done(result)`, told of its result."""
  prompt_ids: list
  max_new_tokens: int
  temperature: float
  top_p: float
  key: np.ndarray  # <uint32>[2]
  stop: list
  route: Any
  done: Callable[[dict], None]
  cancelled: Callable[[], bool] = lambda: False
  steps: int = 0
  token_ids: list = dataclasses.field(default_factory=list)
  logprobs: list = dataclasses.field(default_factory=list)


def _leaves(cache) -> dict:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(cache))


def _slot_index(leaf, slots):
  """The index of `slots` along the slot axis of a cache leaf ([..., b, L, h, d] keys and values, [..., b]
  indices: a leading axis under nn.scan)."""
  axis = leaf.ndim - (1 if leaf.ndim < 4 else 4)
  return (slice(None),) * axis + (slots,)


def _window(cache: dict, cache_window: int, input_window: int) -> dict:
  """The cache's first `cache_window` self-attention and `input_window` cross-attention positions."""
  def cut(path, leaf):
    if path[-1] in SELF_KV + CROSS_KV:
      length = cache_window if path[-1] in SELF_KV else input_window
      return jax.lax.slice_in_dim(leaf, 0, length, axis=leaf.ndim - 3)
    return leaf
  return {p: cut(p, x) for p, x in cache.items()}


def _put_window(full: dict, window: dict) -> dict:
  return {p: jax.lax.dynamic_update_slice(x, window[p].astype(x.dtype), (0,) * x.ndim) for p, x in full.items()}


class SlotDecoder:
  """Iteration-level decoding of `model` (a `text_model.TextModel`) in `slots` slots; `max_input`: the longest
  prompt, `max_new_tokens`: the most tokens a sequence decodes; `route_example`: one row's routing inputs
  (their shapes and dtypes), None for a model without per-row inputs or whose `loaded.expert_weights` gives
  them from the prompt."""

  def __init__(self, model: text_model.TextModel, slots: int, max_input: int, max_new_tokens: int,
               route_example: Any = None):
    self.text_model, self.slots = model, slots
    self.max_input, self.max_new_tokens = text_model.bucket(max_input), max_new_tokens
    fixed = model.loaded.expert_weights  # a fixed per-example mixture (uniform): computed from the prompt
    self._route = (lambda s: s.route) if fixed is None else (
        lambda s: fixed({"encoder_input_tokens": text_model.pad([s.prompt_ids], 1)})[0])
    self.route_example = route_example if fixed is None else fixed({"encoder_input_tokens": np.ones((1, 8),
                                                                                                    np.int32)})[0]
    self.live = [None] * slots  # the Sequence in each slot
    self.state = None  # allocated while any slot is live

  @property
  def free(self) -> int:
    return self.live.count(None)

  def busy(self) -> bool:
    return self.free < self.slots

  # Device state.

  def _empty_state(self, variables) -> dict:
    model, size = self.text_model.model, self.slots
    tokens = jax.ShapeDtypeStruct((size, self.max_input), jnp.int32)
    route = text_model.stack_rows([self.route_example], size) if self.route_example is not None else None
    encoded = jax.eval_shape(model.encode, variables, tokens, route)
    cache = jax.eval_shape(lambda v, e, t: model.init_cache(v, e, t, self.max_new_tokens, route), variables,
                           encoded, tokens)
    zeros = lambda x: jnp.zeros(x.shape, x.dtype)  # noqa: E731
    state = {"cache": {p: zeros(x) for p, x in _leaves(cache).items()}, "enc_tokens": zeros(tokens),
             "token": jnp.zeros(size, jnp.int32), "step": jnp.zeros(size, jnp.int32),
             "keys": jnp.zeros((size, 2), jnp.uint32), "temperature": jnp.zeros(size, jnp.float32),
             "top_p": jnp.ones(size, jnp.float32), "route": None if route is None else jax.tree.map(zeros, route)}
    sharding = jax.tree.leaves(variables)[0].sharding
    if isinstance(sharding, jax.sharding.NamedSharding):  # as the programs give it back (`_compiled`)
      state = jax.device_put(state, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))
    return state

  # Sequences.

  def admit(self, sequences: list) -> None:
    """Start `sequences` (at most `free`) in free slots: one encoder pass for all of them."""
    if not sequences:
      return
    assert len(sequences) <= self.free, "more sequences than free slots"
    variables = self.text_model.variables
    if self.state is None:
      self.state = self._empty_state(variables)
    rows = 1 << (len(sequences) - 1).bit_length()
    slots = [i for i, s in enumerate(self.live) if s is None][:len(sequences)]
    for slot, sequence in zip(slots, sequences):
      self.live[slot] = sequence
    index = np.full(rows, self.slots, np.int32)  # padding rows write nowhere
    index[:len(slots)] = slots
    pad = lambda values, dtype: np.asarray(list(values) + [0] * (rows - len(slots)), dtype)  # noqa: E731
    route = None if self.route_example is None else text_model.stack_rows([self._route(s) for s in sequences], rows)
    admit, _ = programs(variables)
    self.state = admit(self.text_model.model, variables, self.state, index,
                        text_model.pad([s.prompt_ids for s in sequences], rows), route,
                        np.stack([s.key for s in sequences] + [np.zeros(2, np.uint32)] * (rows - len(slots))),
                        pad((s.temperature for s in sequences), np.float32),
                        pad((s.top_p for s in sequences), np.float32))

  def step(self) -> None:
    """One decoder step of every slot; sequences that end (EOS, their length, a stop string, cancelled) are
    told their result and leave their slots."""
    for slot, sequence in enumerate(self.live):
      if sequence is not None and sequence.cancelled():
        self.live[slot] = None
    live = [s for s in self.live if s is not None]
    if not live:
      self.state = None
      return
    windows = (text_model.bucket(max(s.steps for s in live) + 1),
               text_model.bucket(max(len(s.prompt_ids) for s in live)))
    _, step = programs(self.text_model.variables)
    self.state, tokens, logprobs = step(self.text_model.model, self.text_model.variables, self.state,
                                        *self._clip(*windows))
    tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
    for slot, sequence in enumerate(self.live):
      if sequence is not None and self._advance(sequence, int(tokens[slot]), float(logprobs[slot])):
        self.live[slot] = None
    if not self.busy():
      self.state = None

  def _clip(self, cache_window: int, input_window: int) -> tuple:
    return min(cache_window, self.max_new_tokens), min(input_window, self.max_input)

  def _advance(self, sequence: Sequence, token: int, logprob: float) -> bool:
    """Append a step's token; when the sequence ends, tell it its result and return True."""
    model = self.text_model
    eos = token == EOS_ID
    sequence.steps += 1
    if token > 0 and not eos:  # pad ids are dropped, as `TextModel.generate` drops them
      sequence.token_ids.append(token)
      sequence.logprobs.append(logprob)
    ended = eos or sequence.steps >= sequence.max_new_tokens
    if not ended and sequence.stop and model.vocabulary is not None:
      ended = text_model.stop_cut(model.vocabulary, sequence.token_ids, sequence.stop) is not None
    if ended:
      sequence.done(model.decoded(sequence.token_ids, sequence.logprobs, eos, sequence.stop))
    return ended

  def warm_up(self) -> int:
    """Compile every bucket's programs (run on an all-padding state); returns how many were run."""
    variables, count = self.text_model.variables, 0
    state, (admit, step) = self._empty_state(variables), programs(variables)
    row_buckets = [b for b in (1 << i for i in range(16)) if b <= self.slots]
    row_buckets += [] if row_buckets[-1] == self.slots else [1 << (self.slots - 1).bit_length()]
    route = lambda rows: (text_model.stack_rows([self.route_example], rows)  # noqa: E731
                          if self.route_example is not None else None)
    for rows, length in itertools.product(row_buckets, text_model.buckets(self.max_input)):
      state = admit(self.text_model.model, variables, state, np.full(rows, self.slots, np.int32),
                     np.zeros((rows, length), np.int32), route(rows), np.zeros((rows, 2), np.uint32),
                     np.zeros(rows, np.float32), np.ones(rows, np.float32))
      count += 1
    pairs = itertools.product(text_model.buckets(self.max_new_tokens), text_model.buckets(self.max_input))
    for cache_window, input_window in pairs:
      state, *_ = step(self.text_model.model, variables, state, cache_window, input_window)
      count += 1
    jax.block_until_ready(state)
    return count


def _admit(model, variables, state, slots, prompts, route, keys, temperature, top_p):
  """Encode `prompts` and write their cross-attention caches, a zero position and their settings into `slots`
  (index = number of slots: a padding row, dropped)."""
  encoded = model.encode(variables, prompts, route)
  made = _leaves(model.init_cache(variables, encoded, prompts, 1, route))
  cache = dict(state["cache"])
  for path, leaf in made.items():
    if path[-1] in SELF_KV:
      continue  # a new row's stale keys sit beyond its position, masked until overwritten
    if path[-1] in CROSS_KV:
      width = [(0, 0)] * leaf.ndim
      width[leaf.ndim - 3] = (0, cache[path].shape[leaf.ndim - 3] - leaf.shape[leaf.ndim - 3])
      leaf = jnp.pad(leaf, width)
    cache[path] = cache[path].at[_slot_index(cache[path], slots)].set(leaf.astype(cache[path].dtype), mode="drop")
  put = lambda full, rows: full.at[slots].set(rows.astype(full.dtype), mode="drop")  # noqa: E731
  zeros = jnp.zeros(slots.shape, jnp.int32)
  tokens = jnp.pad(prompts, ((0, 0), (0, state["enc_tokens"].shape[1] - prompts.shape[1])))
  return {"cache": cache, "enc_tokens": put(state["enc_tokens"], tokens), "token": put(state["token"], zeros),
          "step": put(state["step"], zeros), "keys": put(state["keys"], keys),
          "temperature": put(state["temperature"], temperature), "top_p": put(state["top_p"], top_p),
          "route": None if route is None else jax.tree.map(put, state["route"], route)}


def _step(model, variables, state, cache_window, input_window):
  """One decoder step of every slot within the windows: (the new state, each slot's token and log p)."""
  window = _window(state["cache"], cache_window, input_window)
  logits, window = model.decode_step(variables, flax.traverse_util.unflatten_dict(window), None,
                                     state["enc_tokens"][:, :input_window], state["token"][:, None], state["route"])
  token, logprob = sample_step(logits[:, -1], state["keys"], state["step"], state["temperature"], state["top_p"])
  cache = _put_window(state["cache"], _leaves(window))
  return dict(state, cache=cache, token=token, step=state["step"] + 1), token, logprob


@functools.lru_cache(maxsize=None)
def _compiled(mesh) -> tuple:
  """(admit, step) jitted with every output replicated on `mesh` (None: placed as XLA places them), so that the
  state a program gives back is laid out as a fresh one: no layout of the state compiles a second program."""
  out = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return (sharded.mesh_jit(_admit, static_argnames=("model",), donate_argnames=("state",), out_shardings=out),
          sharded.mesh_jit(_step, static_argnames=("model", "cache_window", "input_window"),
                           donate_argnames=("state",), out_shardings=out))


def programs(variables) -> tuple:
  """(admit, step) for a model whose variables are `variables` (on a mesh or one device)."""
  sharding = jax.tree.leaves(variables)[0].sharding
  return _compiled(sharding.mesh if isinstance(sharding, jax.sharding.NamedSharding) else None)
