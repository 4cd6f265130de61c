"""Load on the OpenAI-compatible endpoint, against calling the same pipeline directly.

Backed by the LLM simulator (a known latency per call), it runs the same MoA pipeline two ways on one
local Ray: *direct* (``deploy_agents`` + ``build_pipeline`` in this process, as ``moa-ray run`` does)
and *HTTP* (``moa-ray serve``'s app: HTTP proxy -> ingress, which calls the models), with half the HTTP
requests streaming. ``--proxy python`` puts Serve's Python proxy actor in front instead of HAProxy. The
difference of the p50 latencies is the endpoint's overhead per request.

    python -m bench.serve_load --requests 200 --concurrency 50
    python -m bench.serve_load --requests 200 --concurrency 20 --hosting deployment --kill-replica p2   # reliability check

Each mode also reports the machine's CPU per agent call (this process and every Ray process it started,
not the simulator, over the agent calls the simulator answered). ``--hosting deployment`` gives every
remote model its own Serve deployment instead of calling it from the driver / ingress process.

The last line is ``overhead_p50_ms <value> cpu_ms_per_agent_call <value>``. Exit status 1 on any
unexpected 5xx or hung request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.cpu import CpuMeter, breakdown, simulator_calls
from bench.simulator import free_port

PIPELINE = "moa-bench"
APP_HTTP = "bench-http"
APP_DIRECT = "bench-direct"


@contextlib.contextmanager
def simulator_process(latency_ms: float, output_tokens: int) -> Iterator[tuple[str, int]]:
    """The simulator in its own process, so its event loop does not share a GIL with the load generator."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "bench.simulator",
        "--port",
        str(port),
        "--latency-ms",
        str(latency_ms),
        "--output-tokens",
        str(output_tokens),
        "--seed",
        "0",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{base_url}/models", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the simulator did not start") from None
                time.sleep(0.2)
        yield base_url, proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


def bench_config(base_url: str, proposers: int, layers: int, hosting: str = "in_process", proxy: str = "haproxy") -> dict[str, Any]:
    model = {
        "backend": "openai",
        "base_url": base_url,
        "num_cpus": 0.05,
        "max_ongoing_requests": 512,
        "max_connections": 256,
        "hosting": hosting,
    }
    names = [f"p{i + 1}" for i in range(proposers)]
    return {
        "models": {n: {**model, "model": n} for n in names},
        "pipelines": {PIPELINE: {"kind": "moa", "layers": [names] * layers, "aggregator": names[0]}},
        "server": {"proxy": proxy, "ingress": {"max_ongoing_requests": 1024, "num_cpus": 0.1}},
    }


@dataclass
class Sample:
    mode: str
    status: int | str
    latency_s: float
    ttft_s: float | None = None
    dropped: int = 0  # proposer calls that failed but the request still answered


@dataclass
class Results:
    samples: list[Sample] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)  # per mode: CPU seconds of this process tree
    calls: dict[str, int] = field(default_factory=dict)  # per mode: agent calls the simulator answered
    cpu_by_process: dict[str, dict[str, float]] = field(default_factory=dict)  # per mode: the same seconds by process

    def of(self, mode: str) -> list[Sample]:
        return [s for s in self.samples if s.mode == mode]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def run_direct(pipeline: Any, n: int, concurrency: int, results: Results, *, stream: bool = False) -> None:
    """The pipeline called in this process, as ``moa-ray run`` and the evaluation jobs do."""
    from moa_ray.errors import PipelineError
    from moa_ray.pipeline import PipelineResult

    sem = asyncio.Semaphore(concurrency)
    mode = "direct-stream" if stream else "direct"

    async def one(i: int) -> None:
        messages = [{"role": "user", "content": f"question {i}"}]
        async with sem:
            start, ttft = time.perf_counter(), None
            try:
                if stream:
                    async for item in pipeline.stream(messages):
                        if isinstance(item, PipelineResult):
                            result = item
                        elif ttft is None:
                            ttft = time.perf_counter() - start
                else:
                    result = await pipeline.run(messages)
                dropped = sum(1 for c in result.trace.calls if c.status != "ok")
                results.samples.append(Sample(mode, 200, time.perf_counter() - start, ttft, dropped))
            except PipelineError:
                results.samples.append(Sample(mode, "error", time.perf_counter() - start))

    await asyncio.gather(*(one(i) for i in range(n)))


async def run_http(
    base_url: str, n: int, concurrency: int, results: Results, timeout_s: float, *, stream: bool, on_progress: Any = None
) -> None:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout_s) as client:

        async def one(i: int) -> None:
            body = {"model": PIPELINE, "messages": [{"role": "user", "content": f"question {i}"}], "stream": stream, "moa": {"trace": True}}
            async with sem:
                if on_progress is not None:
                    on_progress(i)
                start = time.perf_counter()
                try:
                    if stream:
                        ttft, done = None, False
                        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                            if response.status_code != 200:
                                await response.aread()
                                results.samples.append(Sample("http-stream", response.status_code, time.perf_counter() - start))
                                return
                            dropped = 0
                            async for line in response.aiter_lines():
                                if not line.startswith("data: "):
                                    continue
                                data = line[6:]
                                if data == "[DONE]":
                                    done = True
                                    break
                                chunk = json.loads(data)
                                if "error" in chunk:
                                    results.samples.append(Sample("http-stream", "stream-error", time.perf_counter() - start))
                                    return
                                delta = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
                                if delta and ttft is None:
                                    ttft = time.perf_counter() - start
                                if "moa" in chunk:
                                    dropped = sum(1 for c in chunk["moa"]["trace"]["calls"] if c["status"] != "ok")
                        status: int | str = 200 if done else "no-done"
                        results.samples.append(Sample("http-stream", status, time.perf_counter() - start, ttft, dropped))
                    else:
                        response = await client.post("/v1/chat/completions", json=body)
                        latency = time.perf_counter() - start
                        dropped = 0
                        if response.status_code == 200:
                            reply = response.json()
                            assert reply["choices"][0]["message"]["content"]
                            dropped = sum(1 for c in reply["moa"]["trace"]["calls"] if c["status"] != "ok")
                        results.samples.append(Sample("http", response.status_code, latency, dropped=dropped))
                except httpx.TimeoutException:
                    results.samples.append(Sample("http-stream" if stream else "http", "timeout", time.perf_counter() - start))

        await asyncio.gather(*(one(i) for i in range(n)))


def kill_one_replica(model: str) -> str:
    """Kill one replica of ``model``'s agent deployment in the HTTP app, the way a node failure would."""
    import ray

    name = next(a for a in ray.util.list_named_actors(all_namespaces=True) if f"SERVE_REPLICA::{APP_HTTP}#agent-{model}#" in a["name"])
    ray.kill(ray.get_actor(name["name"], namespace=name["namespace"]), no_restart=True)
    return name["name"]


def wait_for_replacement(model: str, killed: dict[str, Any], timeout_s: float = 300) -> None:
    """Record in ``killed`` when ``model``'s deployment (one replica) answers again (runs in a thread)."""
    from ray import serve

    handle = serve.get_deployment_handle(f"agent-{model}", APP_HTTP)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            handle.info.remote().result(timeout_s=5)
        except Exception:  # noqa: BLE001 - the dead replica (ActorDiedError) or none yet (timeout)
            time.sleep(0.1)
            continue
        killed["recovered_s"] = round(time.perf_counter() - killed["at"], 1)
        return


def cpu_per_call_ms(results: Results, mode: str) -> float:
    """Machine CPU (this process, Ray's processes, the replicas; not the simulator) per agent call of a mode."""
    calls = results.calls.get(mode, 0)
    return 1000 * results.cpu_s.get(mode, 0.0) / calls if calls else float("nan")


def measured(results: Results, mode: str, meter: CpuMeter, sim_url: str, run: Any) -> None:
    """Run one mode's load, recording its CPU seconds and the agent calls it made."""
    calls_before = simulator_calls(sim_url)
    meter.start()
    run()
    results.cpu_s[mode] = meter.stop()
    results.cpu_by_process[mode] = meter.last_by_process
    results.calls[mode] = simulator_calls(sim_url) - calls_before


def summarize(results: Results, modes: list[str]) -> list[str]:
    lines = [
        f"{'mode':<14} {'n':>5} {'ok':>5} {'4xx':>4} {'5xx':>4} {'other':>5} {'p50_ms':>8} {'p99_ms':>8} {'ttft_p50':>8} {'dropped':>7}"
        f" {'cpu_ms/call':>11}"
    ]
    for mode in modes:
        samples = results.of(mode)
        ok = [s for s in samples if s.status == 200]
        c4 = sum(1 for s in samples if isinstance(s.status, int) and 400 <= s.status < 500)
        c5 = sum(1 for s in samples if isinstance(s.status, int) and s.status >= 500)
        other = len(samples) - len(ok) - c4 - c5
        lat = [s.latency_s * 1000 for s in ok]
        ttft = [s.ttft_s * 1000 for s in ok if s.ttft_s is not None]
        ttft_txt = f"{percentile(ttft, 50):8.1f}" if ttft else f"{'-':>8}"
        lines.append(
            f"{mode:<14} {len(samples):>5} {len(ok):>5} {c4:>4} {c5:>4} {other:>5} {percentile(lat, 50):8.1f} {percentile(lat, 99):8.1f} "
            f"{ttft_txt} {sum(s.dropped for s in samples):>7} {cpu_per_call_ms(results, mode):>11.1f}"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--latency-ms", type=float, default=200, help="Simulated latency of every model call.")
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--proposers", type=int, default=3)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--timeout-s", type=float, default=120, help="Client timeout: a request slower than this counts as hung.")
    parser.add_argument("--kill-replica", metavar="MODEL", default=None, help="Kill one replica of MODEL (p1 aggregates) mid-load.")
    parser.add_argument(
        "--hosting",
        choices=["in_process", "deployment"],
        default="in_process",
        help="Remote models called from the driver / ingress process (default) or through deployments of their own.",
    )
    parser.add_argument("--proxy", choices=["haproxy", "python"], default="haproxy", help="The endpoint's HTTP proxy (server.proxy).")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from ray import serve

    from moa_ray.config import parse_config
    from moa_ray.pipeline import build_pipeline
    from moa_ray.runtime import ray_session
    from moa_ray.serve import proxy
    from moa_ray.serve.app import build_app
    from moa_ray.serve.deploy import deploy_agents

    results = Results()
    with simulator_process(args.latency_ms, args.output_tokens) as (sim_url, sim_pid):
        config = parse_config(bench_config(sim_url, args.proposers, args.layers, args.hosting, args.proxy))
        if args.kill_replica and args.hosting != "deployment":
            parser.error("--kill-replica needs --hosting deployment (in-process models have no replica)")
        meter = CpuMeter(exclude={sim_pid})
        port = free_port()
        with ray_session(num_cpus=8, env=proxy.local_env(config.server, "127.0.0.1")):
            serve.start(http_options=proxy.http_options(config.server, "127.0.0.1", port, local=True))
            t0 = time.perf_counter()
            agents = deploy_agents(config, [PIPELINE], app_name=APP_DIRECT, http=True)
            serve.run(build_app(config, [PIPELINE]), name=APP_HTTP, route_prefix="/")
            print(f"deployed {len(config.models)} agents twice + the ingress in {time.perf_counter() - t0:.1f} s", flush=True)
            pipeline = build_pipeline(config, PIPELINE, agents)
            base_url = f"http://127.0.0.1:{port}"

            warm = Results()  # warm up both paths (connections, handles, replicas' first calls)
            asyncio.run(run_direct(pipeline, 10, 10, warm))
            asyncio.run(run_http(base_url, 10, 10, warm, args.timeout_s, stream=False))

            killed: dict[str, Any] = {}

            def on_progress(i: int) -> None:
                if args.kill_replica and i == args.requests // 3 and not killed:
                    killed["name"] = kill_one_replica(args.kill_replica)
                    killed["at"] = time.perf_counter()
                    watcher = threading.Thread(target=wait_for_replacement, args=(args.kill_replica, killed), daemon=True)
                    watcher.start()
                    killed["watcher"] = watcher

            http_wall = direct_wall = 0.0
            for stream in (False, True):
                suffix = "-stream" if stream else ""
                direct_start = time.perf_counter()
                measured(
                    results,
                    "direct" + suffix,
                    meter,
                    sim_url,
                    lambda stream=stream: asyncio.run(run_direct(pipeline, args.requests, args.concurrency, results, stream=stream)),
                )
                direct_wall += time.perf_counter() - direct_start
                http_start = time.perf_counter()
                measured(
                    results,
                    "http" + suffix,
                    meter,
                    sim_url,
                    lambda stream=stream: asyncio.run(
                        run_http(
                            base_url,
                            args.requests,
                            args.concurrency,
                            results,
                            args.timeout_s,
                            stream=stream,
                            on_progress=None if stream else on_progress,
                        )
                    ),
                )
                http_wall += time.perf_counter() - http_start
            if killed:
                killed["watcher"].join()

    print(
        f"simulator: {args.latency_ms:g} ms per call, {args.output_tokens} tokens; pipeline: {args.layers} layer(s) x "
        f"{args.proposers} proposers + aggregator, remote models {args.hosting}, {args.proxy} proxy; {args.requests} requests per mode at "
        f"concurrency {args.concurrency}"
    )
    for line in summarize(results, ["direct", "http", "direct-stream", "http-stream"]):
        print(line)
    print("cpu ms per agent call, by process:")
    for mode in ["direct", "http", "direct-stream", "http-stream"]:
        print(f"  {mode:<14} {breakdown(results.cpu_by_process.get(mode, {}), results.calls.get(mode, 0))}")
    http_all = results.of("http") + results.of("http-stream")
    direct_all = results.of("direct") + results.of("direct-stream")
    print(
        f"http throughput: {sum(1 for s in http_all if s.status == 200) / http_wall:.1f} req/s over {http_wall:.1f} s "
        f"(direct: {sum(1 for s in direct_all if s.status == 200) / direct_wall:.1f} req/s)"
    )
    bad_5xx = [s for s in http_all if isinstance(s.status, int) and s.status >= 500 and not (killed and s.status == 502)]
    hung = [s for s in http_all if s.status in ("timeout", "no-done")]
    if killed:
        print(
            f"killed {killed['name']} after {args.requests // 3} requests had started; the deployment answered again "
            f"{killed.get('recovered_s', 'not within 300')} s later; max http latency {max(s.latency_s for s in http_all):.2f} s; "
            f"502 (upstream failed): {sum(1 for s in http_all if s.status == 502)}; hung: {len(hung)}"
        )

    def p50(mode: str, ttft: bool = False) -> float:
        return percentile([(s.ttft_s if ttft else s.latency_s) * 1000 for s in results.of(mode) if s.status == 200], 50)

    print(
        f"streaming overhead p50: {p50('http-stream') - p50('direct-stream'):.1f} ms to the last token, "
        f"{p50('http-stream', True) - p50('direct-stream', True):.1f} ms to the first"
    )
    print(f"unexpected 5xx: {len(bad_5xx)}; hung: {len(hung)}")
    print(f"overhead_p50_ms {p50('http') - p50('direct'):.1f} cpu_ms_per_agent_call {cpu_per_call_ms(results, 'http'):.1f}")
    return 1 if bad_5xx or hung else 0


if __name__ == "__main__":
    raise SystemExit(main())
