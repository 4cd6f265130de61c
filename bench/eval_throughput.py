"""Throughput of ``eval generate``: a MoA-Lite-shaped pipeline against the simulator at rising concurrency.

MoA-Lite (Wang et al. 2024) is one layer of 6 proposers and an aggregator, so every
prompt needs two sequential model calls: its critical path is 2 x the simulated
latency. With C prompts in flight the ideal rate is C / critical path; the run
measures the real rate of the whole job (Ray actors, Serve handles, HTTP to the
simulator, Parquet part files) and prints both at each level, with the mean request
latency and the mean critical path measured in the traces (their gap is the per-request
orchestration overhead), and the machine's CPU per agent call (this process and every Ray process it
started, not the simulator). The last line is ``efficiency <measured / ideal at the top level>
cpu_ms_per_agent_call <at the top level>``.

With jitter, prompts finish at different times, so a finite run ends with a drain in
which fewer than C prompts are in flight: with 200 prompts at C = 40 (5 prompts per
slot) that alone caps the efficiency near 0.9 even with zero overhead.

    python -m bench.eval_throughput --prompts 200
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.cpu import CpuMeter, simulator_calls
from bench.simulator import free_port
from moa_ray.config import parse_config
from moa_ray.eval.benchmarks.registry import load_dataset
from moa_ray.eval.generate import GenerateOptions, run_generation
from moa_ray.eval.schema import GenerationRow
from moa_ray.eval.store import RowTable
from moa_ray.runtime import ray_session
from moa_ray.serve.deploy import deploy_agents

PIPELINE = "moa-lite-sim"
N_PROPOSERS = 6


def bench_config(base_url: str, hosting: str = "in_process") -> dict:
    """Six simulated proposers; the first also aggregates, as Qwen1.5-72B does in MoA-Lite."""
    models = {
        f"m{i}": {
            "backend": "openai",
            "model": f"sim-{i}",
            "base_url": base_url,
            "max_ongoing_requests": 1024,
            "max_retries": 0,
            "hosting": hosting,
        }
        for i in range(N_PROPOSERS)
    }
    return {
        "models": models,
        "pipelines": {PIPELINE: {"kind": "moa", "layers": [list(models)], "aggregator": "m0"}},
    }


def start_simulator(latency_ms: float, jitter_ms: float, output_tokens: int) -> tuple[subprocess.Popen, str]:
    """The simulator in its own process, so it never competes with the driver for the GIL."""
    port = free_port()
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.simulator",
            "--port",
            str(port),
            "--latency-ms",
            str(latency_ms),
            "--jitter-ms",
            str(jitter_ms),
            "--output-tokens",
            str(output_tokens),
        ],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))},
    )
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"{base_url}/models", timeout=1.0).raise_for_status()
            return proc, base_url
        except httpx.HTTPError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("the simulator did not start") from None
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200, help="AlpacaEval prompts per concurrency level.")
    parser.add_argument("--levels", default="10,20,40", help="Concurrency levels (comma separated, rising).")
    parser.add_argument("--latency-ms", type=float, default=1500.0, help="Simulated latency of every model call.")
    parser.add_argument("--jitter-ms", type=float, default=1000.0, help="Uniform extra latency in [0, jitter] per call.")
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="Generation actors [default: 1 per 32 in flight].")
    parser.add_argument("--hosting", choices=["in_process", "deployment"], default="in_process", help="How remote models are called.")
    args = parser.parse_args()
    levels = sorted(int(x) for x in args.levels.split(","))

    proc, base_url = start_simulator(args.latency_ms, args.jitter_ms, args.output_tokens)
    try:
        config = parse_config(bench_config(base_url, args.hosting))
        meter = CpuMeter(exclude={proc.pid})
        dataset = load_dataset("alpaca_eval", limit=args.prompts)
        with ray_session(num_cpus=8):
            agents = deploy_agents(config, [PIPELINE], app_name="bench-eval")
            # expected slowest of the 6 proposers, then the aggregator: 2 L + J (6/7 + 1/2) for uniform jitter
            critical_path_s = (2 * args.latency_ms + args.jitter_ms * (N_PROPOSERS / (N_PROPOSERS + 1) + 0.5)) / 1000
            print(
                f"MoA-Lite shape: {N_PROPOSERS} proposers + aggregator, {args.latency_ms:.0f} ms (+ up to {args.jitter_ms:.0f} ms) per call, "
                f"critical path {critical_path_s:.2f} s, {len(dataset.prompts)} prompts per level, remote models {args.hosting}"
            )
            print(
                f"{'concurrency':>11} {'prompts/s':>10} {'ideal':>8} {'efficiency':>10} {'elapsed s':>9} {'failed':>6}"
                f" {'request s':>9} {'measured critical path s':>24} {'cpu ms/call':>11}"
            )
            efficiency = cpu_ms = 0.0
            for level in levels:
                with tempfile.TemporaryDirectory(prefix="moa-bench-") as out:
                    options = GenerateOptions(pipelines=[PIPELINE], out=out, concurrency=level, workers=args.workers, progress=False)
                    calls_before = simulator_calls(base_url)
                    meter.start()
                    summary = run_generation(config, dataset, agents, options)
                    cpu_ms = 1000 * meter.stop() / max(1, simulator_calls(base_url) - calls_before)
                    rows = [r for r in RowTable(out, GenerationRow).latest().values() if r.status == "ok"]
                measured = summary.items / summary.elapsed_s
                ideal = level / critical_path_s
                efficiency = measured / ideal
                request_s = statistics.fmean(r.latency_s for r in rows)
                path_s = statistics.fmean(r.critical_path_s for r in rows)
                print(
                    f"{level:>11} {measured:>10.2f} {ideal:>8.2f} {efficiency:>10.3f} {summary.elapsed_s:>9.2f} {summary.failed_rows:>6}"
                    f" {request_s:>9.2f} {path_s:>24.2f} {cpu_ms:>11.1f}"
                )
            print(f"efficiency {efficiency:.3f} cpu_ms_per_agent_call {cpu_ms:.1f}")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
