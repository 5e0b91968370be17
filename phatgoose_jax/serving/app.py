"""The OpenAI-compatible HTTP API of an `Engine`, as a FastAPI application (`create_app`).

  GET  /v1/models            the base, `expert:<name>` per library expert, and each router over the library
  POST /v1/completions       model, prompt (str | list), max_tokens, temperature, top_p, seed, stop, n, logprobs,
                             echo; extensions top_k and experts (a subset of the library) for routers
  POST /v1/score             model, items: [{input, choices}] -> per item the choices' scores and the choice
  POST /v1/experts           {name}: serve a library entry added since start-up; DELETE /v1/experts/{name}
  GET  /health, GET /metrics (Prometheus text: requests, queue length, batch sizes, generated tokens, tokens/s)

Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a body the client can fix,
404 unknown path, 413 a body over `MAX_BODY_BYTES`, 429 a full queue, 500 a model that failed to load or run,
503 shutting down, 504 a request past its timeout. A client that disconnects while waiting has its request cancelled.
"""
import asyncio
import concurrent.futures
import contextlib
import json
import time
import uuid

import fastapi
import prometheus_client
from fastapi import responses
from starlette.exceptions import HTTPException

from phatgoose_jax.serving import engine as engine_lib
from phatgoose_jax.serving import scheduler as sched

MAX_BODY_BYTES = 1 << 20
POLL_S = 0.05


def error(status: int, message: str, param=None, kind: str = "invalid_request_error") -> responses.JSONResponse:
  return responses.JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


class Metrics:
  """The server's Prometheus metrics, in a registry of its own."""

  def __init__(self):
    self.registry = prometheus_client.CollectorRegistry()
    self.requests = prometheus_client.Counter("phatgoose_requests", "HTTP requests by path and status",
                                              ["path", "status"], registry=self.registry)
    self.queue = prometheus_client.Gauge("phatgoose_queue_length", "jobs waiting for a batch", registry=self.registry)
    self.batch = prometheus_client.Histogram("phatgoose_batch_rows", "rows of each scoring batch and sequences "
                                             "of each decoder step", ["kind"],
                                             buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
    self.tokens = prometheus_client.Counter("phatgoose_generated_tokens", "tokens generated",
                                            registry=self.registry)
    self.tokens_per_s = prometheus_client.Gauge("phatgoose_tokens_per_second",
                                                "generated tokens per second of the last decoder step",
                                                registry=self.registry)

  def on_batch(self, kind: str, rows: int, tokens: int, seconds: float) -> None:
    self.batch.labels(kind).observe(rows)
    if kind == "generate":
      self.tokens.inc(tokens)
      self.tokens_per_s.set(tokens / max(seconds, 1e-9))


async def read_json(request: fastapi.Request) -> dict:
  """The request's JSON object; RequestError (or 413) naming what is wrong with the bytes."""
  size = request.headers.get("content-length")
  if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
    raise HTTPException(413, f"the request body has {size} bytes, over {MAX_BODY_BYTES}")
  data = bytearray()
  async for chunk in request.stream():
    data += chunk
    if len(data) > MAX_BODY_BYTES:
      raise HTTPException(413, f"the request body is over {MAX_BODY_BYTES} bytes")
  try:
    body = json.loads(bytes(data).decode("utf-8"))
  except UnicodeDecodeError as e:
    raise engine_lib.RequestError(f"the body is not UTF-8 ({e.reason} at byte {e.start})") from None
  except json.JSONDecodeError as e:
    raise engine_lib.RequestError(f"the body is not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
  if not isinstance(body, dict):
    raise engine_lib.RequestError(f"the body must be a JSON object, got {type(body).__name__}")
  return body


async def wait(request: fastapi.Request, job: sched.Job):
  """The job's results; None when the client disconnected first (the job is then cancelled). TimeoutError past
  the job's deadline."""
  future = asyncio.wrap_future(job.future)
  while True:
    done, _ = await asyncio.wait([future], timeout=POLL_S)
    if done:
      return future.result()
    if time.monotonic() > job.deadline:
      job.cancelled = True
      raise TimeoutError("the request ran past the server's timeout; retry later or ask for fewer tokens")
    if await request.is_disconnected():
      job.cancelled = True
      return None


def create_app(engine_or_config) -> fastapi.FastAPI:
  """The application of an `Engine`, or of the keyword arguments of one (a dict, plus `warm_up`: compile every
  bucket before serving), built at start-up and closed (queued work run, then the worker stopped) at shutdown."""
  metrics = Metrics()
  state = {}

  @contextlib.asynccontextmanager
  async def lifespan(_):
    if isinstance(engine_or_config, engine_lib.Engine):
      state["engine"] = engine_or_config
      engine_or_config.scheduler.on_batch = metrics.on_batch
    else:
      config = dict(engine_or_config)
      warm_up = config.pop("warm_up", False)
      state["engine"] = await asyncio.to_thread(engine_lib.Engine, **config, on_batch=metrics.on_batch)
      if warm_up:
        await asyncio.to_thread(state["engine"].warm_up)
    yield
    await asyncio.to_thread(state["engine"].close)

  app = fastapi.FastAPI(title="phatgoose", lifespan=lifespan)

  @app.middleware("http")
  async def count(request: fastapi.Request, call_next):
    response = await call_next(request)
    metrics.requests.labels(request.url.path if response.status_code != 404 else "other",
                            str(response.status_code)).inc()
    return response

  @app.exception_handler(engine_lib.RequestError)
  async def bad_request(_, e: engine_lib.RequestError):
    return error(400, str(e), e.param)

  @app.exception_handler(HTTPException)
  async def http_error(_, e: HTTPException):
    return error(e.status_code, str(e.detail))

  @app.exception_handler(fastapi.exceptions.RequestValidationError)
  async def invalid(_, e):
    return error(400, "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()))

  async def run(request: fastapi.Request, make_job, obj: str):
    body = await read_json(request)
    engine = state["engine"]
    try:
      job, format_ = make_job(engine)(body)
    except sched.QueueFull as e:
      return error(429, str(e), kind="rate_limit_error")
    metrics.queue.set(engine.scheduler.queue_length())
    try:
      results = await wait(request, job)
    except TimeoutError as e:
      return error(504, str(e), kind="timeout")
    except concurrent.futures.CancelledError:
      return error(503, "the server shut down before the request ran", kind="unavailable")
    except Exception as e:  # pylint: disable=broad-except
      return error(500, f"the model failed on this request: {e}", kind="server_error")
    if results is None:
      return error(499, "the client disconnected")
    return {"id": f"{obj}-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()),
            "model": body.get("model", engine.base_name), "choices": format_(results),
            "usage": _usage(results) if obj == "text_completion" else None}

  @app.post("/v1/completions")
  async def completions(request: fastapi.Request):
    return await run(request, lambda e: e.completion, "text_completion")

  @app.post("/v1/score")
  async def score(request: fastapi.Request):
    return await run(request, lambda e: e.score, "score")

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "phatgoose"}
                                       for n in state["engine"].model_names()]}

  @app.post("/v1/experts")
  async def add_expert(request: fastapi.Request):
    body = await read_json(request)
    return {"experts": state["engine"].add_expert(body.get("name"))}

  @app.delete("/v1/experts/{name}")
  async def remove_expert(name: str):
    return {"experts": state["engine"].remove_expert(name)}

  @app.get("/health")
  async def health():
    return {"status": "ok", "queue_length": state["engine"].scheduler.queue_length(),
            "mesh": state["engine"].mesh_shape()}

  @app.get("/metrics")
  async def metrics_text():
    metrics.queue.set(state["engine"].scheduler.queue_length())
    return responses.Response(prometheus_client.generate_latest(metrics.registry),
                              media_type=prometheus_client.CONTENT_TYPE_LATEST)

  return app


def _usage(results: list) -> dict:
  completion = sum(len(r["token_ids"]) for r in results)
  return {"completion_tokens": completion, "total_tokens": completion}
