"""Cross-request batching: concurrent requests' rows packed into the rows of one compiled batch.

Requests enter a bounded queue (`QueueFull` when it holds `max_queue` jobs: the server answers 429). One
worker thread owns the device: it takes every queued job, drops those cancelled (client gone) or past their
deadline, groups the rest's rows by (model, kind) and runs each group `batch_size` rows at a time. A
generation row carries its own prompt, length, temperature, top-p and sampling key (`decode_lengths`,
`temperature`, `top_p`, `decode_rng` per row of `jit_sample`), so requests of one model with different
lengths and sampling settings share a batch; each row's tokens depend on its own prompt and key only, so a
request gets what it would get alone. Rows are padded to `batch_size` and lengths bucketed to powers of two
(`text_model.bucket`): after a warm-up over the buckets no request compiles.
"""
import concurrent.futures
import dataclasses
import itertools
import queue
import threading
import time
from typing import Callable, Optional

import numpy as np

from phatgoose_jax import text_model
from phatgoose_jax.models import EOS_ID


class QueueFull(Exception):
  """The queue holds `max_queue` jobs; retry later."""


@dataclasses.dataclass
class GenerateRow:
  prompt_ids: list
  max_new_tokens: int
  temperature: float
  top_p: float
  key: np.ndarray  # <uint32>[2], text_model.prompt_key(seed, index)
  stop: list


@dataclasses.dataclass
class ScoreRow:
  input_ids: list
  target_ids: list


@dataclasses.dataclass
class Job:
  """One request: rows of one kind ('generate' or 'score') for the model `get_model()` returns."""
  model_name: str
  get_model: Callable[[], text_model.TextModel]
  kind: str
  rows: list
  deadline: float
  future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
  cancelled: bool = False


def decode_rows(model: text_model.TextModel, rows: list) -> list:
  """`TextModel.generate_ids`' results for up to `model.batch_size` rows, each with its own settings."""
  size = model.batch_size
  keys, lengths = np.zeros((size, 2), np.uint32), np.zeros((size,), np.int32)
  temperature, top_p = np.zeros((size,), np.float32), np.ones((size,), np.float32)
  for i, row in enumerate(rows):
    keys[i], lengths[i], temperature[i], top_p[i] = row.key, row.max_new_tokens, row.temperature, row.top_p
  batch = {"encoder_input_tokens": text_model.pad([r.prompt_ids for r in rows], size),
           "decoder_input_tokens": np.zeros((size, text_model.bucket(int(lengths.max()))), np.int32),
           "decode_lengths": lengths, "decode_rng": keys, "temperature": temperature, "top_p": top_p}
  tokens, aux = model.model.jit_sample(model.variables, model.loaded.with_expert_weights(batch))
  tokens, token_scores = np.asarray(tokens), np.asarray(aux["token_scores"])
  out = []
  for row, ids, scores in zip(rows, tokens, token_scores):
    ids = [int(t) for t in ids[:row.max_new_tokens]]
    eos = EOS_ID in ids
    kept = [(t, float(s)) for t, s in zip(ids[:ids.index(EOS_ID) if eos else len(ids)], scores) if t > 0]
    out.append(model._result([t for t, _ in kept], [s for _, s in kept], eos, row.stop))  # pylint: disable=protected-access
  return out


class Scheduler:
  """The queue and the worker thread that runs its jobs (see the module docstring). `on_batch(kind, rows,
  tokens, seconds)` is told of every batch run (metrics)."""

  def __init__(self, max_queue: int = 256, on_batch: Optional[Callable] = None):
    self.jobs = queue.Queue(maxsize=max_queue)
    self.on_batch = on_batch or (lambda *_: None)
    self._closing = threading.Event()
    self._worker = threading.Thread(target=self._run, name="phatgoose-scheduler", daemon=True)
    self._worker.start()

  def submit(self, job: Job) -> concurrent.futures.Future:
    if self._closing.is_set():
      raise QueueFull("the server is shutting down")
    try:
      self.jobs.put_nowait(job)
    except queue.Full:
      raise QueueFull(f"the queue is full ({self.jobs.maxsize} requests waiting); retry later") from None
    return job.future

  def queue_length(self) -> int:
    return self.jobs.qsize()

  def close(self, timeout: float = 30.0) -> None:
    """Run what is queued, then stop the worker; jobs still queued after `timeout` s are cancelled."""
    self._closing.set()
    self.jobs.put(None)
    self._worker.join(timeout)
    while True:
      try:
        job = self.jobs.get_nowait()
      except queue.Empty:
        return
      if job is not None and not job.future.done():
        job.future.set_exception(concurrent.futures.CancelledError("the server shut down"))

  def _take(self) -> list:
    """Every queued job, waiting for the first; None in the list marks the end."""
    jobs = [self.jobs.get()]
    while True:
      try:
        jobs.append(self.jobs.get_nowait())
      except queue.Empty:
        return jobs

  def _run(self) -> None:
    while True:
      jobs = self._take()
      live = [j for j in jobs if j is not None and self._alive(j)]
      for (_, kind), group in itertools.groupby(sorted(live, key=lambda j: (j.model_name, j.kind)),
                                                key=lambda j: (j.model_name, j.kind)):
        self._run_group(kind, list(group))
      if None in jobs:
        return

  @staticmethod
  def _alive(job: Job) -> bool:
    if job.cancelled:
      job.future.cancel()
      return False
    if time.monotonic() > job.deadline:
      job.future.set_exception(TimeoutError("the request waited past its timeout; retry later"))
      return False
    return True

  def _run_group(self, kind: str, jobs: list) -> None:
    try:
      model = jobs[0].get_model()
      rows = [(job, row) for job in jobs for row in job.rows]
      results = []
      for _, chunk in text_model.chunks(rows, model.batch_size):
        start = time.monotonic()
        if kind == "generate":
          out = decode_rows(model, [row for _, row in chunk])
          tokens = sum(len(r["token_ids"]) for r in out)
        else:
          out = model.score_ids([row.input_ids for _, row in chunk], [row.target_ids for _, row in chunk])
          tokens = 0
        self.on_batch(kind, len(chunk), tokens, time.monotonic() - start)
        results += out
    except Exception as e:  # pylint: disable=broad-except
      for job in jobs:
        if not job.future.done():
          job.future.set_exception(e)
      return
    at = 0
    for job in jobs:
      if not job.future.done():
        job.future.set_result(results[at:at + len(job.rows)])
      at += len(job.rows)
