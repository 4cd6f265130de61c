"""Run by tests/test_cluster_placement.py inside the local multi-node cluster (RAY_ADDRESS set):
deploy the served app of a config, ask every model's replicas where they run, print one JSON line.

Not a test module itself: the pytest process may already hold the session's own Ray.
"""

from __future__ import annotations

import asyncio
import json
import sys

import ray
from ray import serve

from moa_ray.config import load_config
from moa_ray.serve.app import build_app
from moa_ray.serve.builder import agent_deployment_name

APP = "placement"


async def _probe(handle, calls: int) -> list[str]:
    replies = await asyncio.gather(*(handle.info.remote() for _ in range(calls)))
    return sorted({r["node_id"] for r in replies})


def main(config_path: str, calls: int = 24) -> None:
    ray.init(logging_level="ERROR", log_to_driver=False)
    config = load_config(config_path)
    serve.start(proxy_location="Disabled")
    serve.run(build_app(config), name=APP, route_prefix=None)
    try:
        nodes = {n["NodeID"]: sorted(k for k in n["Resources"] if k.startswith("pool_")) for n in ray.nodes() if n["Alive"]}
        placed = {}
        for model in config.models:
            handle = serve.get_deployment_handle(agent_deployment_name(model), APP)
            placed[model] = asyncio.run(_probe(handle, calls))
        actors = {}  # the GCS actor table: every live replica's node, not only those that answered
        for actor in ray._private.state.actors().values():
            name = actor.get("Name") or ""
            if actor.get("State") == "ALIVE" and name.startswith(f"SERVE_REPLICA::{APP}#agent-"):
                model = name.split("#")[1].removeprefix("agent-")
                actors.setdefault(model, []).append(actor["Address"]["NodeID"])
        print("PLACEMENT " + json.dumps({"nodes": nodes, "answered_from": placed, "replica_nodes": actors}), flush=True)
    finally:
        serve.delete(APP)
        serve.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
