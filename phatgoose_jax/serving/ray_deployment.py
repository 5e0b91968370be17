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
        autoscaling_config: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 16}

`args` holds `engine`, the `Engine`'s keyword arguments (base, library, top_k, batch_size, max_queue, timeout_s,
dtype, max_models), and the deployment's options: `num_replicas` (a number, default 1) or `autoscaling_config`,
and `ray_actor_options` (default one CPU per replica). A `deployments:` entry named `PhatgooseServer` in the
same file overrides them, as for any Ray Serve application.
"""
from ray import serve

from phatgoose_jax.serving import app as app_lib

DEPLOYMENT_OPTIONS = ("num_replicas", "autoscaling_config", "ray_actor_options", "max_ongoing_requests")


@serve.deployment(name="PhatgooseServer", ray_actor_options={"num_cpus": 1})
@serve.ingress()
class PhatgooseServer:
  """One replica: the application of an `Engine` built from `engine_options` when the replica starts."""

  def __init__(self, engine_options: dict):
    self.engine_options = dict(engine_options)

  def __serve_build_asgi_app__(self):
    return app_lib.create_app(self.engine_options)


def build_app(args: dict) -> serve.Application:
  """Ray Serve's application builder (`import_path: phatgoose_jax.serving.ray_deployment:build_app`): the
  deployment of `args["engine"]` with the deployment options of `args` (module docstring)."""
  unknown = sorted(set(args) - {"engine", *DEPLOYMENT_OPTIONS})
  if unknown or "base" not in args.get("engine", {}):
    raise ValueError(f"args must hold engine: {{base: ..., ...}} and only the deployment options "
                     f"{list(DEPLOYMENT_OPTIONS)}; got {sorted(args)}")
  options = {k: args[k] for k in DEPLOYMENT_OPTIONS if k in args}
  return PhatgooseServer.options(**options).bind(dict(args["engine"]))
