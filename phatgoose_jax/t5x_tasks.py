"""The built-in seqio tasks of the offline t5x examples (gin/t5x/examples/): importing this module registers the
demo suite's byte-level tasks (phatgoose_jax/demo/suite.py, seed 0), generated in memory, no network needed.

  demo_<skill>        splits train, validation   e.g. demo_reverse: `reverse: cat` -> `tac`
  demo_<skill>_eval   split validation           rank classification (accuracy) over the other skills' outputs

t5x imports it by name: `MIXTURE_OR_TASK_MODULE = 'phatgoose_jax.t5x_tasks'`.
"""
from phatgoose_jax.demo import suite

SIZES = suite.SuiteSizes(train=2000, validation=40, held_out=40)

suite.register(seed=0, sizes=SIZES)
