"""Merged experts: E LoRAs folded into one, used as a single 'lora'-mode expert (algorithm.md §5).

Two named variants:
  merged           the reference code's parameter average: A = mean_e A_e, B = mean_e B_e (rank r);
  merged_products  the average of the updates, mean_e B_e A_e, exactly: the experts are concatenated along
                   the rank axis (rank E r) with 1/E folded into B, and the scale stays 1/r, so
                   u @ [A_1 .. A_E] @ [B_1; ..; B_E] / E / r = mean_e (B_e A_e u) / r.
"""
import numpy as np

from phatgoose_jax.checkpoints import names as ckpt_names
from phatgoose_jax.routers import Routing, load_all, modules_of
from phatgoose_jax.experts.config import ExpertConfig


def average_parameters(loras) -> dict:
  """A = mean_e A_e, B = mean_e B_e, per module."""
  return {k: np.mean([l[k] for l in loras], axis=0).astype(np.float32) for k in loras[0]}


def average_products(loras) -> dict:
  """lora_a = concat_e A_e along rank <[d_in, E r]>, lora_b = concat_e B_e / E <[E r, d_out]>."""
  merged = {}
  for m in modules_of(loras[0]):
    merged[f"{m}/lora_a"] = np.concatenate([l[f"{m}/lora_a"] for l in loras], axis=1).astype(np.float32)
    merged[f"{m}/lora_b"] = (np.concatenate([l[f"{m}/lora_b"] for l in loras], axis=0) / len(loras)).astype(
        np.float32)
  return merged


def _lora_routing(experts, lora: dict, rank: int, scale: float) -> Routing:
  manifest = experts[0].manifest
  config = ExpertConfig(mode="lora", rank=rank, targets=tuple(manifest["targets"]), scale=scale)
  return Routing(config, ckpt_names.unflatten(lora))


def build_average(library, names) -> Routing:
  """One expert from the parameter average (rank r, scale 1/r)."""
  experts = load_all(library, names)
  rank = experts[0].manifest["rank"]
  return _lora_routing(experts, average_parameters([e.lora for e in experts]), rank, 1.0 / rank)


def build_products(library, names) -> Routing:
  """One expert equal to the average of the experts' updates (rank E r, scale 1/r)."""
  experts = load_all(library, names)
  rank = experts[0].manifest["rank"]
  return _lora_routing(experts, average_products([e.lora for e in experts]), rank * len(experts), 1.0 / rank)
