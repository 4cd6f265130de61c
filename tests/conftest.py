"""Shared fixtures: one Ray instance per test session, and the LLM simulator (a test double
for a remote OpenAI-compatible model service, from bench/simulator.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is a top-level package beside moa_ray/
    sys.path.insert(0, str(ROOT))

from bench.simulator import SimulatorConfig, run_simulator  # noqa: E402

#: The driver logs a call that failed with anything but a backend error (a bug, not a model's answer) here.
UNEXPECTED_CALL_ERRORS = "moa_ray.pipeline.base"


@pytest.fixture(autouse=True)
def no_unexpected_call_errors(request, caplog):
    """A pipeline keeps going when a call fails unexpectedly (it logs the traceback); a test must not: such a
    failure is a bug, so it fails the test loudly unless the test expects it (``@pytest.mark.unexpected_call_errors``)."""
    caplog.set_level("ERROR", logger=UNEXPECTED_CALL_ERRORS)
    yield
    if request.node.get_closest_marker("unexpected_call_errors"):
        return
    bugs = [r for r in caplog.get_records("call") if r.name == UNEXPECTED_CALL_ERRORS and r.levelno >= 40]
    if bugs:
        first = bugs[0]
        pytest.fail(f"{len(bugs)} call(s) failed with a non-backend error: {first.getMessage()}: {first.exc_text or first.exc_info}")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (ray.init ~7 s, so never per test)."""
    import ray
    from ray import serve

    from moa_ray.runtime import init_ray

    init_ray(num_cpus=8)
    serve.start(proxy_location="Disabled")
    yield ray
    serve.shutdown()
    ray.shutdown()


@pytest.fixture
def simulator():
    """A fresh simulator per test; call it with a SimulatorConfig (default: 50 ms latency)."""
    stack = []

    def start(config: SimulatorConfig | None = None):
        cm = run_simulator(config or SimulatorConfig(latency_ms=50))
        stack.append(cm)
        return cm.__enter__()

    yield start
    for cm in reversed(stack):
        cm.__exit__(None, None, None)
