"""Cross-request batching: scoring rows packed into compiled batches, decoding batched at every step.

Requests enter a bounded queue (`QueueFull` when `max_queue` jobs and sequences wait: the server answers 429). One
worker thread owns the device. Each turn it takes every queued job and drops those cancelled (client gone) or
past their deadline. Scoring jobs of one program (`Job.program`) run `batch_size` rows at a time. Generation is
iteration-level: each program has a `slots.SlotDecoder` of `batch_size` slots; a job's sequences wait for free
slots, join between two decoder steps (their prompts encoded in one batch), and leave at their end, so a short
request does not wait for a long one and a new one does not wait for a batch to finish. Every turn runs one
step of each program with live sequences. A row carries its own prompt, length, temperature, top-p, sampling
key and routing inputs, so requests of one program with different settings (and, in a served library,
different routers, expert subsets and top-k) share a step, and each gets what it would get alone. Lengths are
bucketed to powers of two (`text_model.bucket`): after a warm-up over the buckets no request compiles.
"""
import collections
import concurrent.futures
import dataclasses
import itertools
import queue
import threading
import time
from typing import Any, Callable, Optional

import numpy as np

from phatgoose_jax import text_model
from phatgoose_jax.serving import slots as slots_lib


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
  route: Any = None  # the row's routing inputs (see slots.Sequence)


@dataclasses.dataclass
class ScoreRow:
  input_ids: list
  target_ids: list
  route: Any = None


@dataclasses.dataclass
class Job:
  """One request: rows of one kind ('generate' or 'score') for the program `program` (its name), whose
  `TextModel` `get_model()` returns."""
  program: str
  get_model: Callable[[], text_model.TextModel]
  kind: str
  rows: list
  deadline: float
  future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
  cancelled: bool = False


class Scheduler:
  """The queue and the worker thread that runs its jobs (see the module docstring). `slots`: sequences decoded
  at once per program (and scoring rows per batch); `max_input`, `max_new_tokens`: the longest prompt and
  generation. `on_batch(kind, rows, tokens, seconds)` is told of every scoring batch and decoder step (metrics)."""

  def __init__(self, max_queue: int = 256, on_batch: Optional[Callable] = None, slots: int = 8,
               max_input: int = 512, max_new_tokens: int = 256):
    self.jobs = queue.Queue(maxsize=max_queue)
    self.on_batch = on_batch or (lambda *_: None)
    self.slots, self.max_input, self.max_new_tokens = slots, max_input, max_new_tokens
    self._decoders = {}  # program -> SlotDecoder, while it has sequences
    self._waiting = collections.defaultdict(collections.deque)  # program -> sequences waiting for a slot
    self._closing = threading.Event()
    self._worker = threading.Thread(target=self._run, name="phatgoose-scheduler", daemon=True)
    self._worker.start()

  def submit(self, job: Job) -> concurrent.futures.Future:
    if self._closing.is_set():
      raise QueueFull("the server is shutting down")
    if self.queue_length() >= self.jobs.maxsize:
      raise QueueFull(f"the queue is full ({self.queue_length()} requests and sequences waiting); retry later")
    try:
      self.jobs.put_nowait(job)
    except queue.Full:
      raise QueueFull(f"the queue is full ({self.jobs.maxsize} requests waiting); retry later") from None
    return job.future

  def queue_length(self) -> int:
    """Jobs not yet taken plus sequences waiting for a decoding slot (both count against `max_queue`)."""
    return self.jobs.qsize() + sum(len(w) for w in list(self._waiting.values()))

  def close(self, timeout: float = 30.0) -> None:
    """Finish what is queued and decoding, then stop the worker; jobs unfinished after `timeout` s are
    cancelled."""
    self._closing.set()
    self.jobs.put(None)
    self._worker.join(timeout)
    while True:
      try:
        job = self.jobs.get_nowait()
      except queue.Empty:
        break
      if job is not None and not job.future.done():
        job.future.set_exception(concurrent.futures.CancelledError("the server shut down"))
    for program in list(self._waiting) + list(self._decoders):
      self._drop(program, concurrent.futures.CancelledError("the server shut down"))

  def _busy(self) -> bool:
    return bool(self._decoders) or any(self._waiting.values())

  def _take(self) -> list:
    """Every queued job, waiting for the first when nothing is decoding; None in the list marks the end."""
    jobs = [] if self._busy() else [self.jobs.get()]
    while True:
      try:
        jobs.append(self.jobs.get_nowait())
      except queue.Empty:
        return jobs

  def _run(self) -> None:
    ending = False
    while not ending or self._busy():
      jobs = self._take()
      ending = ending or None in jobs
      live = [j for j in jobs if j is not None and self._alive(j)]
      scores = [j for j in live if j.kind == "score"]
      for _, group in itertools.groupby(sorted(scores, key=lambda j: j.program), key=lambda j: j.program):
        self._run_scores(list(group))
      for job in live:
        if job.kind == "generate":
          self._start(job)
      self._step_all()

  @staticmethod
  def _alive(job: Job) -> bool:
    """False (and the job's future set) for a job cancelled, past its deadline or already failed."""
    if job.future.done():
      return False
    if job.cancelled:
      job.future.cancel()
      return False
    if time.monotonic() > job.deadline:
      job.future.set_exception(TimeoutError("the request waited past its timeout; retry later"))
      return False
    return True

  @staticmethod
  def _fail(jobs: list, error: Exception) -> None:
    for job in jobs:
      if not job.future.done():
        job.future.set_exception(error)

  def _run_scores(self, jobs: list) -> None:
    try:
      model = jobs[0].get_model()
      rows = [row for job in jobs for row in job.rows]
      results = []
      for _, chunk in text_model.chunks(rows, model.batch_size):
        start = time.monotonic()
        routes = None if chunk[0].route is None else [r.route for r in chunk]
        results += model.score_ids([r.input_ids for r in chunk], [r.target_ids for r in chunk], routes)
        self.on_batch("score", len(chunk), 0, time.monotonic() - start)
    except Exception as e:  # pylint: disable=broad-except
      self._fail(jobs, e)
      return
    at = 0
    for job in jobs:
      if not job.future.done():
        job.future.set_result(results[at:at + len(job.rows)])
      at += len(job.rows)

  def _start(self, job: Job) -> None:
    """Queue the job's sequences for its program's slots; its future is set when the last one ends."""
    results, remaining = [None] * len(job.rows), [len(job.rows)]
    lock = threading.Lock()

    def done(i, result):
      if isinstance(result, BaseException):
        self._fail([job], result)
        return
      with lock:
        results[i] = result
        remaining[0] -= 1
        if not remaining[0] and not job.future.done():
          job.future.set_result(results)

    for i, row in enumerate(job.rows):
      self._waiting[job.program].append((job, slots_lib.Sequence(
          row.prompt_ids, row.max_new_tokens, row.temperature, row.top_p, row.key, row.stop, row.route,
          done=lambda result, i=i: done(i, result), cancelled=lambda: job.cancelled or job.future.done())))

  def _decoder(self, program: str, job: Job, route) -> slots_lib.SlotDecoder:
    if program not in self._decoders:
      self._decoders[program] = slots_lib.SlotDecoder(job.get_model(), self.slots, self.max_input,
                                                      self.max_new_tokens, route)
    return self._decoders[program]

  def _step_all(self) -> None:
    """Admit waiting sequences into free slots and run one decoder step, for every program with sequences."""
    for program in set(self._waiting) | set(self._decoders):
      waiting = self._waiting[program]
      try:
        decoder = self._decoders.get(program) or self._decoder(program, waiting[0][0], waiting[0][1].route)
        admitted = []
        while waiting and len(admitted) < decoder.free:
          job, sequence = waiting.popleft()
          if self._alive(job):
            admitted.append(sequence)
        decoder.admit(admitted)
        start, live = time.monotonic(), decoder.slots - decoder.free
        decoder.step()
        if live:
          self.on_batch("generate", live, live, time.monotonic() - start)
      except Exception as e:  # pylint: disable=broad-except
        self._drop(program, e)
        continue
      if not waiting:
        del self._waiting[program]
      if not decoder.busy():
        del self._decoders[program]

  def _drop(self, program: str, error: Exception) -> None:
    """Fail every sequence of `program`, waiting or decoding."""
    sequences = [s for _, s in self._waiting.pop(program, ())]
    decoder = self._decoders.pop(program, None)
    for sequence in sequences + ([s for s in decoder.live if s is not None] if decoder else []):
      sequence.done(error)
