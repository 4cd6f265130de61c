"""moa-ray's own overhead: an MoA through Ray Serve against the simulator, whose latency is known.

Every proposer and the aggregator is an ``openai`` model pointing at the in-process
simulator (fixed latency, zero jitter). With perfect parallelism and no overhead a
request takes ``layers x latency`` (layers counting the aggregator), so the last line

    ratio <median measured wall / (layers x latency)>

is the price of the driver, the Serve handles and the HTTP client together.
Target: <= 1.10 (the paper's reference code calls proposers one after another: 4.6).

    python -m bench.overhead --layers 3 --proposers 6 --latency-ms 200
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from bench.simulator import SimulatorConfig, run_simulator
from moa_ray.config import MoARayConfig, parse_config

APP_NAME = "bench-overhead"
PIPELINE = "overhead"


def overhead_config(base_url: str, *, layers: int, proposers: int, output_tokens: int) -> MoARayConfig:
    """``proposers`` distinct remote models; ``layers - 1`` proposer layers of all of them, then an aggregator."""
    if layers < 2:
        raise SystemExit("--layers counts the aggregator, so it must be at least 2")
    names = [f"sim-{i}" for i in range(1, proposers + 1)]
    models = {
        name: {
            "backend": "openai",
            "model": f"simulated/{name}",
            "base_url": base_url,
            "max_tokens": output_tokens,
            "max_retries": 0,
        }
        for name in names
    }
    pipeline = {"kind": "moa", "layers": [list(names) for _ in range(layers - 1)], "aggregator": names[0]}
    return parse_config({"models": models, "pipelines": {PIPELINE: pipeline}}, "<bench.overhead>")


async def _measure(pipeline, prompt: str, n: int, label: str) -> list[float]:
    walls = []
    for i in range(n):
        start = time.perf_counter()
        result = await pipeline.run(prompt)
        wall = time.perf_counter() - start
        failed = [c for c in result.trace.calls if c.status != "ok"]
        if failed:
            raise SystemExit(f"{label} {i}: {len(failed)} calls failed: {failed[0].error}")
        walls.append(wall)
        print(
            f"{label} {i + 1}/{n}: wall {wall * 1000:.1f} ms "
            f"(critical path {result.trace.critical_path_s * 1000:.1f} ms, {len(result.trace.calls)} calls)",
            flush=True,
        )
    return walls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=3, help="Layers including the aggregator (paper's MoA: 3).")
    parser.add_argument("--proposers", type=int, default=6, help="Proposers per layer (paper: 6).")
    parser.add_argument("--latency-ms", type=float, default=200.0, help="Simulated latency of every call.")
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: a local Ray).")
    args = parser.parse_args()

    import ray
    from ray import serve

    from moa_ray.pipeline import build_pipeline
    from moa_ray.runtime import deploy_agents, init_ray

    sim_config = SimulatorConfig(latency_ms=args.latency_ms, jitter_ms=0, output_tokens=args.output_tokens)
    with run_simulator(sim_config) as sim:
        config = overhead_config(sim.base_url, layers=args.layers, proposers=args.proposers, output_tokens=args.output_tokens)
        print(f"simulator at {sim.base_url}: {args.latency_ms:g} ms per call, no jitter", flush=True)
        t = time.perf_counter()
        init_ray(args.address)
        print(f"ray up in {time.perf_counter() - t:.1f}s", flush=True)
        try:
            t = time.perf_counter()
            agents = deploy_agents(config, [PIPELINE], app_name=APP_NAME)
            print(f"deployed {len(agents)} agents in {time.perf_counter() - t:.1f}s", flush=True)
            pipeline = build_pipeline(config, PIPELINE, agents)
            prompt = "Explain why the sky is blue in two sentences."

            async def bench() -> list[float]:
                await _measure(pipeline, prompt, args.warmup, "warm-up")
                return await _measure(pipeline, prompt, args.requests, "request")

            walls = asyncio.run(bench())
        finally:
            try:
                serve.delete(APP_NAME)
                serve.shutdown()
            finally:
                ray.shutdown()
        ideal = args.layers * args.latency_ms / 1000
        median = statistics.median(walls)
        print(
            f"shape: {args.layers - 1} proposer layers x {args.proposers} + aggregator, "
            f"{sim.stats.requests} simulator requests, max {sim.stats.max_in_flight} in flight",
            flush=True,
        )
        print(f"wall ms: median {median * 1000:.1f}, min {min(walls) * 1000:.1f}, max {max(walls) * 1000:.1f}; ideal {ideal * 1000:.0f}")
        print(f"ratio {median / ideal:.3f}")


if __name__ == "__main__":
    main()
