"""Random parameter trees, experts and batches for the tiny model, shared by the tests."""
import numpy as np

from phatgoose_jax.checkpoints import names
from phatgoose_jax.models import shift_right
from phatgoose_jax.t5.config import ALL_TARGETS, preset

TINY = preset("tiny")


def random_params(config=TINY, seed=0):
  """A nested `params` tree of the right shapes: norm scales near 1, kernels scaled by fan-in."""
  rng = np.random.default_rng(seed)
  flat = {}
  for key, shape in names.param_shapes(config).items():
    scale = shape[0] ** -0.5 if key.endswith("kernel") else 1.0
    flat[key] = (1.0 + 0.1 * rng.standard_normal(shape) if key.endswith("scale") else
                 scale * rng.standard_normal(shape)).astype(np.float32)
  return names.unflatten(flat)


def random_expert(seed, rank=4, targets=ALL_TARGETS, config=TINY, gate_scale=1.0, lora_scale=0.3):
  """(flat lora, flat gates) on every layer of `targets`."""
  rng = np.random.default_rng(seed)
  lora, gates = {}, {}
  for path in names.module_paths(config, targets):
    d_in, d_out = names.linear_shape(config, path)
    lora[f"{path}/lora_a"] = (lora_scale * rng.standard_normal((d_in, rank))).astype(np.float32)
    lora[f"{path}/lora_b"] = (lora_scale * rng.standard_normal((rank, d_out))).astype(np.float32)
    gates[f"{path}/gate"] = (gate_scale * rng.standard_normal(d_in)).astype(np.float32)
  return lora, gates


def random_batch(seed=0, batch=3, in_len=9, out_len=7, config=TINY):
  """A t5x-style batch with padding in rows 1 (inputs and targets) and 2 (inputs)."""
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, config.vocab_size, (batch, in_len)).astype(np.int32)
  tgt = rng.integers(2, config.vocab_size, (batch, out_len)).astype(np.int32)
  enc[1, in_len - 3:] = 0
  if batch > 2:
    enc[2, in_len - 1:] = 0
  tgt[1, out_len - 2:] = 0
  return {"encoder_input_tokens": enc, "decoder_input_tokens": shift_right(tgt), "decoder_target_tokens": tgt}


def cached_decoding_logits(model, variables, batch) -> np.ndarray:
  """<float32>[batch, target_length, vocab]: the decoder's logits one cached step at a time, teacher-forced."""
  encoded = model.encode(variables, batch["encoder_input_tokens"])
  length = batch["decoder_input_tokens"].shape[1]
  cache = model.init_cache(variables, encoded, batch["encoder_input_tokens"], length)
  steps = []
  for t in range(length):
    logits, cache = model.decode_step(variables, cache, encoded, batch["encoder_input_tokens"],
                                      batch["decoder_input_tokens"][:, t:t + 1])
    steps.append(np.asarray(logits[:, 0]))
  return np.stack(steps, 1)


def imported_library(tmp, base_dir: str, names_: str) -> str:
  """A library at `tmp/lib` of random gated experts named `names_` ('x,y'), imported on the Hugging Face base at
  `base_dir` from a reference-layout file with `phatgoose library import-reference`; its path."""
  from phatgoose_jax import cli  # pylint: disable=import-outside-toplevel (the CLI imports the whole stack)
  from phatgoose_jax.checkpoints import reference  # pylint: disable=import-outside-toplevel
  experts = [random_expert(i, lora_scale=1.0) for i in range(len(names_.split(",")))]
  path = str(tmp / "reference.safetensors")
  reference.save_reference(path, [e[0] for e in experts], [e[1] for e in experts])
  assert cli.main(["library", "import-reference", path, "--base", base_dir, "--library", str(tmp / "lib"),
                   "--names", names_]) == 0
  return str(tmp / "lib")
