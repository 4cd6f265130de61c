"""Peak memory of ``moa-ray eval generate`` as the dataset grows: does a run stay flat from 20k prompts to 100k?

A single-model pipeline over the LLM simulator (a test double for a remote provider, in its own process) at a
fixed latency, ``--concurrency 128``, a JSONL dataset of N synthetic prompts. Each size is one ``moa-ray eval
generate`` child process (with its own local Ray); its peak RSS is read from ``/usr/bin/time -v``, which counts
the driver, not the Ray workers. Run it alone on a quiet machine: rows/s is a timing.

    python -m bench.eval_memory --sizes 20000,100000

The last line: ``peak_rss_ratio <largest / smallest> rows_per_s <at the largest>``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from bench.simulator import free_port


def write_prompts(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i:07d}", "prompt": f"Synthetic question {i}: explain item {i} in one short paragraph."}) + "\n")


def write_config(path: Path, base_url: str) -> None:
    model = {"backend": "openai", "model": "sim", "base_url": base_url, "max_ongoing_requests": 1024, "max_retries": 0}
    path.write_text(yaml.safe_dump({"models": {"sim": model}, "pipelines": {"one": {"kind": "single", "model": "sim"}}}))


def measure(n: int, tmp: Path, config: Path, concurrency: int, extra: list[str]) -> tuple[float, float, int]:
    """(wall seconds, rows/s, peak RSS bytes) of one generate run over n prompts into a fresh directory."""
    data = tmp / f"prompts-{n}.jsonl"
    write_prompts(data, n)
    out = tmp / f"out-{n}"
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "moa_ray.cli", "eval", "generate", "--config", str(config)]
    cmd += ["--pipeline", "one", "--dataset", str(data), "--out", str(out), "--concurrency", str(concurrency), "--no-progress", *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"generate failed ({done.returncode}):\n{done.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))  # type: ignore[union-attr]
    rate = re.search(r"([\d.]+) rows/s", done.stderr)
    return wall, float(rate.group(1)) if rate else n / wall, peak_kb * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="20000,100000", help="Prompt counts, comma separated (smallest first).")
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--latency-ms", type=float, default=20)
    parser.add_argument("--extra", default="", help="More `eval generate` options, space separated (e.g. --no-call-store).")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    port = free_port()
    sim = subprocess.Popen(
        [sys.executable, "-m", "bench.simulator", "--port", str(port), "--latency-ms", str(args.latency_ms), "--output-tokens", "32"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(100):
            try:
                httpx.get(f"{base_url}/models", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        results = []
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            config = tmp / "config.yaml"
            write_config(config, base_url)
            for n in sizes:
                wall, rate, peak = measure(n, tmp, config, args.concurrency, args.extra.split())
                results.append((n, wall, rate, peak))
                print(f"{n:>9} prompts  {wall:7.1f} s  {rate:7.0f} rows/s  peak RSS {peak / 2**30:5.2f} GB", flush=True)
    finally:
        sim.terminate()
        sim.wait()
    smallest, largest = results[0], results[-1]
    print(f"peak_rss_ratio {largest[3] / smallest[3]:.2f} rows_per_s {largest[2]:.0f} peak_rss_gb {largest[3] / 2**30:.2f}")


if __name__ == "__main__":
    main()
