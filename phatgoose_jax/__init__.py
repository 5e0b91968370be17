"""phatgoose-jax: PHATGOOSE (arXiv 2402.05859) in JAX/Flax.

The pipeline, in the order the package's folders show it: a T5 v1.1 model (`t5/`), LoRA experts, gates
and the routed layer (`experts/`), router builders and baselines (`routers/`), the expert library
(`library.py`), training (`training/`), evaluation (`evaluation/`) and the synthetic demo (`demo/`).
"""
__version__ = "0.1.0"
