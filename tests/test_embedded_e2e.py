"""End to end, as a user runs it on a fresh machine: ``moa-ray run --json`` with the shipped presets.

The default pipeline is ``embedded``: the real SmolLM2-135M-Instruct through llama.cpp,
deployed on Ray Serve by a CLI process that starts (and stops) its own local Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moa_ray.config import load_presets

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_cli_answers_with_the_embedded_model_and_a_full_trace():
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "moa_ray.cli", "run", "--json", "--max-tokens", "16", "What is the capital of France?"],
        capture_output=True,
        text=True,
        timeout=420,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # stdout is exactly one JSON object, even with Ray running
    assert out["pipeline"] == "embedded"
    assert out["answer"].strip()

    trace = out["trace"]
    proposers = len(load_presets().pipeline("embedded").layers[0].proposers)
    assert [(layer["layer"], layer["role"]) for layer in trace["layers"]] == [(1, "proposer"), (2, "aggregator")]
    assert len(trace["calls"]) == proposers + 1
    assert all(c["status"] == "ok" and c["model"] == "smollm2" for c in trace["calls"])
    assert all(c["prompt_tokens"] > 0 and c["completion_tokens"] > 0 for c in trace["calls"])
    final = trace["calls"][-1]
    assert final["role"] == "aggregator" and final["completion_tokens"] <= 16
    # the aggregator saw the paper's prompt plus every proposer's answer
    assert final["prompt_tokens"] > max(c["prompt_tokens"] for c in trace["calls"][:-1]) + 60
    assert trace["tokens"]["total_tokens"] > 0 and trace["wall_s"] > 0
    assert trace["wall_s"] >= sum(layer["wall_s"] for layer in trace["layers"])
