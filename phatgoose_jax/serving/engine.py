"""The engine: the served models, one scheduler, and the translation of OpenAI-style request bodies into jobs.

Served model names (`model_names`): the base (its directory's name), `expert:<name>` for each library expert
alone (its LoRA, router 'merged' over one expert), and each router over the library's served experts
(`ROUTERS`). A request may narrow a router to `experts` (a subset of the library) and set its `top_k`.
The per-token routers (phatgoose, arrow, spectr) run in one program, the `LiveLibrary`'s: each row routes by
its own router over its own subset with its own top-k (up to `max_top_k`), so their requests share every
batch and step. The other models are `TextModel`s loaded on first use and kept (at most `max_models`, least
recently used dropped). Experts are added to and removed from the live library while serving (`add_expert`,
`remove_expert`) without recompiling; models built over the old set are rebuilt on their next request.

Bad bodies raise `RequestError(message, param)` with one line naming the field and what it must be.
"""
import collections
import itertools
import os
import threading
import time
from typing import Optional

import jax
import numpy as np

from phatgoose_jax import assembly
from phatgoose_jax import library as lib
from phatgoose_jax import routers as routers_lib
from phatgoose_jax import text_model
from phatgoose_jax import vocab as vocab_lib
from phatgoose_jax.serving import live_library
from phatgoose_jax.serving import scheduler as sched
from phatgoose_jax.serving import slots as slots_lib

# Routers over a library that need nothing beyond it and the base's weights.
ROUTERS = tuple(n for n in ("phatgoose", "arrow", "spectr", "merged", "uniform")
                if set(routers_lib.spec(n).needs) <= {"params"})
LIBRARY_PROGRAM = "library"  # the program of the live library's routers
MAX_ROWS = 64  # prompts x n of one request
MAX_STOP = 4


class RequestError(ValueError):
  """A request the client can fix: answered 400 with `message`, naming `param`."""

  def __init__(self, message: str, param: Optional[str] = None):
    super().__init__(message)
    self.param = param


def _integer(body, name, default, low, high):
  value = body.get(name, default)
  if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
    raise RequestError(f"{name} must be an integer in {low}..{high}, got {value!r}", name)
  return value


def _real(body, name, default, low, high, low_open=False):
  value = body.get(name, default)
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (low < value if low_open else low <= value)
  if not ok or not value <= high:
    raise RequestError(f"{name} must be a number in {'(' if low_open else '['}{low}, {high}], got {value!r}", name)
  return float(value)


def _strings(value, name, allow_one=True):
  if allow_one and isinstance(value, str):
    return [value]
  if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
    raise RequestError(f"{name} must be {'a string or ' if allow_one else ''}a non-empty list of strings", name)
  return value


class LibraryModel(text_model.TextModel):
  """The `TextModel` of a live library: its variables are the library's current ones."""

  def __init__(self, live: live_library.LiveLibrary, vocabulary, batch_size: int):
    super().__init__(assembly.LoadedModel(live.model, live.variables), vocabulary, batch_size)
    self.live = live

  @property
  def variables(self) -> dict:
    return self.live.variables


class Engine:
  """Models of `base` (and routers over `library`) behind one `Scheduler`.

  batch_size: rows of every compiled batch and decoding slots of each program; max_queue: jobs waiting before
  429; timeout_s: how long a request may take; max_tokens: the most tokens a completion may ask for;
  max_input: the longest prompt in tokens (default and at most the model's `max_length`);
  capacity: expert slots of the live library (default: its experts plus 8); max_top_k: the largest top_k a
  request may ask of the per-token routers (default `top_k`); on_batch: as `Scheduler`'s.
  """

  def __init__(self, base: str, library: Optional[str] = None, top_k: int = 2, batch_size: int = 8,
               max_queue: int = 256, timeout_s: float = 60.0, dtype: str = "float32", max_models: int = 16,
               on_batch=None, vocab: str = "byte", max_tokens: int = 256, capacity: Optional[int] = None,
               max_top_k: Optional[int] = None, max_input: Optional[int] = None):
    self.base, self.library_path, self.top_k, self.dtype, self.vocab = base, library, top_k, dtype, vocab
    self.batch_size, self.timeout_s, self.max_models = batch_size, timeout_s, max_models
    self.base_name = os.path.basename(os.path.normpath(base))
    self.base_model = text_model.load(base, dtype=dtype, vocab=vocab, batch_size=batch_size)
    self.max_tokens = min(max_tokens, self.base_model.max_length)
    self.max_input = min(max_input or self.base_model.max_length, self.base_model.max_length)
    self.library = lib.ExpertLibrary(library) if library else None
    self.live, self.experts = None, []
    if self.library:
      names = self.library.names()
      self.live = live_library.LiveLibrary(base, library, capacity or len(names) + 8, max_top_k or top_k, dtype)
      self.library_model = LibraryModel(self.live, self.base_model.vocabulary, batch_size)
      self.experts = self._served()
    self._models = collections.OrderedDict()
    self._lock = threading.Lock()
    self.scheduler = sched.Scheduler(max_queue, on_batch, batch_size, self.max_input, self.max_tokens)

  # Models.

  def _served(self) -> list:
    """The live library's experts in the library's order (read from the library: on start-up and each change
    only; requests read `experts`)."""
    served = set(self.live.names())
    return [n for n in self.library.names() if n in served]

  def mesh_shape(self) -> dict:
    """{axis: size} of the mesh the models are placed on (gin: `partitioning.make_mesh`)."""
    return dict(jax.tree.leaves(self.base_model.variables)[0].sharding.mesh.shape)

  def model_names(self) -> list:
    if not self.experts:
      return [self.base_name]
    return [self.base_name] + [f"expert:{e}" for e in self.experts] + list(ROUTERS)

  def _resolve(self, body: dict) -> tuple:
    """(the program's name, a loader of its TextModel, each row's routing inputs or None) of a body's `model`,
    `top_k` and `experts`."""
    name = body.get("model", self.base_name)
    if name not in self.model_names():
      raise RequestError(f"unknown model {name!r}; GET /v1/models lists {self.model_names()}", "model")
    routed = name in ROUTERS
    if not routed and ("experts" in body or "top_k" in body):
      raise RequestError(f"top_k and experts apply to the routers {list(ROUTERS)}, not to model {name!r}", "model")
    if name == self.base_name:
      return name, lambda: self.base_model, None
    if not routed:
      expert = name.split(":", 1)[1]
      return name, lambda: self._load("merged", 1, [expert]), None
    served = self.experts
    experts = _strings(body.get("experts", served), "experts", allow_one=False)
    unknown = [e for e in experts if e not in served]
    if unknown:
      raise RequestError(f"unknown experts {unknown}; the library serves {served}", "experts")
    per_token = name in live_library.ROUTER_SCORES
    most = min(self.live.experts.top_k, len(experts)) if per_token else len(experts)
    top_k = _integer(body, "top_k", min(self.top_k, most), 1, most)
    if per_token:
      try:
        return LIBRARY_PROGRAM, lambda: self.library_model, self.live.routing(name, experts, top_k)
      except ValueError as e:
        raise RequestError(str(e), "experts") from None
    return f"{name}/{top_k}/{','.join(experts)}", lambda: self._load(name, top_k, experts), None

  def _load(self, router: str, top_k: int, experts: list) -> text_model.TextModel:
    key = (router, top_k, tuple(experts))
    with self._lock:
      if key in self._models:
        self._models.move_to_end(key)
        return self._models[key]
    model = text_model.load(self.base, self.library_path, router=router, top_k=top_k, experts=experts,
                            dtype=self.dtype, vocab=self.vocab, batch_size=self.batch_size)
    with self._lock:
      self._models[key] = model
      while len(self._models) > self.max_models:
        self._models.popitem(last=False)
    return model

  def add_expert(self, name: str) -> list:
    """Serve the library's entry `name` (added there since start-up, e.g. by `phatgoose library add`)."""
    if self.library is None:
      raise RequestError("the server runs without a library; start it with --library", "name")
    if not isinstance(name, str) or name not in self.library.names():
      raise RequestError(f"library {self.library.path} has no expert {name!r}; it has {self.library.names()}",
                         "name")
    try:
      self.live.add(name)
    except (ValueError, lib.LibraryError) as e:
      raise RequestError(str(e), "name") from None
    self.experts = self._served()
    return self.experts

  def remove_expert(self, name: str) -> list:
    if self.live is None:
      raise RequestError("the server runs without a library; start it with --library", "name")
    try:
      self.live.remove(name)
    except ValueError as e:
      raise RequestError(str(e), "name") from None
    with self._lock:
      self._models = collections.OrderedDict((k, m) for k, m in self._models.items() if name not in k[2])
    self.experts = self._served()
    return self.experts

  def warm_up(self) -> int:
    """Compile the programs of every bucket for the base and the live library: scoring at each (input, target)
    length and decoding (`SlotDecoder.warm_up`); returns how many programs ran."""
    models = [(self.base_model, None)]
    if self.live:
      models.append((self.library_model, self.live.routing("arrow", self.live.names(), 1)))
    lengths = text_model.buckets(text_model.bucket(self.max_input))
    count = 0
    for model, route in models:
      for source, target in itertools.product(lengths, lengths):
        model.score_ids([[1] * source], [[1] * target], None if route is None else [route])
        count += 1
      count += slots_lib.SlotDecoder(model, self.batch_size, self.max_input, self.max_tokens, route).warm_up()
    return count

  # Requests.

  def _submit(self, program: str, loader, kind: str, rows: list) -> sched.Job:
    job = sched.Job(program, loader, kind, rows, time.monotonic() + self.timeout_s)
    route = rows[0].route
    if route is not None:  # its experts' slots stay out of reuse until the job ends
      self.live.acquire(route.mask)
      job.future.add_done_callback(lambda _: self.live.release(route.mask))
    try:
      self.scheduler.submit(job)
    except sched.QueueFull:
      job.future.cancel()
      raise
    return job

  def _ids(self, texts: list, name: str) -> list:
    try:
      ids = self.base_model.tokenize(texts, truncate=False, name=name)
    except ValueError as e:
      raise RequestError(str(e), name) from None
    long = [i for i, row in enumerate(ids) if len(row) > self.max_input]
    if long:
      raise RequestError(f"{name}[{long[0]}] is longer than the server's {self.max_input} tokens; shorten it", name)
    return ids

  def completion(self, body: dict) -> tuple:
    """(the job, `format(results) -> choices`) of a /v1/completions body."""
    program, loader, route = self._resolve(body)
    prompts = _strings(body.get("prompt"), "prompt")
    max_tokens = _integer(body, "max_tokens", 16, 1, self.max_tokens)
    temperature = _real(body, "temperature", 1.0, 0.0, 100.0)
    top_p = _real(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    n = _integer(body, "n", 1, 1, MAX_ROWS)
    if n * len(prompts) > MAX_ROWS:
      raise RequestError(f"n x prompts is {n * len(prompts)}, over {MAX_ROWS}; split the request", "n")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
      raise RequestError(f"seed must be a non-negative integer or null, got {seed!r}", "seed")
    seed = int(np.random.randint(2**31)) if seed is None else seed
    stop = [] if body.get("stop") is None else _strings(body["stop"], "stop")
    if len(stop) > MAX_STOP or not all(stop):
      raise RequestError(f"stop must hold 1..{MAX_STOP} non-empty strings", "stop")
    logprobs = body.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs != 0):
      raise RequestError(f"logprobs must be null or 0 (the chosen tokens' log-probabilities; alternatives are not "
                         f"returned), got {logprobs!r}", "logprobs")
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
      raise RequestError(f"echo must be true or false, got {echo!r}", "echo")
    ids = self._ids(prompts, "prompt")
    rows = [sched.GenerateRow(ids[i // n], max_tokens, temperature, top_p, text_model.prompt_key(seed, i), stop,
                              route) for i in range(len(prompts) * n)]
    job = self._submit(program, loader, "generate", rows)

    def format_(results):
      return [{"index": i, "text": (prompts[i // n] if echo else "") + r["text"], "finish_reason": r["finish_reason"],
               "logprobs": self._logprobs(r, prompts[i // n] if echo else "") if logprobs is not None else None}
              for i, r in enumerate(results)]
    return job, format_

  def _logprobs(self, result: dict, echoed: str) -> dict:
    """OpenAI's logprobs object for a completion: each generated token's text and log p; an echoed prompt is
    one entry of log p null (an encoder input has no likelihood under the decoder)."""
    tokens = [vocab_lib.decode(self.base_model.vocabulary, [t]) for t in result["token_ids"]]
    logps = list(result["logprobs"])
    if echoed:
      tokens, logps = [echoed] + tokens, [None] + logps
    offsets = np.cumsum([0] + [len(t) for t in tokens[:-1]]).tolist()
    return {"tokens": tokens, "token_logprobs": logps, "top_logprobs": None, "text_offset": offsets}

  def score(self, body: dict) -> tuple:
    """(the job, `format(results)`) of a /v1/score body: `items`, a list of {input, choices}."""
    program, loader, route = self._resolve(body)
    items = body.get("items")
    if not isinstance(items, list) or not items or len(items) > MAX_ROWS:
      raise RequestError(f"items must be a list of 1..{MAX_ROWS} objects {{input, choices}}", "items")
    inputs, targets, spans = [], [], []
    for i, item in enumerate(items):
      if not isinstance(item, dict) or not isinstance(item.get("input"), str):
        raise RequestError(f"items[{i}] must be an object with a string input and a list of choices", "items")
      choices = _strings(item.get("choices"), f"items[{i}].choices", allow_one=False)
      spans.append((len(targets), choices))
      inputs += [item["input"]] * len(choices)
      targets += choices
    if len(targets) > 4 * MAX_ROWS:
      raise RequestError(f"the items hold {len(targets)} choices, over {4 * MAX_ROWS}; split the request", "items")
    rows = [sched.ScoreRow(x, y, route) for x, y in zip(self._ids(inputs, "input"), self._ids(targets, "choices"))]
    job = self._submit(program, loader, "score", rows)

    def format_(results):
      out = []
      for start, choices in spans:
        scores = results[start:start + len(choices)]
        index = int(np.argmax([s["mean_logprob"] for s in scores]))
        out.append({"index": index, "choice": choices[index], "scores": scores})
      return out
    return job, format_

  def close(self) -> None:
    self.scheduler.close()
