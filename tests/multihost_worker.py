"""One process of the multi-host training test (tests/test_multihost.py), or the one-process reference.

  python tests/multihost_worker.py --out DIR --workdir DIR --devices D [--coordinator_address 127.0.0.1:PORT
      --process_count N --process_index I]

Trains a tiny T5 LoRA expert on a fixed random batch for 3 steps (checkpoints at steps 2 and 3), each
process feeding only its rows of the batch; then a new Trainer restores the latest checkpoint from
`workdir`. Process 0 writes `report.json` (losses, restored step, whether the restored parameters equal the
trained ones) and `params.npz` (the final LoRA, gathered from every process); every process writes its rows.
"""
import argparse
import json
import os
import pathlib

import jax
import numpy as np
from jax.experimental import multihost_utils

from phatgoose_jax import distributed, models, partitioning
from phatgoose_jax.experts.config import ExpertConfig
from phatgoose_jax.t5.config import preset
from phatgoose_jax.training import optimizers, trainer as trainer_lib

BATCH, LENGTH, STEPS = 8, 6, 3
MESH = (2, 2, 1)  # (data, model, expert) over 4 devices: 2 processes x 2, or 1 process x 4


def fixed_batch() -> dict:
  rng = np.random.default_rng(0)
  targets = rng.integers(2, 259, (BATCH, LENGTH), dtype=np.int32)
  return {"encoder_input_tokens": rng.integers(2, 259, (BATCH, LENGTH), dtype=np.int32),
          "decoder_target_tokens": targets, "decoder_input_tokens": models.shift_right(targets)}


def train(workdir: str) -> dict:
  model = models.EncoderDecoderModel(preset("tiny"), ExpertConfig(mode="lora", rank=4))
  variables = jax.jit(model.get_initial_variables)(jax.random.key(0))
  kw = dict(trainable=["lora/.*"], optimizer=optimizers.make_optimizer(learning_rate=1e-2, num_steps=STEPS),
            mesh=partitioning.make_mesh(*MESH), workdir=workdir, checkpoint_every=2, log_every=1, tensorboard=False)
  trained = trainer_lib.Trainer(model.loss_fn, variables, **kw)
  rows = trained.local_rows(BATCH)
  batch = {k: v[rows] for k, v in fixed_batch().items()}
  trained.train(lambda step: batch, STEPS)
  restored = trainer_lib.Trainer(model.loss_fn, variables, **kw)
  params, again = multihost_utils.process_allgather((trained.state["params"], restored.state["params"]), tiled=True)
  same = jax.tree.all(jax.tree.map(np.array_equal, params, again))
  return {"losses": [h["train/loss"] for h in trained.history], "restored_step": int(restored.state["step"]),
          "restored_equal": bool(same), "rows": [rows.start, rows.stop], "params": trainer_lib.flatten(params)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--devices", type=int, required=True)
  distributed.add_flags(parser)
  args = parser.parse_args()
  jax.config.update("jax_num_cpu_devices", args.devices)
  distributed.initialize_from_args(args)
  result = train(args.workdir)
  out = pathlib.Path(args.out)
  (out / f"rows_{jax.process_index()}.json").write_text(json.dumps(result["rows"]))
  if distributed.is_writer():
    np.savez(out / "params.npz", **{k: np.asarray(v) for k, v in result.pop("params").items()})
    (out / "report.json").write_text(json.dumps(dict(result, process_count=jax.process_count(),
                                                     device_count=jax.device_count())))


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  main()
