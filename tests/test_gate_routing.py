"""End to end, the PHATGOOSE mechanism: post-hoc gates, trained each on its own expert's data only, route
tokens of that data to their own expert (algorithm.md §3-§4). Two tasks over disjoint byte ranges, so each token
carries its task; expert then gate trained per task, assembled from a library, routed top-1."""
import jax
import numpy as np
import pytest
from flax import traverse_util

from phatgoose_jax import routers
from phatgoose_jax import library as lib
from phatgoose_jax.models import EncoderDecoderModel, shift_right, unbox
from phatgoose_jax.t5.config import preset
from phatgoose_jax.experts.config import ExpertConfig
from phatgoose_jax.training.optimizers import make_optimizer
from phatgoose_jax.training.trainer import Trainer

CFG = preset("tiny", dropout_rate=0.0)
RANK = 4
RANGES = {"low": (3, 60), "high": (150, 207)}


def task_data(seed, lo, hi, count=256, length=8):
  """Inputs drawn from [lo, hi); target = the input reversed and mirrored inside the range."""
  x = np.random.default_rng(seed).integers(lo, hi, (count, length)).astype(np.int32)
  y = (hi + lo - 1 - x[:, ::-1]).astype(np.int32)
  return {"encoder_input_tokens": x, "decoder_input_tokens": shift_right(y), "decoder_target_tokens": y}


def batches(data, size=32):
  return lambda step: {k: v[(step * size) % len(v):(step * size) % len(v) + size] for k, v in data.items()}


def train(model, variables, trainable, data, steps, seed):
  trainer = Trainer(model.loss_fn, variables, trainable, make_optimizer(num_steps=steps), seed=seed, log_every=10**6)
  return trainer.train(batches(data), steps)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
  base = unbox(EncoderDecoderModel(CFG).get_initial_variables(jax.random.PRNGKey(0)))["params"]
  library = lib.ExpertLibrary(str(tmp_path_factory.mktemp("gates") / "lib"))
  for i, (name, (lo, hi)) in enumerate(RANGES.items()):
    data = task_data(i, lo, hi)
    lora_model = EncoderDecoderModel(CFG, ExpertConfig(mode="lora", rank=RANK))
    variables = dict(unbox(lora_model.get_initial_variables(jax.random.PRNGKey(10 + i))), params=base)
    lora = train(lora_model, variables, ["lora/.*"], data, 150, i)["lora"]
    gated_model = EncoderDecoderModel(CFG, ExpertConfig(mode="gated", rank=RANK))
    variables = dict(unbox(gated_model.get_initial_variables(jax.random.PRNGKey(20 + i))), params=base, lora=lora)
    gates = train(gated_model, variables, ["gates/.*"], data, 100, i)["gates"]
    library.add(name, lora, base=lib.base_fingerprint(CFG, base), gates=gates, dataset=name)
  return library, base


def test_trained_gates_route_each_task_to_its_own_expert(library):
  library, base = library
  routing_ = routers.build("phatgoose", library, list(RANGES), top_k=1)
  model = EncoderDecoderModel(CFG, routing_.expert_config)
  variables = routing_.variables(base)
  for i, (lo, hi) in enumerate(RANGES.values()):
    batch = task_data(100 + i, lo, hi, count=32)
    _, state = model.module.apply(variables, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                                  batch["decoder_target_tokens"], mutable="intermediates")
    chosen = [np.asarray(v[0])[..., 0] for k, v in traverse_util.flatten_dict(state["intermediates"]).items()
              if k[-1] == "route_index"]
    share = np.mean([np.mean(c == i) for c in chosen])
    assert share > 0.6, f"task {i}: only {share:.2f} of tokens routed to their own expert (chance 0.5)"
