"""Our T5 with experts as a t5x model, so that t5x's own `train.py`, `eval.py` and `infer.py` drive it.

t5x trains one tree, `params`, and hands every other collection to the model as frozen `flax_mutables`.
Our expert state lives in collections of its own (`lora`, `gates`, `experts`; phatgoose_jax/experts/lora.py).
Under t5x each of them becomes a top-level sub-tree of `params` beside the base:

  params/encoder/...  params/decoder/...  params/token_embedder/...   the base, t5x's T5 1.1 tree unchanged
  params/lora/<module path>/lora_a, lora_b                             one expert           (algorithm.md §2)
  params/gates/<module path>/gate                                      its gate             (algorithm.md §3)
  params/experts/<module path>/lora_a, lora_b, router                  E routed experts     (algorithm.md §4)

`T5xNetwork` moves them between the two layouts with `nn.map_variables`, so the flax module itself is
untouched. A stock t5x checkpoint of the base restores as it is: the gin files' `RestoreCheckpointConfig` skips
the sub-trees it lacks (`assignment_map` to None) and fills them from their initialisers
(`fallback_to_scratch`). `train_only(('lora',), optimizer)` trains one sub-tree with everything else frozen:
"expert stage" and "gate stage" are a choice of sub-tree in gin (gin/t5x/lora_expert.gin, gin/t5x/gate.gin).
Logical axis names travel to t5x's `PjitPartitioner` as its `params_axes` collection.
"""
from typing import Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.linen import partitioning as flax_partitioning
from t5x import models as t5x_models
from t5x import optimizers as t5x_optimizers

from phatgoose_jax import assembly, checkpoints, models, routers
from phatgoose_jax.experts.config import ExpertConfig
from phatgoose_jax.library import ExpertLibrary
from phatgoose_jax.library import base_fingerprint as lib_fingerprint
from phatgoose_jax.t5.config import T5Config
from phatgoose_jax.t5.network import Transformer

EXPERT_COLLECTIONS = tuple(c for c in models.VARIABLE_COLLECTIONS if c != "params")  # lora, gates, experts


def collections_from_params(variables: dict) -> dict:
  """t5x layout -> ours: the `lora` / `gates` / `experts` sub-trees of `params` become collections."""
  params = dict(variables.get("params", {}))
  experts = {c: params.pop(c, {}) for c in EXPERT_COLLECTIONS}
  return {"params": params, **experts}


def params_from_collections(variables: dict) -> dict:
  """Ours -> t5x layout: non-empty expert collections become sub-trees of `params` (inverse of the above)."""
  params = dict(variables.get("params", {}))
  params.update({c: variables[c] for c in EXPERT_COLLECTIONS if variables.get(c)})
  return {"params": params, **{c: {} for c in EXPERT_COLLECTIONS}}


def _check_unpacked(*segment_ids):
  if any(s is not None for s in segment_ids):
    raise ValueError("packed examples are not supported by this T5 (no segment-aware attention): set "
                     "utils.DatasetConfig.pack = False in the run's gin file")


class _T5xConvention(Transformer):
  """`Transformer` taking the keyword arguments t5x's `EncoderDecoderModel` passes.

  Positions are implied by unpacked rows, so `*_positions` are ignored; the decoder cache has the length
  it was created with, so `max_decode_length` is too.
  """

  def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens=None, enable_dropout=False,
               decode=False, expert_weights=None, encoder_segment_ids=None, decoder_segment_ids=None,
               encoder_positions=None, decoder_positions=None):
    del encoder_positions, decoder_positions
    _check_unpacked(encoder_segment_ids, decoder_segment_ids)
    return super().__call__(encoder_input_tokens, decoder_input_tokens, decoder_target_tokens, enable_dropout,
                            decode, expert_weights)

  def decode(self, encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens=None,
             enable_dropout=False, decode=False, expert_weights=None, max_decode_length=None):
    del max_decode_length
    return super().decode(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                          enable_dropout, decode, expert_weights)


# Our `Transformer` with t5x's call convention and its expert collections inside `params`.
T5xNetwork = nn.map_variables(_T5xConvention, models.VARIABLE_COLLECTIONS, trans_in_fn=collections_from_params,
                              trans_out_fn=params_from_collections, mutable=True,
                              methods=["__call__", "encode", "decode"])


def t5x_network(config: T5Config, experts: ExpertConfig) -> nn.Module:
  """`models.network(config, experts)` (the same layers, the same dense factory) as a `T5xNetwork`."""
  network = models.network(config, experts)
  return T5xNetwork(network.config, network.dense)


def params_axes(boxed_params) -> dict:
  """t5x's `params_axes` collection from logically boxed params: `<path>/kernel` -> `<path>/kernel_axes`."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(boxed_params), is_leaf=lambda _, v: isinstance(
      v, nn.Partitioned))
  return flax.traverse_util.unflatten_dict({
      (*path[:-1], f"{path[-1]}_axes"): flax_partitioning.AxisMetadata(names=tuple(leaf.names))
      for path, leaf in flat.items()})


def mismatched_shapes(expected: dict, given: dict) -> list:
  """'path: expected shape vs given shape' (or 'missing' / 'unexpected') for every leaf that differs."""
  want = {"/".join(k): jnp.shape(v) for k, v in flax.traverse_util.flatten_dict(expected).items()}
  have = {"/".join(k): jnp.shape(v) for k, v in flax.traverse_util.flatten_dict(given).items()}
  return [f"{k}: configured {want.get(k, 'missing')} vs given {have.get(k, 'missing')}"
          for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]


class T5xEncoderDecoderModel(t5x_models.EncoderDecoderModel):
  """t5x's `EncoderDecoderModel` around `T5xNetwork`: t5x's loss, scoring and decoding on our T5.

  Args:
    config: the base T5 (gin binds its fields; a checkpoint supplies only weights).
    experts: the expert mode ('none', 'lora', 'gated' or 'routed'; phatgoose_jax/experts/config.py).
    routing: experts built by a router from a library (`library_routing`); it fixes the expert mode and
      supplies the initial `experts` (or merged `lora`) sub-tree. Bind `experts` or `routing`, not both.
    length_normalize: `score_batch` returns the mean instead of the sum of target log-likelihoods.
    **kwargs: t5x's `EncoderDecoderModel` arguments (vocabularies, optimizer_def, decode_fn, z_loss, ...).
  """

  def __init__(self, config: T5Config, input_vocabulary, output_vocabulary, optimizer_def,
               experts: Optional[ExpertConfig] = None, routing: Optional[routers.Routing] = None,
               length_normalize: bool = False, **kwargs):
    if routing is not None and experts is not None:
      raise ValueError("bind either T5xEncoderDecoderModel.experts or .routing (which sets the expert mode), "
                       "not both")
    self.config = config
    self.routing = routing
    self.experts = routing.expert_config if routing is not None else experts if experts is not None else ExpertConfig()
    self.length_normalize = length_normalize
    super().__init__(t5x_network(config, self.experts), input_vocabulary, output_vocabulary, optimizer_def,
                     **kwargs)

  def get_initial_variables(self, rng, input_shapes, input_types=None):
    """{'params': unboxed params (routing's experts in place), 'params_axes': their logical axis names}."""
    del input_types
    encoder_tokens = jnp.ones(input_shapes["encoder_input_tokens"], jnp.int32)
    decoder_tokens = jnp.ones(input_shapes["decoder_input_tokens"], jnp.int32)
    boxed = self.module.init(rng, encoder_tokens, decoder_tokens, decoder_tokens, enable_dropout=False)["params"]
    params = flax.core.unfreeze(nn.meta.unbox(boxed))
    if self.routing is not None:
      name = self.routing.collection_name
      problems = mismatched_shapes(params[name], self.routing.collection)
      if problems:
        raise ValueError(f"the routing's `{name}` weights do not fit the configured model:\n  "
                         + "\n  ".join(problems))
      params[name] = jax.tree.map(jnp.asarray, self.routing.collection)
    return flax.core.freeze({"params": params, "params_axes": params_axes(boxed)})

  def score_batch(self, params, batch, return_intermediates: bool = False):
    """Per-example log-likelihood of the targets <float32>[batch] (algorithm.md §6).

    sum_score = sum_t w_t log p(y_t | x, y_<t)   (t5x's score, w = `decoder_loss_weights`);
    with `length_normalize`: mean_score = sum_score / max(sum_t w_t, 1), rank classification's score.
    """
    scores = super().score_batch(params, batch, return_intermediates)
    if not self.length_normalize:
      return scores
    count = jnp.maximum(jnp.sum(batch["decoder_loss_weights"], axis=-1), 1)
    if return_intermediates:
      return scores[0] / count, scores[1]
    return scores / count


def train_only(subtrees: Sequence[str], optimizer: optax.GradientTransformation
               ) -> t5x_optimizers.OptaxWrapper:
  """A t5x optimizer that applies `optimizer` to the params under the top-level `subtrees` (e.g. `('lora',)`)
  and a zero update to every other parameter, which therefore stays frozen (`optax.multi_transform`)."""
  subtrees = tuple(subtrees)

  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "train" if path[0].key in subtrees else "frozen", params)

  return t5x_optimizers.OptaxWrapper(
      optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels))


def library_routing(library: str, base: str, router: str = "phatgoose", names: Optional[Sequence[str]] = None,
                    top_k: int = 2, impl: str = "auto") -> routers.Routing:
  """Experts `names` (default: all) of the library at `library`, combined by `router` (`assembly.route`).

  `base` is the checkpoint the experts were trained on, in any format `checkpoints.load` reads (in
  gin/t5x/routed.gin, by default the one t5x restores): its fingerprint is checked against the library, and
  routers that need the base weights get them. Only routers whose combination is in the weights work under
  t5x: per-token routers and merging. Routers that mix experts with per-example weights (uniform, oracle,
  retrieval) need an `expert_weights` feature t5x's batches do not carry.
  """
  lib = ExpertLibrary(library)
  params = checkpoints.load(base).variables["params"]
  routing = assembly.route(lib, list(names) if names else lib.names(), params, router, top_k, impl)
  if routing.expert_weights is not None:
    raise ValueError(f"router {router!r} mixes experts with per-example weights, which t5x batches cannot "
                     f"carry; under t5x use a per-token router {routers.PER_TOKEN} or merging")
  return routing


def assembled_routing(checkpoint: str, base: str) -> routers.Routing:
  """The experts an assembled checkpoint (`phatgoose assemble`) carries: its ExpertConfig and its `experts`
  (or merged `lora`) collection. t5x restores the base weights from its own checkpoint; `base` (any format
  `checkpoints.load` reads, in gin/t5x/routed.gin the one t5x restores) must hold the same base weights as
  the assembled checkpoint (their fingerprints are compared)."""
  loaded = checkpoints.load(checkpoint)
  if loaded.experts.mode not in ("routed", "lora"):
    raise ValueError(f"{checkpoint} carries no experts (mode {loaded.experts.mode!r}); write one with "
                     f"`phatgoose assemble`")
  restored = checkpoints.load(base)
  if (lib_fingerprint(loaded.config, loaded.variables["params"]) !=
      lib_fingerprint(restored.config, restored.variables["params"])):
    raise ValueError(f"the assembled checkpoint {checkpoint} was built on another base model than {base}")
  collection = "experts" if loaded.experts.mode == "routed" else "lora"
  return routers.Routing(loaded.experts, loaded.variables[collection])
