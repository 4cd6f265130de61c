"""moa-ray's own overhead: an MoA through Ray Serve against the simulator, whose latency is known.

Every proposer and the aggregator is an ``openai`` model pointing at the simulator
(fixed latency, zero jitter). With perfect parallelism and no overhead a request
takes ``layers x latency`` (layers counting the aggregator), so the last line

    ratio <median measured wall / (layers x latency)>

is the price of the driver, the Serve handles and the HTTP client together.
Target: <= 1.10 (the paper's reference code calls proposers one after another: 4.6).

The simulator plays a remote provider, so by default it runs in its own process
(``run_simulator`` in a child); ``--simulator thread`` serves it from a thread of the
driver instead, where it competes with the driver for the GIL.

    python -m bench.overhead --layers 3 --proposers 6 --latency-ms 200
    python -m bench.overhead --via serve --requests 15 --warmup 3      # through moa-ray serve, the openai client
    python -m bench.overhead --hosting deployment                      # remote models on deployments of their own
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass

from bench.simulator import SimulatorConfig, free_port, run_simulator
from moa_ray.config import MoARayConfig, parse_config

APP_NAME = "bench-overhead"
PIPELINE = "overhead"


def overhead_config(base_url: str, *, layers: int, proposers: int, output_tokens: int, hosting: str = "in_process") -> MoARayConfig:
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
            "hosting": hosting,
        }
        for name in names
    }
    pipeline = {"kind": "moa", "layers": [list(names) for _ in range(layers - 1)], "aggregator": names[0]}
    return parse_config({"models": models, "pipelines": {PIPELINE: pipeline}}, "<bench.overhead>")


@dataclass
class SimulatorHandle:
    base_url: str
    stats: dict[str, int]  # filled when the simulator stops


def _serve_in_child(config_json: str, port: int, ready, stop, results) -> None:
    with run_simulator(SimulatorConfig.model_validate_json(config_json), port=port) as sim:
        ready.set()
        stop.wait()
        results.put({"requests": sim.stats.requests, "max_in_flight": sim.stats.max_in_flight})


@contextlib.contextmanager
def simulator(config: SimulatorConfig, mode: str) -> Iterator[SimulatorHandle]:
    """The simulator in its own process (``process``) or in a thread of this one (``thread``)."""
    if mode == "thread":
        with run_simulator(config) as sim:
            handle = SimulatorHandle(sim.base_url, {})
            yield handle
            handle.stats.update(requests=sim.stats.requests, max_in_flight=sim.stats.max_in_flight)
        return
    ctx = mp.get_context("spawn")
    port = free_port()
    ready, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_serve_in_child, args=(config.model_dump_json(), port, ready, stop, results), daemon=True)
    child.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("the simulator process did not start")
        handle = SimulatorHandle(f"http://127.0.0.1:{port}/v1", {})
        yield handle
        stop.set()
        handle.stats.update(results.get(timeout=10))
    finally:
        stop.set()
        child.join(10)
        if child.is_alive():
            child.terminate()


def _measure_http(base_url: str, prompt: str, n: int, label: str) -> list[tuple[float, float]]:
    """(wall, critical path) of ``n`` sequential requests through ``moa-ray serve``'s app, with the official client."""
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    out = []
    for i in range(n):
        start = time.perf_counter()
        reply = client.chat.completions.create(
            model=PIPELINE, messages=[{"role": "user", "content": prompt}], extra_body={"moa": {"trace": True}}
        )
        wall = time.perf_counter() - start
        trace = reply.model_extra["moa"]["trace"]  # type: ignore[index]
        failed = [c for c in trace["calls"] if c["status"] != "ok"]
        if failed:
            raise SystemExit(f"{label} {i}: {len(failed)} calls failed: {failed[0]['error']}")
        out.append((wall, trace["critical_path_s"]))
        print(f"{label} {i + 1}/{n}: wall {wall * 1000:.1f} ms (critical path {trace['critical_path_s'] * 1000:.1f} ms)", flush=True)
    return out


async def _measure(pipeline, prompt: str, n: int, label: str) -> list[tuple[float, float]]:
    """(wall, critical path) of ``n`` sequential requests; every call must succeed."""
    out = []
    for i in range(n):
        start = time.perf_counter()
        result = await pipeline.run(prompt)
        wall = time.perf_counter() - start
        failed = [c for c in result.trace.calls if c.status != "ok"]
        if failed:
            raise SystemExit(f"{label} {i}: {len(failed)} calls failed: {failed[0].error}")
        out.append((wall, result.trace.critical_path_s))
        print(
            f"{label} {i + 1}/{n}: wall {wall * 1000:.1f} ms "
            f"(critical path {result.trace.critical_path_s * 1000:.1f} ms, {len(result.trace.calls)} calls)",
            flush=True,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=3, help="Layers including the aggregator (paper's MoA: 3).")
    parser.add_argument("--proposers", type=int, default=6, help="Proposers per layer (paper: 6).")
    parser.add_argument("--latency-ms", type=float, default=200.0, help="Simulated latency of every call.")
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--simulator", choices=("process", "thread"), default="process")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: a local Ray).")
    parser.add_argument("--hosting", choices=["in_process", "deployment"], default="in_process", help="How remote models are called.")
    parser.add_argument(
        "--via", choices=["driver", "serve"], default="driver", help="Call the pipeline in this process, or through moa-ray serve's app."
    )
    parser.add_argument("--proxy", choices=["haproxy", "python"], default="haproxy", help="The HTTP proxy of --via serve (server.proxy).")
    args = parser.parse_args()

    from moa_ray.pipeline import build_pipeline
    from moa_ray.runtime import is_shared_cluster, ray_session
    from moa_ray.serve import proxy
    from moa_ray.serve.deploy import deploy_agents

    sim_config = SimulatorConfig(latency_ms=args.latency_ms, jitter_ms=0, output_tokens=args.output_tokens)
    with simulator(sim_config, args.simulator) as sim:
        config = overhead_config(
            sim.base_url, layers=args.layers, proposers=args.proposers, output_tokens=args.output_tokens, hosting=args.hosting
        )
        config.server.proxy = args.proxy
        env = proxy.local_env(config.server, "127.0.0.1") if args.via == "serve" else {}
        print(f"simulator ({args.simulator}) at {sim.base_url}: {args.latency_ms:g} ms per call, no jitter", flush=True)
        t = time.perf_counter()
        with ray_session(args.address, apps=[APP_NAME], env=env):
            print(f"ray up in {time.perf_counter() - t:.1f}s", flush=True)
            t = time.perf_counter()
            prompt = "Explain why the sky is blue in two sentences."
            if args.via == "serve":
                from ray import serve

                from moa_ray.serve.app import build_app

                port = free_port()
                serve.start(http_options=proxy.http_options(config.server, "127.0.0.1", port, local=not is_shared_cluster(args.address)))
                serve.run(build_app(config, [PIPELINE]), name=APP_NAME, route_prefix="/")
                print(f"served the app in {time.perf_counter() - t:.1f}s", flush=True)
                _measure_http(f"http://127.0.0.1:{port}", prompt, args.warmup, "warm-up")
                measured = _measure_http(f"http://127.0.0.1:{port}", prompt, args.requests, "request")
            else:
                agents = deploy_agents(config, [PIPELINE], app_name=APP_NAME)
                print(f"deployed {len(agents)} agents in {time.perf_counter() - t:.1f}s", flush=True)
                pipeline = build_pipeline(config, PIPELINE, agents)

                async def bench() -> list[tuple[float, float]]:
                    await _measure(pipeline, prompt, args.warmup, "warm-up")
                    return await _measure(pipeline, prompt, args.requests, "request")

                measured = asyncio.run(bench())

    walls = [w for w, _ in measured]
    ideal = args.layers * args.latency_ms / 1000
    median = statistics.median(walls)
    critical = statistics.median(c for _, c in measured)
    print(
        f"shape: {args.layers - 1} proposer layers x {args.proposers} + aggregator, remote models {args.hosting}, via {args.via}"
        f"{f' ({args.proxy} proxy)' if args.via == 'serve' else ''}; "
        f"{sim.stats.get('requests')} simulator requests, at most {sim.stats.get('max_in_flight')} in flight; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(
        f"wall ms: median {median * 1000:.1f}, min {min(walls) * 1000:.1f}, max {max(walls) * 1000:.1f}; ideal {ideal * 1000:.0f}; "
        f"median critical path {critical * 1000:.1f} (HTTP client + simulator), "
        f"so the driver (+ Serve) adds ~{(median - critical) * 1000:.0f} ms per request"
    )
    print(f"ratio {median / ideal:.3f}")


if __name__ == "__main__":
    main()
