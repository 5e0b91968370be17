"""Average activation (algorithm.md §5): router vectors from the mean input activation of each module over
the expert's training data, computed with that expert installed; then routed exactly like PHATGOOSE.

`average_activation` is the official computation (r-three/phatgoose 4fd5790, the A2 architecture of
colm/models/t5xl/moe_lora_rank16_a2.gin, run by colm/experiments/bash_scripts/reinit_router_embedding.sh:103):

  1. Sample: the expert's training dataset under max_examples_per_dataset=1000 (reinit_router_embedding.sh:103):
     of all its P (example, template) pairs (all rows x templates, not the 500,000 pairs trained on), the 1000
     `numpy.random.default_rng(42).choice(P, 1000, replace=False)` in the order drawn when P > 1000, else all P
     in order (src/data/p3.py:96-112, 123-124; seed 42 from src/data/dataset.py:67,90; a FLAN-collection
     dataset draws over all its train rows, src/data/flat.py:195-203), given as the batches of `sample`
     (`seqio_tasks.TextSource.sampled_examples`, built by `assembly.sampled_examples`). They run as given, in
     sample order, unshuffled (src/procedures/evaluator.py:36), in batches of the training batch size of the
     expert's dataset (src/procedures/utils/batcher.py:136: the `batch_size` of its `D/<NAME>/TRAIN` scope,
     2-32, `tasks/sources.py` TRAIN_BATCH_SIZE) through greedy generation (the "gen" interface,
     src/models/interface_mixin.py:247-262: at most `MAX_GEN_LENGTH` = 20 positions with the start token).
  2. Per example x and module l (src/models/addons/moe.py:865-888):

       ubar_l(x) = sum_t w_t u_l(x)_t / (sum_t w_t + 1e-6)

     over the positions t the module last saw, with w_t = 0 at encoder padding for modules that see encoder
     positions (encoder modules, cross-attention key / value), else 1. The hook overwrites the recorded input
     at every generation step (src/models/addons/monitor.py:61-66, moe.py:790-794) and cross-attention
     key / value run once (their projections are cached), so for every other decoder module ubar_l(x) is its
     input at the batch's last generation step n, one position: n = the step at which the batch's last row
     emits EOS, at most MAX_GEN_LENGTH - 1.
  3. v_l = (1 / N) sum_x ubar_l(x), the mean of the per-example means (src/procedures/utils/
     analysis_processors.py:208-233); every module, decoder ones included, gets its own v_l
     (scripts/insert_averaged_hiddens.py:88-91).

`average_activation_pooled` pools tokens instead: v_l = sum_{x, t} m_{x,t} u_l(x)_t / sum_{x, t} m_{x,t} over
all given data, teacher-forced, with m the encoder's padding mask for modules that see encoder positions and the
decoder targets' for every other decoder module.

`u_l` is the input of module l, sown in the `activations` collection of the 'lora' model carrying expert e.
"""
import functools
from typing import Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from phatgoose_jax import library as lib
from phatgoose_jax.checkpoints import names as ckpt_names
from phatgoose_jax.models import EOS_ID, EncoderDecoderModel, new_tokens, shift_right
from phatgoose_jax.routers import Routing, load_all, routed
from phatgoose_jax.t5.network import Transformer

KIND = "average_activation"
KIND_POOLED = "average_activation_pooled"
MAX_GEN_LENGTH = 20
EPSILON = 1e-6
FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")


def uses_encoder_mask(module_path: str) -> bool:
  """Whether a module's inputs are encoder positions: encoder modules and cross-attention key / value."""
  stack, *_, block, kind = module_path.split("/")
  return stack == "encoder" or (block == "encoder_decoder_attention" and kind in ("key", "value"))


def generation_steps(generated: np.ndarray, eos_id: int = EOS_ID) -> int:
  """The decoder steps greedy generation runs for a batch of `generated` <int>[b, steps] tokens: until every
  row has emitted EOS, at most `steps`."""
  eos = np.asarray(generated) == eos_id
  return int(np.max(np.where(eos.any(axis=1), eos.argmax(axis=1) + 1, eos.shape[1])))


@functools.partial(jax.jit, static_argnums=0)
def example_means(module: Transformer, variables: Mapping, encoder_tokens: jax.Array, decoder_inputs: jax.Array,
                  last: jax.Array) -> dict:
  """`{module: ubar <float32>[b, d_in]}`: each example's recorded input (module docstring, step 2), decoder
  modules at position `last` of the teacher-forced `decoder_inputs` (no decoder padding mask, as in
  generation)."""
  _, state = module.apply(variables, encoder_tokens, decoder_inputs, jnp.ones_like(decoder_inputs),
                          mutable=["activations"])
  encoder_weights = (encoder_tokens > 0).astype(jnp.float32)
  last_weights = jax.nn.one_hot(jnp.full(decoder_inputs.shape[:1], last), decoder_inputs.shape[1])
  means = {}
  for key, (u,) in ckpt_names.flatten(state["activations"]).items():
    path = key.rsplit("/", 1)[0]
    weights = encoder_weights if uses_encoder_mask(path) else last_weights
    total = jnp.einsum("bld,bl->bd", u.astype(jnp.float32), weights)
    means[path] = total / (jnp.sum(weights, axis=1, keepdims=True) + EPSILON)
  return means


def official_means(model: EncoderDecoderModel, variables: Mapping, batches: Sequence[np.ndarray],
                   max_gen_length: int = MAX_GEN_LENGTH) -> dict:
  """`{module: v <float32>[d_in]}`: the mean over the rows of `batches` (encoder tokens) of their recorded
  inputs, each batch generated greedily (module docstring, steps 2-3)."""
  totals, count = {}, 0
  for encoder_tokens in batches:
    tokens = jnp.asarray(encoder_tokens)
    batch = {"encoder_input_tokens": tokens,
             "decoder_input_tokens": jnp.zeros((len(tokens), new_tokens(max_gen_length)), jnp.int32)}
    generated = np.asarray(model.jit_predict(variables, batch)[0])
    last = generation_steps(generated) - 1
    means = example_means(model.module, variables, tokens, jnp.asarray(shift_right(generated)), last)
    for path, mean in means.items():
      totals[path] = totals.get(path, 0.0) + np.sum(np.asarray(mean, np.float64), axis=0)
    count += len(tokens)
  return {p: (t / count).astype(np.float32) for p, t in totals.items()}


@functools.partial(jax.jit, static_argnums=0)
def masked_sums(module: Transformer, variables: Mapping, batch: Mapping) -> dict:
  """`{module: (sum_t m_t u_t <float32>[d_in], sum_t m_t)}` over one batch, from the sown inputs."""
  _, state = module.apply(variables, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                          batch["decoder_target_tokens"], mutable=["activations"])
  sums = {}
  for key, (u,) in ckpt_names.flatten(state["activations"]).items():
    path = key.rsplit("/", 1)[0]
    tokens = batch["encoder_input_tokens"] if uses_encoder_mask(path) else batch["decoder_target_tokens"]
    mask = (tokens > 0).astype(jnp.float32)
    sums[path] = (jnp.einsum("bld,bl->d", u.astype(jnp.float32), mask), jnp.sum(mask))
  return sums


def pooled_means(module: Transformer, variables: Mapping, batches: Sequence[Mapping]) -> dict:
  """`{module: v <float32>[d_in]}`: the masked mean of each module's input over all tokens of `batches`."""
  totals, counts = {}, {}
  for batch in batches:
    for path, (total, count) in masked_sums(module, variables, {k: batch[k] for k in FEATURES}).items():
      totals[path] = totals.get(path, 0.0) + np.asarray(total, np.float64)
      counts[path] = counts.get(path, 0.0) + float(count)
  return {p: (totals[p] / max(counts[p], 1.0)).astype(np.float32) for p in totals}


def expert_vectors(library, expert, kind: str, batches: Optional[Sequence[Mapping]],
                   compute: Optional[Callable[[object, Sequence[Mapping]], dict]]) -> dict:
  """The expert's vectors of `kind`: from the library cache when computed from these `batches` (or, without
  batches, from whatever data they were computed from), else `compute(expert, batches)`, cached."""
  name = expert.manifest["name"]
  cached = library.load_derived(name, kind, None if batches is None else lib.data_key(batches))
  if cached is not None:
    return cached
  if batches is None or compute is None:
    raise ValueError(f"no cached average activations for expert {name!r}: pass params= and its batches (sample= "
                     f"for {KIND}, data= for {KIND_POOLED})")
  vectors = compute(expert, batches)
  library.save_derived(name, kind, vectors, lib.data_key(batches))
  return vectors


def lora_model(library, expert, params: Mapping) -> tuple:
  """(the 'lora' model carrying `expert`, its variables)."""
  model = EncoderDecoderModel(library.t5_config(), lib.expert_config(expert.manifest))
  return model, {"params": params, "lora": ckpt_names.unflatten(expert.lora)}


def official_vectors(library, params: Mapping, expert, batches: Sequence[Mapping]) -> dict:
  """The official average activations of `expert` over its sample, `batches` run as given."""
  return official_means(*lora_model(library, expert, params), [np.asarray(b["encoder_input_tokens"]) for b in batches])


def pooled_vectors(library, params: Mapping, expert, batches: Sequence[Mapping]) -> dict:
  """The token-pooled average activations of `expert` over all of `batches`."""
  model, variables = lora_model(library, expert, params)
  return pooled_means(model.module, variables, batches)


def build_kind(library, names, kind: str, compute: Callable, params: Optional[Mapping],
               data: Optional[Mapping[str, Sequence]], top_k: int, impl: str) -> Routing:
  experts = load_all(library, names)
  compute = None if params is None else functools.partial(compute, library, params)
  vectors = [expert_vectors(library, e, kind, (data or {}).get(e.manifest["name"]), compute) for e in experts]
  return routed(experts, vectors, top_k=top_k, impl=impl)


def build(library, names, *, params: Optional[Mapping] = None, sample: Optional[Mapping[str, Sequence]] = None,
          top_k: int = 2, impl: str = "auto") -> Routing:
  """Routes by the official average activations (module docstring). `sample` maps expert names to the batches
  of their sample (`encoder_input_tokens`; module docstring, step 1), `params` are the base model's. Cached
  vectors are reused when `sample` is left out."""
  return build_kind(library, names, KIND, official_vectors, params, sample, top_k, impl)


def build_pooled(library, names, *, params: Optional[Mapping] = None,
                 data: Optional[Mapping[str, Sequence]] = None, top_k: int = 2, impl: str = "auto") -> Routing:
  """Routes by token-pooled average activations over all of `data` (module docstring); as `build`."""
  return build_kind(library, names, KIND_POOLED, pooled_vectors, params, data, top_k, impl)
