"""Tail-tolerant layers: MoA request latency with and without a quorum, against jittered model latency.

The LLM simulator (a test double of a remote model service, in this process)
answers after ``latency + U(0, jitter)`` ms. The same MoA pipeline runs twice:
``wait-all`` waits for every proposer of every layer; ``quorum`` sets
``min_responses`` and ``layer_deadline_s``, so once the deadline has passed and
enough proposers have answered, each layer goes on and cancels its stragglers.
Requests alternate between the two so both see the same conditions. Prints
p50/p95 request latency of both; the last line is ``p95_ratio <quorum / wait-all>``.

By default the models are Ray Serve deployments called through their handles
(the production path: a local Ray is started and stopped); ``--transport local``
calls the simulator in-process instead.

    python -m bench.tail --jitter-ms 400
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import numpy as np

from bench.simulator import SimulatorConfig, run_simulator
from moa_ray.config import MoARayConfig, parse_config
from moa_ray.pipeline import build_pipeline
from moa_ray.pipeline.base import Pipeline
from moa_ray.pipeline.trace import Trace

MODES = ("wait-all", "quorum")


def bench_config(args: argparse.Namespace, base_url: str) -> MoARayConfig:
    models = [f"m{i}" for i in range(1, args.proposers + 1)]
    moa: dict[str, Any] = {"kind": "moa", "layers": [models] * args.layers, "aggregator": models[0]}
    return parse_config(
        {
            "models": {
                m: {
                    "backend": "openai",
                    "model": m,
                    "base_url": base_url,
                    "max_retries": 0,
                    "num_cpus": 0.01,
                    "max_tokens": args.output_tokens,
                    "max_ongoing_requests": 256,
                }
                for m in models
            },
            "pipelines": {
                "wait-all": moa,
                "quorum": {**moa, "min_responses": args.min_responses, "layer_deadline_s": args.deadline_ms / 1000},
            },
        },
        "<bench.tail>",
    )


def percentiles(values: list[float]) -> tuple[float, float]:
    p50, p95 = np.percentile(values, [50, 95])
    return float(p50), float(p95)


async def measure(pipelines: dict[str, Pipeline], args: argparse.Namespace) -> dict[str, list[Trace]]:
    traces: dict[str, list[Trace]] = {m: [] for m in MODES}
    sem = asyncio.Semaphore(args.concurrency)

    async def one(mode: str, i: int) -> None:
        async with sem:
            result = await pipelines[mode].run(f"request {i}: explain tail latency")
            traces[mode].append(result.trace)

    for mode in MODES:  # warm-up: connections, replicas
        await pipelines[mode].run("warm up")
    done = 0
    for start in range(0, args.requests, args.concurrency):
        batch = range(start, min(start + args.concurrency, args.requests))
        for mode in MODES:
            await asyncio.gather(*(one(mode, i) for i in batch))
        done += len(batch)
        if done % max(1, args.requests // 5) < len(batch) or done == args.requests:
            print(f"  {done}/{args.requests} requests per mode", flush=True)
    return traces


def report(traces: dict[str, list[Trace]], args: argparse.Namespace) -> None:
    print(f"\n{'mode':<9} {'p50_s':>7} {'p95_s':>7} {'mean_s':>7} {'cut calls':>9} {'answers/layer':>13}")
    p95s = {}
    for mode in MODES:
        walls = [t.wall_s for t in traces[mode]]
        p50, p95 = percentiles(walls)
        p95s[mode] = p95
        cut = sum(1 for t in traces[mode] for c in t.calls if c.status == "cut")
        layer_calls = [c for t in traces[mode] for c in t.calls if c.role == "proposer"]
        answered = sum(1 for c in layer_calls if c.status == "ok") / (len(traces[mode]) * args.layers)
        print(f"{mode:<9} {p50:7.3f} {p95:7.3f} {np.mean(walls):7.3f} {cut:9d} {answered:13.2f}")
    print(f"p95_ratio {p95s['quorum'] / p95s['wait-all']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=200, help="Simulated base latency of every call.")
    parser.add_argument("--jitter-ms", type=float, default=400, help="Uniform extra latency in [0, jitter].")
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--proposers", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2, help="Proposer layers (then the aggregator).")
    parser.add_argument("--min-responses", type=int, default=2, help="Quorum of the quorum mode.")
    parser.add_argument(
        "--deadline-ms", type=float, default=None, help="Layer deadline of the quorum mode (default: latency + jitter / 4)."
    )
    parser.add_argument("--requests", type=int, default=40, help="Requests per mode.")
    parser.add_argument("--concurrency", type=int, default=1, help="Requests in flight per mode.")
    parser.add_argument("--transport", choices=("serve", "local"), default="serve")
    parser.add_argument("--seed", type=int, default=0, help="Simulator jitter seed.")
    args = parser.parse_args()
    if args.deadline_ms is None:
        args.deadline_ms = args.latency_ms + args.jitter_ms / 4
    if not 1 <= args.min_responses <= args.proposers:
        parser.error("--min-responses must be between 1 and --proposers")

    sim_config = SimulatorConfig(latency_ms=args.latency_ms, jitter_ms=args.jitter_ms, output_tokens=args.output_tokens, seed=args.seed)
    print(
        f"MoA {args.layers} layers x {args.proposers} proposers + aggregator; simulator latency {args.latency_ms:g} ms "
        f"+ U(0, {args.jitter_ms:g}) ms; quorum mode: min_responses={args.min_responses}, "
        f"layer_deadline_s={args.deadline_ms / 1000:g}; {args.requests} requests per mode, concurrency {args.concurrency}",
        flush=True,
    )
    with run_simulator(sim_config) as sim:
        config = bench_config(args, sim.base_url)
        if args.transport == "local":
            from moa_ray.backends import create_backend
            from moa_ray.pipeline.agents import LocalAgent

            print("transport: in-process LocalAgents (no Ray)", flush=True)
            agents: dict[str, Any] = {m: LocalAgent(create_backend(spec)) for m, spec in config.models.items()}
            pipelines = {m: build_pipeline(config, m, agents) for m in MODES}
            traces = asyncio.run(measure(pipelines, args))
        else:
            from moa_ray.runtime import ray_session
            from moa_ray.serve.deploy import deploy_agents

            print("transport: Ray Serve deployments (one per model, called through DeploymentHandles)", flush=True)
            started = time.perf_counter()
            with ray_session(num_cpus=4):
                agents = deploy_agents(config, list(MODES), app_name="bench-tail")
                print(f"  Ray + Serve ready in {time.perf_counter() - started:.0f}s", flush=True)
                pipelines = {m: build_pipeline(config, m, agents) for m in MODES}
                traces = asyncio.run(measure(pipelines, args))
    report(traces, args)


if __name__ == "__main__":
    main()
