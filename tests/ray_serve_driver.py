"""A local Ray instance on 127.0.0.1 serving `ray_deployment.build_app(ARGS)` on PORT, until standard input closes.

  python ray_serve_driver.py PORT ARGS_JSON

Prints one JSON line once the application is ready: {"replicas": {state: count}} of its deployment."""
import json
import sys

import ray
from ray import serve

from phatgoose_jax.serving import ray_deployment


def main(port: int, args: dict) -> None:
  ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
  try:
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(ray_deployment.build_app(args), name="phatgoose", route_prefix="/")
    deployment = serve.status().applications["phatgoose"].deployments["PhatgooseServer"]
    print(json.dumps({"replicas": {str(k): v for k, v in deployment.replica_states.items()}}), flush=True)
    sys.stdin.read()
    serve.shutdown()
  finally:
    ray.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), json.loads(sys.argv[2]))
