"""Optimisers and the learning-rate schedule of expert and gate training (algorithm.md §2, §3), built from optax.

Schedule (linear warmup over the first `warmup_fraction` of `num_steps`, then constant), at update t
(t = 0 for the first update, as optax counts):

  lr(t) = learning_rate * t / W   for t < W,       W = round(warmup_fraction * num_steps)
  lr(t) = learning_rate           for t >= W

Every optimiser first clips the (accumulated) gradient to global norm `clip_norm`:
  g <- g * min(1, clip_norm / ||g||_2).
"""
import gin
import optax

OPTIMIZERS = ("adamw", "adafactor")


@gin.configurable
def warmup_constant_schedule(learning_rate: float = 5e-3, num_steps: int = 1000,
                             warmup_fraction: float = 0.06) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate` over `round(warmup_fraction * num_steps)` updates, then flat."""
  if not 0.0 <= warmup_fraction <= 1.0:
    raise ValueError(f"warmup_fraction must be in [0, 1], got {warmup_fraction}")
  warmup_steps = int(round(warmup_fraction * num_steps))
  if warmup_steps == 0:
    return optax.constant_schedule(learning_rate)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, warmup_steps), optax.constant_schedule(learning_rate)],
      [warmup_steps])


@gin.configurable
def make_optimizer(name: str = "adamw", learning_rate: float = 5e-3, num_steps: int = 1000,
                   warmup_fraction: float = 0.06, weight_decay: float = 0.0, clip_norm: float = 1.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
  """Global-norm clipping followed by AdamW (algorithm.md §2 defaults) or Adafactor, on the warmup schedule.

  `clip_norm=None` disables clipping. Adafactor uses optax's defaults (factored second moments, update
  clipping at 1.0, no momentum) with `weight_decay_rate=weight_decay`; `b1`, `b2`, `eps` are AdamW's.
  """
  schedule = warmup_constant_schedule(learning_rate, num_steps, warmup_fraction)
  if name == "adamw":
    opt = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  elif name == "adafactor":
    opt = optax.adafactor(schedule, weight_decay_rate=weight_decay or None)
  else:
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
  if clip_norm is None:
    return opt
  return optax.chain(optax.clip_by_global_norm(clip_norm), opt)
