"""Ray Serve autoscaling of a vLLM (Ray Serve LLM) deployment on a local multi-node cluster.

A head node plus one worker declaring the pool ``pool_vllm`` with 4 logical CPUs (room for two
vLLM CPU replicas of two CPUs each); the ``embedded-vllm`` model is deployed there with
``autoscaling: {min_replicas: 1, max_replicas: 2, target_ongoing_requests: 2}``. Sustained load
(``--clients`` concurrent callers for ``--load-s`` seconds) should take it to 2 replicas, and the
quiet after it back to 1. Replica counts are sampled every 2 s from ``serve.status()``.

    python -m bench.vllm_autoscale --load-s 150 --clients 6 [--out runs/autoscale]

It prints the timeline (seconds, replicas running / starting, calls in flight, calls done) and ends
with ``replicas peak <n> final <n>`` (expected: peak 2, final 1). ``--out`` also writes the timeline
as Parquet and a PNG plot.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path
from typing import Any

# Ray reads its auth mode when imported (below, through the cluster helpers); local 2.59+ clusters use tokens.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from cluster.local_cluster import LocalCluster, WorkerSpec
from moa_ray.chat import ChatParams, as_messages
from moa_ray.config import load_config, parse_config

APP_NAME = "bench-autoscale"
MODEL = "smollm2-vllm"
POOL = "pool_vllm"


def autoscaled_config(upscale_delay_s: float, downscale_delay_s: float) -> Any:
    presets = load_config().model_dump(mode="json", exclude_none=True)
    model = {
        **presets["models"][MODEL],
        "pool": POOL,
        "autoscaling": {
            "min_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 2,
            "upscale_delay_s": upscale_delay_s,
            "downscale_delay_s": downscale_delay_s,
        },
    }
    return parse_config({"models": {MODEL: model}})


def replica_counts() -> dict[str, int]:
    from ray import serve

    try:
        deployment = serve.status().applications[APP_NAME].deployments[f"agent-{MODEL}"]
    except KeyError:
        return {}
    return {str(state): n for state, n in deployment.replica_states.items()}


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from moa_ray.serve.deploy import deploy_models

    config = autoscaled_config(args.upscale_delay_s, args.downscale_delay_s)
    t = time.perf_counter()
    agent = deploy_models(config, [MODEL], app_name=APP_NAME)[MODEL]
    print(f"deployed {MODEL} (min 1, max 2 replicas) in {time.perf_counter() - t:.1f}s", flush=True)
    timeline: list[dict[str, Any]] = []
    state = {"in_flight": 0, "done": 0, "errors": 0, "phase": "load"}
    start = time.perf_counter()

    async def client(i: int) -> None:
        prompt = as_messages(f"Write a long story about dragon number {i} who learns to cook.")
        while time.perf_counter() - start < args.load_s:
            state["in_flight"] += 1
            try:
                await agent.chat(prompt, ChatParams(max_tokens=128, temperature=0.8))
                state["done"] += 1
            except Exception:  # noqa: BLE001 - counted: a replica being replaced may fail a call
                state["errors"] += 1
            finally:
                state["in_flight"] -= 1

    async def sample() -> None:
        while True:
            counts = await asyncio.to_thread(replica_counts)
            row = {
                "t_s": round(time.perf_counter() - start, 1),
                "phase": state["phase"],
                "running": counts.get("RUNNING", 0),
                "starting": counts.get("STARTING", 0) + counts.get("PENDING_MIGRATION", 0),
                "stopping": counts.get("STOPPING", 0),
                "in_flight": state["in_flight"],
                "done": state["done"],
            }
            timeline.append(row)
            print(
                f"{row['t_s']:7.1f}s  {row['phase']:5s}  running {row['running']}  starting {row['starting']}  "
                f"stopping {row['stopping']}  in flight {row['in_flight']:2d}  done {row['done']}",
                flush=True,
            )
            if state["phase"] == "quiet" and row["running"] == 1 and not row["starting"] and not row["stopping"]:
                return
            if time.perf_counter() - start > args.load_s + args.quiet_timeout_s:
                return
            await asyncio.sleep(2)

    sampler = asyncio.create_task(sample())
    await asyncio.gather(*(client(i) for i in range(args.clients)))
    state["phase"] = "quiet"
    await sampler
    print(f"{state['done']} calls answered, {state['errors']} failed", flush=True)
    return timeline


def save(timeline: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(timeline), out / "autoscale.parquet")
    fig, ax = plt.subplots(figsize=(8, 3.5))
    t = [r["t_s"] for r in timeline]
    ax.step(t, [r["running"] for r in timeline], where="post", label="replicas running")
    ax.step(t, [r["running"] + r["starting"] for r in timeline], where="post", label="running + starting", linestyle="--")
    ax.step(t, [r["in_flight"] / 3 for r in timeline], where="post", label="calls in flight / 3", alpha=0.6)
    ax.set_xlabel("seconds")
    ax.set_ylim(0, 3)
    ax.legend(loc="upper right")
    ax.set_title("vLLM (Ray Serve LLM) autoscaling: min 1, max 2 replicas")
    fig.tight_layout()
    fig.savefig(out / "autoscale.png", dpi=120)
    print(f"wrote {out / 'autoscale.parquet'} and {out / 'autoscale.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load-s", type=float, default=150, help="Seconds of sustained load.")
    parser.add_argument("--clients", type=int, default=6, help="Concurrent callers during the load.")
    parser.add_argument("--upscale-delay-s", type=float, default=5)
    parser.add_argument("--downscale-delay-s", type=float, default=20)
    parser.add_argument("--quiet-timeout-s", type=float, default=240, help="How long to wait for the scale-down.")
    parser.add_argument("--out", type=Path, default=None, help="Directory for autoscale.parquet and autoscale.png.")
    args = parser.parse_args()

    from moa_ray.runtime import init_ray, release_ray

    cluster = LocalCluster(workers=[WorkerSpec(POOL, gpus=0, cpus=4)], head_cpus=2)
    with cluster as state:
        os.environ.update(state.env)
        init_ray(state.address)
        try:
            timeline = asyncio.run(run(args))
        finally:
            release_ray([APP_NAME], shared=True)
    if args.out is not None:
        save(timeline, args.out)
    peak = max(r["running"] for r in timeline)
    print(f"replicas peak {peak} final {timeline[-1]['running']}")


if __name__ == "__main__":
    main()
