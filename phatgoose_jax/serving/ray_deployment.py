"""The server's application as replicas under Ray Serve: each replica builds its own `Engine` and the same
FastAPI application (`app.create_app`, wrapped with `serve.ingress`); Ray Serve's proxy spreads the requests
over the replicas and scales their number.

  serve run serve.yaml        # Ray Serve's own config file:

  proxy_location: EveryNode
  http_options: {host: 127.0.0.1, port: 8000}
  applications:
    - name: phatgoose
      route_prefix: /
      import_path: phatgoose_jax.serving.ray_deployment:build_app
      args:
        engine: {base: demo/base, library: demo/library, top_k: 2, batch_size: 8}
        gin: ["partitioning.make_mesh.model = 4"]
        autoscaling_config: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 16}

`args` holds `engine`, the `Engine`'s keyword arguments (base, library, top_k, batch_size, max_queue, timeout_s,
dtype, max_models); `gin_file` and `gin`, lists of gin files and bindings: the mesh and rules as `phatgoose serve
--gin_file/--gin` takes them, which every replica parses before it builds its engine (checked here first, so
that a bad one fails the build, not each replica); and the deployment's options: `num_replicas` (a number,
default 1) or `autoscaling_config`, and `ray_actor_options` (default one CPU per replica). A `deployments:` entry
named `PhatgooseServer` in the same file overrides them, as for any Ray Serve application.
"""
from typing import Sequence

import gin
from ray import serve

from phatgoose_jax import main
from phatgoose_jax.cli import UsageError
from phatgoose_jax.serving import app as app_lib

GIN_OPTIONS = ("gin_file", "gin")
DEPLOYMENT_OPTIONS = ("num_replicas", "autoscaling_config", "ray_actor_options", "max_ongoing_requests")


@serve.deployment(name="PhatgooseServer", ray_actor_options={"num_cpus": 1})
@serve.ingress()
class PhatgooseServer:
  """One replica: the application of an `Engine` built from `engine_options` when the replica starts, under
  the gin files and bindings given (the mesh and rules; this replica's process holds only them)."""

  def __init__(self, engine_options: dict, gin_files: Sequence[str] = (), bindings: Sequence[str] = ()):
    main.parse(gin_files, bindings, require=False)
    self.engine_options = dict(engine_options)

  def __serve_build_asgi_app__(self):
    return app_lib.create_app(self.engine_options)


def build_app(args: dict) -> serve.Application:
  """Ray Serve's application builder (`import_path: phatgoose_jax.serving.ray_deployment:build_app`): the
  deployment of `args["engine"]` with the deployment options of `args` (module docstring)."""
  unknown = sorted(set(args) - {"engine", *GIN_OPTIONS, *DEPLOYMENT_OPTIONS})
  if unknown or "base" not in args.get("engine", {}):
    raise ValueError(f"args must hold engine: {{base: ..., ...}} and only {list(GIN_OPTIONS)} and the "
                     f"deployment options {list(DEPLOYMENT_OPTIONS)}; got {sorted(args)}")
  gin_files, bindings = (list(args.get(k, [])) for k in GIN_OPTIONS)
  _check_gin(gin_files, bindings)
  options = {k: args[k] for k in DEPLOYMENT_OPTIONS if k in args}
  return PhatgooseServer.options(**options).bind(dict(args["engine"]), gin_files, bindings)


def _check_gin(gin_files: Sequence[str], bindings: Sequence[str]) -> None:
  """Parses the replicas' gin in the building process and clears it again: a ValueError naming the bad file
  or binding."""
  try:
    main.parse(gin_files, bindings, require=False)
  except UsageError as e:
    raise ValueError(str(e)) from e
  finally:
    gin.clear_config()
