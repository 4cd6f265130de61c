"""Evaluations of any size: generation's memory stays flat as the dataset grows, a kill -9 loses nothing, and the
summary equals what the Parquet output says.

Each run is a child process (in-process worker pool, in-process agents, the LLM simulator as the provider in its own
process), so its peak RSS is its own. Slow lane: tens of thousands of prompts take a minute or two on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from bench.eval_memory import write_prompts
from bench.simulator import SimulatorConfig, run_simulator

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import json, sys
from moa_ray.config import parse_config
from moa_ray.eval.benchmarks.registry import open_dataset
from moa_ray.eval.generate import GenerateOptions, run_generation
from moa_ray.pipeline.agents import in_process_agents

data, out, url = sys.argv[1:4]
model = {"backend": "openai", "model": "sim", "base_url": url, "max_ongoing_requests": 1024, "max_retries": 0}
config = parse_config({"models": {"sim": model}, "pipelines": {"one": {"kind": "single", "model": "sim"}}})
options = GenerateOptions(pipelines=["one"], out=out, concurrency=128, pool="in_process", progress=False)
summary = run_generation(config, open_dataset(data), in_process_agents(config, ["sim"]), options)
# VmHWM: this process image's own peak (ru_maxrss would keep the forking pytest process's, which can be far larger)
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss": peak_kb * 1024, "summary": summary.model_dump(mode="json")}))
"""


def generate(data: Path, out: Path, url: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(data), str(out), url], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def provider():
    with run_simulator(SimulatorConfig(latency_ms=5, output_tokens=16)) as sim:
        yield sim


def test_peak_memory_is_flat_from_10k_to_50k_prompts_and_the_summary_matches_the_output(provider, tmp_path: Path) -> None:
    results = {}
    for n in (10_000, 50_000):
        write_prompts(tmp_path / f"{n}.jsonl", n)
        results[n] = generate(tmp_path / f"{n}.jsonl", tmp_path / f"out-{n}", provider.base_url)
    small, large = results[10_000]["peak_rss"], results[50_000]["peak_rss"]
    assert large <= 600 * 2**20, f"peak RSS {large / 2**20:.0f} MiB at 50k prompts"
    assert large <= 1.2 * small, f"peak RSS {small / 2**20:.0f} -> {large / 2**20:.0f} MiB from 10k to 50k prompts"
    # the summary's counts and sums are those of the Parquet output; its quantiles are exact
    summary = results[50_000]["summary"]
    rows = pq.read_table(tmp_path / "out-50000", columns=["status", "latency_s", "prompt_tokens", "completion_tokens"]).to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    (one,) = summary["pipelines"]
    assert (summary["ok_rows"], one["done"], one["failed"], one["missing"]) == (len(ok), len(ok), len(rows) - len(ok), 50_000 - len(rows))
    latencies = np.array([r["latency_s"] for r in ok])
    assert one["mean_latency_s"] == pytest.approx(latencies.mean()) and one["p95_latency_s"] == pytest.approx(np.percentile(latencies, 95))
    assert one["mean_tokens"] == pytest.approx(np.mean([r["prompt_tokens"] + r["completion_tokens"] for r in ok]))


def test_a_kill_9_in_the_middle_of_a_large_run_then_a_rerun_leaves_every_row_once(provider, tmp_path: Path) -> None:
    n = 20_000
    data, out = tmp_path / "p.jsonl", tmp_path / "out"
    write_prompts(data, n)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data), str(out), provider.base_url],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(out.glob("part-*.parquet"))) < 20:  # well into the run
        time.sleep(0.2)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    written = pq.read_table(out, columns=["prompt_id"]).num_rows
    assert 0 < written < n  # killed in the middle
    summary = generate(data, out, provider.base_url)["summary"]
    assert summary["skipped_rows"] == written and summary["ok_rows"] == n - written
    ids = pq.read_table(out, columns=["prompt_id"]).column("prompt_id").to_pylist()
    assert len(ids) == len(set(ids)) == n
    calls = pq.read_table(out / "_calls", columns=["prompt_id", "pipeline", "turn", "attempt", "layer", "role", "index"]).to_pylist()
    keys = [tuple(c.values()) for c in calls]
    assert len(keys) == len(set(keys)) and {c["prompt_id"] for c in calls} == set(ids)  # one call row per answer, none lost
