"""Deterministic batches: the batch of step s is a pure function of (examples, batch_size, seed, s).

The examples are read in epochs; epoch e visits them in the order of the permutation
`np.random.default_rng([seed, e]).permutation(N)`. Step s takes the B consecutive positions
`p = s*B, ..., s*B + B - 1` of that endless stream, position p being example `perm_{p // N}[p % N]`, so a
batch may straddle an epoch boundary and every example is seen once per epoch. Resuming a run at step s
therefore needs no iterator state: it just asks for batch s.
"""
import functools
from typing import Mapping, Sequence, Union

import jax
import numpy as np

Examples = Union[Mapping[str, np.ndarray], Sequence[Mapping[str, np.ndarray]]]


def _stack(examples: Examples) -> dict:
  """A dict of arrays with a leading example axis, from either that or a list of per-example dicts."""
  if isinstance(examples, Mapping):
    arrays = {k: np.asarray(v) for k, v in examples.items()}
  else:
    if not examples:
      raise ValueError("no examples to batch")
    arrays = {k: np.stack([np.asarray(ex[k]) for ex in examples]) for k in examples[0]}
  sizes = {k: v.shape[0] for k, v in arrays.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"example arrays disagree on the number of examples: {sizes}")
  return arrays


@functools.lru_cache(maxsize=8)
def _permutation(seed: int, num_examples: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


class DeterministicBatches:
  """`batches(step) -> {name: <dtype>[batch_size, ...]}`, the same for the same (seed, step) every time."""

  def __init__(self, examples: Examples, batch_size: int, seed: int = 0):
    self.arrays = _stack(examples)
    self.num_examples = next(iter(self.arrays.values())).shape[0]
    if self.num_examples == 0:
      raise ValueError("no examples to batch")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.batch_size = batch_size
    self.seed = seed

  def permutation(self, epoch: int) -> np.ndarray:
    """<int>[N]: the order of the examples in `epoch`."""
    return _permutation(self.seed, self.num_examples, epoch)

  def indices(self, step: int) -> np.ndarray:
    """<int>[B]: the example indices of batch `step`."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    positions = step * self.batch_size + np.arange(self.batch_size)
    epochs, offsets = np.divmod(positions, self.num_examples)
    out = np.empty(self.batch_size, dtype=np.int64)
    for e in np.unique(epochs):
      here = epochs == e
      out[here] = self.permutation(int(e))[offsets[here]]
    return out

  def __call__(self, step: int) -> dict:
    idx = self.indices(step)
    return jax.tree.map(lambda x: x[idx], self.arrays)
