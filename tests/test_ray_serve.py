"""The server's application as two Ray Serve replicas (`serving/ray_deployment.py`) on a local Ray instance
on 127.0.0.1, each splitting the model over 2 devices by the gin bindings it is given, answers as the same
application in this process on one device: models, greedy and seeded completions with logprobs, scores. Ray
runs in a child process (`ray_serve_driver.py`), bounded by DEADLINE_S."""
import json
import os
import pathlib
import select
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from fastapi import testclient

from phatgoose_jax import cli
from phatgoose_jax.checkpoints import hf, reference
from phatgoose_jax.serving import app as app_lib
from phatgoose_jax.serving import ray_deployment

import random_trees as trees

DRIVER = str(pathlib.Path(__file__).with_name("ray_serve_driver.py"))
SPLIT_DEVICES, MESH = "--xla_force_host_platform_device_count=2", "model = 2"  # each replica's devices, mesh
DEADLINE_S = 240  # Ray's start, two replicas loading the model, the requests and the shutdown
REQUESTS = [
    ("/v1/completions", {"model": "phatgoose", "prompt": ["the cat sat", "x"], "max_tokens": 6, "temperature": 0,
                         "logprobs": 0}),
    ("/v1/completions", {"model": "phatgoose", "prompt": "on a mat", "max_tokens": 6, "temperature": 0.9,
                         "top_p": 0.9, "seed": 5, "n": 2, "logprobs": 0}),
    ("/v1/completions", {"model": "expert:x", "prompt": "the cat", "max_tokens": 4, "temperature": 0, "echo": True,
                         "logprobs": 0}),
    ("/v1/score", {"model": "phatgoose", "items": [{"input": "is it?", "choices": ["yes", "no"]}]}),
]


@pytest.fixture(scope="module")
def engine_options(tmp_path_factory):
  """An Engine's options: a tiny base and a library of two gated experts, x and y."""
  tmp = tmp_path_factory.mktemp("served")
  hf.save_hf(str(tmp / "base"), trees.TINY, trees.random_params())
  experts = [trees.random_expert(i, lora_scale=1.0) for i in range(2)]
  reference.save_reference(str(tmp / "reference.safetensors"), [e[0] for e in experts], [e[1] for e in experts])
  assert cli.main(["library", "import-reference", str(tmp / "reference.safetensors"), "--base", str(tmp / "base"),
                   "--library", str(tmp / "lib"), "--names", "x,y"]) == 0
  return {"base": str(tmp / "base"), "library": str(tmp / "lib"), "top_k": 1, "batch_size": 4}


def answers(get, post) -> list:
  """The models list, then each request's response without its id and creation time."""
  out = [get("/v1/models")]
  for path, body in REQUESTS:
    out.append({k: v for k, v in post(path, body).items() if k not in ("id", "created")})
  return out


def assert_same(got, want):
  """Equal JSON, floats (log-probabilities, scores) to float rounding (of a model split over devices)."""
  if isinstance(want, float):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  elif isinstance(want, dict):
    assert sorted(got) == sorted(want)
    for key in want:
      assert_same(got[key], want[key])
  elif isinstance(want, list):
    assert len(got) == len(want)
    for g, w in zip(got, want):
      assert_same(g, w)
  else:
    assert got == want


def ready_line(driver: subprocess.Popen, deadline: float) -> dict:
  if not select.select([driver.stdout], [], [], max(deadline - time.monotonic(), 0))[0]:
    raise TimeoutError(f"Ray Serve did not start within {DEADLINE_S} s")
  line = driver.stdout.readline()
  assert line, f"the Ray driver exited with {driver.wait()}"
  return json.loads(line)


def test_build_app_refuses_args_without_an_engine_base():
  with pytest.raises(ValueError, match="engine"):
    ray_deployment.build_app({"replicas": 2})


def test_build_app_refuses_a_bad_gin_binding_before_any_replica_starts():
  with pytest.raises(ValueError, match="make_mesh.modle"):
    ray_deployment.build_app({"engine": {"base": "b"}, "gin": ["partitioning.make_mesh.modle = 2"]})


def test_two_ray_serve_replicas_answer_as_the_in_process_app(engine_options):
  with testclient.TestClient(app_lib.create_app(engine_options)) as local:
    expected = answers(lambda p: local.get(p).json(), lambda p, b: local.post(p, json=b).json())
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  deadline = time.monotonic() + DEADLINE_S
  args = {"engine": engine_options, "num_replicas": 2, "gin": [f"partitioning.make_mesh.{MESH}"],
          "ray_actor_options": {"num_cpus": 1, "runtime_env": {"env_vars": {"XLA_FLAGS": SPLIT_DEVICES}}}}
  driver = subprocess.Popen([sys.executable, DRIVER, str(port), json.dumps(args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
  try:
    assert ready_line(driver, deadline) == {"replicas": {"RUNNING": 2}}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=max(deadline - time.monotonic(), 1)) as ray:
      for _ in range(3):  # the proxy spreads the rounds over both replicas
        assert ray.get("/health").json()["mesh"] == {"data": 1, "model": 2, "expert": 1}
        assert_same(answers(lambda p: ray.get(p).json(), lambda p, b: ray.post(p, json=b).json()), expected)
    driver.stdin.close()
    assert driver.wait(max(deadline - time.monotonic(), 1)) == 0
  finally:
    if driver.poll() is None:
      os.killpg(driver.pid, signal.SIGKILL)
      driver.wait()
