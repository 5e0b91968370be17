"""One process of the multi-host training test (tests/test_multihost.py), or the one-process reference.

  python tests/multihost_worker.py --out DIR --workdir DIR --devices D [--coordinator_address 127.0.0.1:PORT
      --process_count N --process_index I]

Trains a tiny T5 LoRA expert on a fixed random batch for 3 steps (checkpoints at steps 2 and 3), each
process feeding only its rows of the batch; then a new Trainer restores the latest checkpoint from
`workdir` and the expert goes into `workdir/library` the way the training stages add it (train.py: process 0
writes, the others read the entry back; each process passes its own index as the dataset name). Process 0
writes `report.json` (losses, restored step, whether the restored parameters equal the trained ones) and
`params.npz` (the final LoRA, gathered from every process); every process writes its rows and the dataset
name of the library entry it got back. TensorBoard logs go to `workdir/tensorboard` (process 0 only).
"""
import argparse
import json
import os
import pathlib

import jax
import numpy as np
from jax.experimental import multihost_utils

from phatgoose_jax import distributed, library as lib, models, partitioning, train as train_stage
from phatgoose_jax.experts.config import ExpertConfig
from phatgoose_jax.t5.config import preset
from phatgoose_jax.training import optimizers, trainer as trainer_lib

BATCH, LENGTH, STEPS = 8, 6, 3
CONFIG = preset("tiny", num_encoder_layers=1, num_decoder_layers=1)  # the least to compile
MESH = (2, 2, 1)  # (data, model, expert) over 4 devices: 2 processes x 2, or 1 process x 4


def fixed_batch() -> dict:
  rng = np.random.default_rng(0)
  targets = rng.integers(2, 259, (BATCH, LENGTH), dtype=np.int32)
  return {"encoder_input_tokens": rng.integers(2, 259, (BATCH, LENGTH), dtype=np.int32),
          "decoder_target_tokens": targets, "decoder_input_tokens": models.shift_right(targets)}


def initial_variables(model) -> dict:
  """Seeded numpy values in the model's boxed variable structure: `jax.eval_shape` compiles nothing (a jitted
  initialisation took longer to compile than the whole training on a loaded 2-core machine)."""
  rng = np.random.default_rng(1)
  shapes = jax.eval_shape(model.get_initial_variables, jax.random.key(0))
  return jax.tree.map(lambda s: (rng.normal(size=s.shape) * 0.05).astype(s.dtype), shapes)


def train(workdir: str, library: str) -> dict:
  model = models.EncoderDecoderModel(CONFIG, ExpertConfig(mode="lora", rank=4))
  variables = initial_variables(model)
  kw = dict(trainable=["lora/.*"], optimizer=optimizers.make_optimizer(learning_rate=1e-2, num_steps=STEPS),
            mesh=partitioning.make_mesh(*MESH), workdir=workdir, checkpoint_every=2, log_every=1)
  trained = trainer_lib.Trainer(model.loss_fn, variables, **kw)
  rows = trained.local_rows(BATCH)
  batch = {k: v[rows] for k, v in fixed_batch().items()}
  trained.train(lambda step: batch, STEPS)
  restored = trainer_lib.Trainer(model.loss_fn, variables, **kw)
  params, again = multihost_utils.process_allgather((trained.state["params"], restored.state["params"]), tiled=True)
  same = jax.tree.all(jax.tree.map(np.array_equal, params, again))
  entry = train_stage._library_add(library, "expert", CONFIG, params["lora"], base=lib.base_fingerprint(CONFIG, {}),
                                   dataset=f"process_{jax.process_index()}")
  return {"losses": [h["train/loss"] for h in trained.history], "restored_step": int(restored.state["step"]),
          "restored_equal": bool(same), "rows": [rows.start, rows.stop], "params": trainer_lib.flatten(params),
          "library_dataset": entry["dataset"]}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--devices", type=int, required=True)
  distributed.add_flags(parser)
  args = parser.parse_args()
  jax.config.update("jax_num_cpu_devices", args.devices)
  distributed.initialize_from_args(args)
  result = train(args.workdir, os.path.join(args.workdir, "library"))
  out = pathlib.Path(args.out)
  (out / f"rows_{jax.process_index()}.json").write_text(json.dumps(result["rows"]))
  (out / f"library_dataset_{jax.process_index()}.json").write_text(json.dumps(result["library_dataset"]))
  if distributed.is_writer():
    np.savez(out / "params.npz", **{k: np.asarray(v) for k, v in result.pop("params").items()})
    (out / "report.json").write_text(json.dumps(dict(result, process_count=jax.process_count(),
                                                     device_count=jax.device_count())))


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  main()
