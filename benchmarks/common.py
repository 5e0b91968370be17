"""Shared by the benchmarks: compile ahead of time, time interleaved rounds, print a table or one JSON object.

The machine these run on is shared and its load varies, so every benchmark times its variants in
interleaved rounds (one call of each per round) and reports medians, the min-max spread and the load
average before and after (`os.getloadavg`). Compilation is excluded: functions are compiled with
`jax.jit(...).lower(...).compile()` and called once before timing.
"""
import argparse
import json
import os
import time

import jax
import numpy as np


def parser(doc: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=doc.splitlines()[0])
  p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
  return p


def compiled(fn, *args, **jit_kwargs):
  """`fn` jitted and compiled for `args`; returns (call: () -> output, the compiled executable)."""
  exe = jax.jit(fn, **jit_kwargs).lower(*args).compile()
  call = lambda: exe(*args)  # noqa: E731
  jax.block_until_ready(call())
  return call, exe


def interleaved(calls: dict, rounds: int, max_rounds: dict = None) -> dict:
  """Seconds per call of each of `calls` ({name: () -> output}), one call of each per round.

  `max_rounds` caps the rounds of slow variants. Returns {name: [seconds, ...]}.
  """
  max_rounds = max_rounds or {}
  times = {name: [] for name in calls}
  for i in range(rounds):
    for name, call in calls.items():
      if i < max_rounds.get(name, rounds):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times[name].append(time.perf_counter() - start)
  return times


def summary(seconds: list) -> dict:
  return {"median_s": float(np.median(seconds)), "min_s": float(np.min(seconds)),
          "max_s": float(np.max(seconds)), "n": len(seconds)}


def ratio(seconds: list, base: list) -> float:
  return float(np.median(seconds) / np.median(base))


def machine() -> dict:
  return {"backend": jax.default_backend(), "cpus": os.cpu_count(), "jax": jax.__version__,
          "load_avg_1m": os.getloadavg()[0]}


def emit(result: dict, as_json: bool, header: list, rows: list, notes: tuple = ()):
  """One JSON object (with --json), else a header line, an aligned table and `notes`."""
  result["machine_after"] = machine()
  if as_json:
    print(json.dumps(result, indent=1))
    return
  print(f"# {json.dumps(result['machine'])}  load after: {result['machine_after']['load_avg_1m']:.2f}")
  widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
  for row in [header] + rows:
    print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))
  for note in notes:
    print(f"# {note}")
