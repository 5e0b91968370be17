"""The server under the official `openai` client and raw HTTP on 127.0.0.1: completions, logprobs and scores
equal the TextModel's for the same model, router and prompt; 64 concurrent clients mixing models, routers,
expert subsets and lengths each get their single-request answer; bad input is a 4xx JSON error naming the
problem and the server keeps serving; a client that disconnects is cancelled; live add / remove of an expert;
SIGTERM finishes the request in flight."""
import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import jax
import numpy as np
import openai
import pytest
import uvicorn

import phatgoose_jax
from phatgoose_jax.checkpoints import hf
from phatgoose_jax.serving import app as app_lib
from phatgoose_jax.serving import engine as engine_lib

import random_trees as trees

PROMPTS = ["the cat sat", "on a mat", "x", "a longer prompt than the others"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("base"))
  hf.save_hf(path, trees.TINY, trees.random_params())
  return path


@pytest.fixture(scope="module")
def libraries(tmp_path_factory, base_dir):
  """(served, full): the served library holds experts x and y; full holds x, y and z."""
  tmp = tmp_path_factory.mktemp("library")
  full, served = trees.imported_library(tmp, base_dir, "x,y,z"), str(tmp / "served")
  shutil.copytree(full, served, ignore=shutil.ignore_patterns("z"))
  return served, full


class Server:
  """A uvicorn server of an Engine in a thread of this process."""

  def __init__(self, engine):
    self.engine = engine
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    config = uvicorn.Config(app_lib.create_app(engine), host="127.0.0.1", port=self.port, log_level="warning")
    self.server = uvicorn.Server(config)
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    deadline = time.monotonic() + 30
    while not self.server.started:
      assert time.monotonic() < deadline, "the server did not start"
      time.sleep(0.05)
    self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=600)

  def stop(self):
    self.server.should_exit = True
    self.thread.join(30)


@pytest.fixture(scope="module")
def server(base_dir, libraries):
  # Requests wait behind the first compilation of each program they need, minutes on a loaded 2-core machine:
  # these tests are about answers, not latency, so the server's timeout (and the client's) is generous.
  engine = engine_lib.Engine(base_dir, libraries[0], top_k=1, max_top_k=2, batch_size=4, max_queue=64,
                             max_tokens=64, timeout_s=600)
  running = Server(engine)
  yield running
  running.stop()


@pytest.fixture(scope="module")
def routed(base_dir, libraries):
  return phatgoose_jax.load(base_dir, libraries[0], router="phatgoose", top_k=1, batch_size=4)


def test_models_are_the_base_each_expert_and_each_router(server, base_dir):
  ids = [m.id for m in server.client.models.list().data]
  assert ids == [os.path.basename(base_dir), "expert:x", "expert:y", *engine_lib.ROUTERS]
  for model in ids:
    assert server.client.completions.create(model=model, prompt="a", max_tokens=2, temperature=0).choices


def test_openai_completions_and_logprobs_equal_generate(server, routed):
  for temperature, seed in ((0.0, None), (0.8, 7)):
    response = server.client.completions.create(model="phatgoose", prompt=PROMPTS, max_tokens=6,
                                                temperature=temperature, top_p=0.9, seed=seed, logprobs=0)
    expected = routed.generate(PROMPTS, max_new_tokens=6, temperature=temperature, top_p=0.9,
                               seed=0 if seed is None else seed)
    assert [c.index for c in response.choices] == list(range(len(PROMPTS)))
    for choice, want in zip(response.choices, expected):
      assert (choice.text, choice.finish_reason) == (want["text"], want["finish_reason"])
      np.testing.assert_allclose(choice.logprobs.token_logprobs, want["logprobs"], rtol=1e-5, atol=1e-6)
    assert response.usage.completion_tokens == sum(len(w["token_ids"]) for w in expected)


def test_n_echo_stop_and_a_single_expert(server, base_dir, libraries):
  alone = phatgoose_jax.load(base_dir, libraries[0], router="merged", experts=["x"], batch_size=4)
  response = server.client.completions.create(model="expert:x", prompt="the cat", max_tokens=5, n=3,
                                              temperature=1.0, seed=3, echo=True, logprobs=0)
  expected = alone.generate(["the cat"] * 3, max_new_tokens=5, temperature=1.0, seed=3)
  assert [c.text for c in response.choices] == ["the cat" + w["text"] for w in expected]
  assert all(c.logprobs.tokens[0] == "the cat" and c.logprobs.token_logprobs[0] is None for c in response.choices)
  greedy = alone.generate(["on a"], max_new_tokens=8)[0]
  if greedy["text"]:
    stop = greedy["text"][len(greedy["text"]) // 2:][:1] or greedy["text"][-1]
    response = server.client.completions.create(model="expert:x", prompt="on a", max_tokens=8, temperature=0,
                                                stop=stop)
    assert response.choices[0].text == alone.generate(["on a"], max_new_tokens=8, stop=stop)[0]["text"]


def test_score_equals_choose(server, routed):
  items = [{"input": "is it?", "choices": ["yes", "no", "maybe"]}, {"input": "the cat", "choices": ["sat", "ran"]}]
  response = httpx.post(f"{server.url}/v1/score", json={"model": "phatgoose", "items": items}, timeout=60).json()
  for got, item in zip(response["choices"], items):
    want = routed.choose(item["input"], item["choices"])
    assert (got["index"], got["choice"]) == (want["index"], want["choice"])
    np.testing.assert_allclose([s["mean_logprob"] for s in got["scores"]],
                               [s["mean_logprob"] for s in want["scores"]], rtol=1e-5)


def bad_bodies(max_length: int) -> list:
  return [
    (b"{not json", 400, "not JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"prompt": "\xff\xfe"}', 400, "not UTF-8"),
    ({"model": "nope", "prompt": "a"}, 400, "unknown model"),
    ({"model": "phatgoose", "prompt": "a", "experts": ["x", "w"]}, 400, "unknown experts"),
    ({"prompt": "a" * (max_length + 1)}, 400, "longer than"),
    ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": "phatgoose", "prompt": "a", "top_k": 3}, 400, "top_k"),
    ({"model": "phatgoose", "prompt": "a", "top_k": 0}, 400, "top_k"),
    ({"prompt": "a", "n": 1000}, 400, "n must"),
    ({"prompt": ["a"] * 40, "n": 2}, 400, "n x prompts"),
    ({"prompt": 3}, 400, "prompt must"),
    ({"prompt": "a", "temperature": -1}, 400, "temperature"),
    ({"prompt": "a", "logprobs": 5}, 400, "logprobs"),
    ({"model": "expert:x", "prompt": "a", "top_k": 1}, 400, "top_k and experts"),
    (b"x" * (30 << 20), 413, "over"),
  ]


def test_bad_input_is_a_4xx_json_error_naming_it_and_serving_goes_on(server):
  for body, status, words in bad_bodies(server.engine.base_model.max_length):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server.url}/v1/completions", content=content, timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == status, (content[:40], response.text)
    assert words in response.json()["error"]["message"], response.text
  with pytest.raises(openai.BadRequestError, match="unknown model"):
    server.client.completions.create(model="nope", prompt="a")
  health = httpx.get(f"{server.url}/health").json()
  assert health["status"] == "ok" and health["mesh"] == {"data": jax.device_count(), "model": 1, "expert": 1}
  base = server.engine.base_name
  assert server.client.completions.create(model=base, prompt="a", max_tokens=2).choices[0].finish_reason in (
      "stop", "length")


def test_a_client_that_disconnects_is_cancelled_and_serving_goes_on(server):
  with pytest.raises(httpx.TimeoutException):
    httpx.post(f"{server.url}/v1/completions", json={"prompt": PROMPTS, "max_tokens": 64}, timeout=0.05)
  assert server.client.completions.create(model=server.engine.base_name, prompt="a", max_tokens=2).choices
  assert b"phatgoose_requests_total" in httpx.get(f"{server.url}/metrics").content


def _request(i: int, base: str) -> dict:
  models = [{"model": "phatgoose"}, {"model": "arrow", "top_k": 2}, {"model": "phatgoose", "experts": ["y"]},
            {"model": "expert:y"}, {"model": base}]
  return dict(models[i % len(models)], prompt=PROMPTS[i % 4] * (1 + i % 3), max_tokens=2 + i % 7,
              temperature=0.0 if i % 2 else 0.9, seed=i, logprobs=0)


def test_64_concurrent_clients_each_get_their_single_request_answer(server, base_dir):
  bodies = [_request(i, os.path.basename(base_dir)) for i in range(20)]

  def ask(body):
    start = time.monotonic()
    extensions = {k: body[k] for k in ("top_k", "experts") if k in body}
    response = server.client.completions.create(**{k: v for k, v in body.items() if k not in extensions},
                                                extra_body=extensions)
    return [(c.text, c.logprobs.token_logprobs) for c in response.choices], time.monotonic() - start

  alone = [ask(b)[0] for b in bodies]
  latencies, mismatches = [], []
  stop_at = time.monotonic() + float(os.environ.get("PHATGOOSE_LOAD_S", "10"))

  def client(c):
    done = 0
    while time.monotonic() < stop_at:
      i = (c * 7 + done) % len(bodies)
      got, seconds = ask(bodies[i])
      latencies.append(seconds)
      if [t for t, _ in got] != [t for t, _ in alone[i]]:
        mismatches.append((i, "text", got, alone[i]))
      elif not np.allclose(got[0][1], alone[i][0][1], rtol=1e-4, atol=1e-4):  # float32 rounding of other batches
        mismatches.append((i, "logprobs", got, alone[i]))
      done += 1
    return done

  with concurrent.futures.ThreadPoolExecutor(64) as pool:
    counts = list(pool.map(client, range(64)))
  p50, p99 = np.percentile(latencies, [50, 99])
  print(f"64 clients: {sum(counts)} requests, p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms")
  assert not mismatches, mismatches[:3]
  assert all(counts) and len(latencies) == sum(counts)


def test_live_add_and_remove_of_an_expert(server, base_dir, libraries):
  served, full = libraries
  items = [{"input": "is it?", "choices": ["yes", "no"]}]
  with pytest.raises(openai.BadRequestError, match="unknown experts"):
    server.client.completions.create(model="phatgoose", prompt="a", max_tokens=2, extra_body={"experts": ["z"]})
  shutil.copytree(os.path.join(full, "z"), os.path.join(served, "z"))
  assert httpx.post(f"{server.url}/v1/experts", json={"name": "z"}).json()["experts"] == ["x", "y", "z"]
  assert "expert:z" in [m.id for m in server.client.models.list().data]
  got = httpx.post(f"{server.url}/v1/score", json={"model": "phatgoose", "items": items}, timeout=60).json()
  fresh = phatgoose_jax.load(base_dir, full, router="phatgoose", top_k=1, batch_size=4).choose(**items[0])
  np.testing.assert_allclose([s["sum_logprob"] for s in got["choices"][0]["scores"]],
                             [s["sum_logprob"] for s in fresh["scores"]], rtol=1e-5)
  assert httpx.delete(f"{server.url}/v1/experts/z").json()["experts"] == ["x", "y"]
  assert httpx.post(f"{server.url}/v1/experts", json={"name": "w"}).status_code == 400
  shutil.rmtree(os.path.join(served, "z"))


def test_an_expert_added_live_takes_its_place_in_the_library_order(base_dir, tmp_path):
  """Served experts stack in the library's order (pool order, else as added), not by name: a later 'a' goes last."""
  from phatgoose_jax import cli  # pylint: disable=import-outside-toplevel
  from phatgoose_jax.checkpoints import reference  # pylint: disable=import-outside-toplevel
  library = trees.imported_library(tmp_path, base_dir, "x,y")
  engine = engine_lib.Engine(base_dir, library, top_k=1, batch_size=4)
  lora, gates = trees.random_expert(7, lora_scale=1.0)
  reference.save_reference(str(tmp_path / "a.safetensors"), [lora], [gates])
  assert cli.main(["library", "import-reference", str(tmp_path / "a.safetensors"), "--base", base_dir,
                   "--library", library, "--names", "a"]) == 0
  assert engine.add_expert("a") == ["x", "y", "a"]


def test_sigterm_finishes_the_request_in_flight(base_dir):
  port = free_port()
  proc = subprocess.Popen([sys.executable, "-m", "phatgoose_jax.cli", "serve", "--base", base_dir, "--port",
                           str(port), "--batch_size", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 120
    while True:
      assert time.monotonic() < deadline and proc.poll() is None, "the server did not start"
      try:
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
        break
      except httpx.TransportError:
        time.sleep(0.2)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      pending = pool.submit(httpx.post, f"http://127.0.0.1:{port}/v1/completions",
                            json={"prompt": PROMPTS, "max_tokens": 32}, timeout=120)
      time.sleep(0.5)
      proc.send_signal(signal.SIGTERM)
      response = pending.result()
    assert response.status_code == 200 and len(response.json()["choices"]) == 4
    # uvicorn shuts down gracefully, then re-raises the signal as its exit status
    assert proc.wait(60) == -signal.SIGTERM
    assert b"Application shutdown complete" in proc.stdout.read()
  finally:
    if proc.poll() is None:
      proc.kill()


def test_a_short_request_joins_and_leaves_while_a_long_one_decodes(server):
  """Iteration-level batching: a request sent while another decodes joins it between two steps and ends at its
  own length; both equal their single-request answers."""
  engine = server.engine
  base = engine.base_model
  prompt = next(p for p in PROMPTS if base.generate([p], max_new_tokens=48)[0]["finish_reason"] == "length")
  long_job, _ = engine.completion({"prompt": prompt, "max_tokens": 48, "temperature": 0})
  deadline = time.monotonic() + 60
  while not engine.scheduler._decoders:  # pylint: disable=protected-access
    assert time.monotonic() < deadline
    time.sleep(0.01)
  short_job, _ = engine.completion({"prompt": "x", "max_tokens": 2, "temperature": 0})
  short = short_job.future.result(60)
  assert not long_job.future.done(), "the short request waited for the long one"
  want = base.generate(["x"], max_new_tokens=2, seed=0)[0]
  assert short[0]["token_ids"] == want["token_ids"]
  np.testing.assert_allclose(short[0]["logprobs"], want["logprobs"], rtol=1e-5)
  assert long_job.future.result(120)[0]["text"] == base.generate([prompt], max_new_tokens=48)[0]["text"]


@pytest.mark.parametrize("body,router,experts", [({"model": "arrow", "experts": ["y"], "top_k": 1}, "arrow", ["y"]),
                                                 ({"model": "spectr", "top_k": 2}, "spectr", ["x", "y"]),
                                                 ({"model": "phatgoose", "experts": ["y", "x"]}, "phatgoose",
                                                  ["x", "y"])])
def test_every_router_and_subset_in_the_shared_program_equals_its_own_model(server, base_dir, libraries, body,
                                                                            router, experts):
  """One program serves every per-token router over any subset and top-k: each equals a model built for it
  (to float32 rounding: the shared program's matmuls span its 10 expert slots, the model's only its experts)."""
  top_k = body.get("top_k", 1)
  alone = phatgoose_jax.load(base_dir, libraries[0], router=router, top_k=top_k, experts=experts, batch_size=4)
  response = server.client.completions.create(prompt=PROMPTS, max_tokens=5, temperature=0.7, seed=2, logprobs=0,
                                              model=body["model"], extra_body={k: v for k, v in body.items()
                                                                               if k != "model"})
  for choice, want in zip(response.choices, alone.generate(PROMPTS, max_new_tokens=5, temperature=0.7, seed=2)):
    assert choice.text == want["text"]
    np.testing.assert_allclose(choice.logprobs.token_logprobs, want["logprobs"], rtol=1e-4, atol=1e-4)
  items = [{"input": "is it?", "choices": ["yes", "no", "maybe"]}]
  got = httpx.post(f"{server.url}/v1/score", json=dict(body, items=items), timeout=60).json()["choices"][0]
  np.testing.assert_allclose([s["sum_logprob"] for s in got["scores"]],
                             [s["sum_logprob"] for s in alone.choose(**items[0])["scores"]], rtol=1e-4, atol=1e-4)


def test_after_warm_up_no_request_compiles_not_even_an_expert_added_live(base_dir, libraries):
  from phatgoose_jax.models import _jit_score  # pylint: disable=import-outside-toplevel
  from phatgoose_jax.serving import slots  # pylint: disable=import-outside-toplevel
  served, full = libraries
  engine = engine_lib.Engine(base_dir, served, top_k=1, max_top_k=2, batch_size=4, max_tokens=16, max_input=32)
  try:
    assert engine.warm_up() > 0
    programs = [*slots.programs(engine.live.variables), *slots.programs(engine.base_model.variables), _jit_score]
    compiled = [f._cache_size() for f in programs]  # pylint: disable=protected-access
    shutil.copytree(os.path.join(full, "z"), os.path.join(served, "z"))
    engine.add_expert("z")
    bodies = [{"prompt": (p * r)[:31], "max_tokens": t, "temperature": temp, **extra}
              for p, r, t, temp, extra in zip(PROMPTS * 3, (1, 2, 3) * 4, (1, 5, 16, 9) * 3, (0.0, 0.9) * 6,
                                              ({"model": "phatgoose"}, {"model": "arrow", "experts": ["z"]},
                                               {"model": "spectr", "top_k": 2, "experts": ["x", "z"]}, {}) * 3)]
    jobs = [engine.completion(b)[0] for b in bodies]
    jobs += [engine.score({"model": "arrow", "items": [{"input": "a" * 30, "choices": ["b", "c" * 20]}]})[0]]
    assert all(len(j.future.result(120)) for j in jobs)
    engine.remove_expert("y")
    assert engine.completion({"model": "phatgoose", "prompt": "a"})[0].future.result(60)
    assert [f._cache_size() for f in programs] == compiled  # pylint: disable=protected-access
  finally:
    engine.close()
    shutil.rmtree(os.path.join(served, "z"), ignore_errors=True)


def test_a_live_library_slot_is_reused_only_out_of_flight(base_dir, libraries):
  from phatgoose_jax.serving import live_library  # pylint: disable=import-outside-toplevel
  live = live_library.LiveLibrary(base_dir, libraries[1], capacity=2, names=["x", "y"])
  with pytest.raises(ValueError, match="slots are in use"):
    live.add("z")
  mask = live.routing("phatgoose", ["x"], 1).mask
  live.acquire(mask)
  live.remove("x")
  with pytest.raises(ValueError, match="slots are in use"):
    live.add("z")  # a request in flight may still route to x's slot
  live.release(mask)
  assert live.add("z") == 0 and live.names() == ["z", "y"]


def test_a_full_queue_refuses_and_the_queued_requests_still_run(server):
  """Jobs waiting and sequences waiting for a slot count against max_queue; past it, QueueFull (the server's
  429); once the worker runs again every accepted request is answered."""
  from phatgoose_jax.serving import scheduler as sched  # pylint: disable=import-outside-toplevel
  model, gate = server.engine.base_model, threading.Event()
  scheduler = sched.Scheduler(max_queue=2, slots=1, max_input=32, max_new_tokens=4)
  row = lambda: sched.GenerateRow([5, 6, 1], 3, 0.0, 1.0, np.zeros(2, np.uint32), [])  # noqa: E731
  blocked = lambda: gate.wait(60) and model  # noqa: E731
  try:
    jobs = [sched.Job("m", blocked, "generate", [row()], time.monotonic() + 60)]
    scheduler.submit(jobs[0])
    deadline = time.monotonic() + 30
    while scheduler.jobs.qsize() or scheduler.queue_length() != 1:  # taken, its sequence waits for the model
      assert time.monotonic() < deadline
      time.sleep(0.01)
    jobs.append(sched.Job("m", blocked, "generate", [row()], time.monotonic() + 60))
    scheduler.submit(jobs[1])
    with pytest.raises(sched.QueueFull, match="queue is full"):
      scheduler.submit(sched.Job("m", blocked, "generate", [row()], time.monotonic() + 60))
    gate.set()
    want = model.generate_ids([[5, 6, 1]], 3)[0]["token_ids"]
    assert all(j.future.result(60)[0]["token_ids"] == want for j in jobs)
  finally:
    gate.set()
    scheduler.close()


SHARDED_SERVER = r'''
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import gin, jax
from phatgoose_jax import main  # noqa: F401 (gin registrations)
from phatgoose_jax.serving import engine as engine_lib
gin.parse_config(["partitioning.make_mesh.data = 2", "partitioning.make_mesh.model = 2"])
base, library = sys.argv[1:3]
engine = engine_lib.Engine(base, library, top_k=1, batch_size=4, max_tokens=8)
specs = {str(x.sharding.spec) for x in jax.tree.leaves(engine.live.variables)}
body = {"model": "phatgoose", "prompt": ["the cat sat", "x"], "max_tokens": 6, "temperature": 0, "logprobs": 0}
job, format_ = engine.completion(body)
out = format_(job.future.result(300))
engine.close()
print(json.dumps({"specs": sorted(specs), "devices": len(jax.devices()),
                  "texts": [c["text"] for c in out], "logprobs": [c["logprobs"]["token_logprobs"] for c in out]}))
'''


def test_a_model_split_over_a_mesh_serves_the_same_answers(base_dir, libraries, tmp_path):
  """The mesh and rules of evaluation (gin: partitioning.make_mesh) split the served library over 4 devices
  (data 2 x model 2); its completions equal the single-device server's."""
  engine = engine_lib.Engine(base_dir, libraries[0], top_k=1, batch_size=4, max_tokens=8)
  try:
    body = {"model": "phatgoose", "prompt": ["the cat sat", "x"], "max_tokens": 6, "temperature": 0, "logprobs": 0}
    job, format_ = engine.completion(body)
    want = format_(job.future.result(120))
  finally:
    engine.close()
  script = tmp_path / "sharded_server.py"
  script.write_text(SHARDED_SERVER)
  done = subprocess.run([sys.executable, str(script), base_dir, libraries[0]], capture_output=True, text=True,
                        timeout=600, check=True)
  got = json.loads(done.stdout.strip().splitlines()[-1])
  assert got["devices"] == 4 and any("model" in spec for spec in got["specs"]), got["specs"]
  assert got["texts"] == [c["text"] for c in want]
  for mine, theirs in zip(got["logprobs"], want):
    np.testing.assert_allclose(mine, theirs["logprobs"]["token_logprobs"], rtol=1e-4, atol=1e-5)
