"""Shared fixtures: one Ray instance per test session, and the LLM simulator (a test double
for a remote OpenAI-compatible model service, from bench/simulator.py).

The lanes (README, Development): a test that needs Ray is marked ``ray`` (a test using ``ray_session`` is marked
so here), one that runs a real model ``slow``, one that needs vLLM ``vllm``. The fast lane,
``python -m pytest -m "not ray and not slow and not vllm"``, runs the rest: no Ray, no model, no vLLM. A test
without the ``ray`` marker that starts Ray fails (:func:`ray_only_where_marked`).
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is a top-level package beside moa_ray/
    sys.path.insert(0, str(ROOT))

from bench.simulator import SimulatorConfig, join_stopped, run_simulator  # noqa: E402

#: The driver logs a call that failed with anything but a backend error (a bug, not a model's answer) here.
UNEXPECTED_CALL_ERRORS = "moa_ray.pipeline.base"


def pytest_sessionstart(session: pytest.Session) -> None:
    """No cyclic garbage collection while the test modules import (pydantic, FastAPI, Ray, SciPy...): the import
    of each grows the heap, and full collections over it cost ~4 s of the fast lane's collection."""
    gc.disable()


def pytest_collection_finish(session: pytest.Session) -> None:
    """What collection left alive (modules, classes, schemas) lives to the end: collect once, then freeze it so the
    full collections during the tests, and the ones pytest makes at the end to find unraisable exceptions, skip it.

    The tests then allocate ~600k long-lived objects more (the SDKs a test imports): with a young generation of 10,000
    objects instead of 700, ~400 young collections and ~4 full ones instead of ~4,000 and ~20 (~3 s of the lane)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
    gc.enable()


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()) and item.get_closest_marker("ray") is None:
            item.add_marker(pytest.mark.ray)


def _ray_refused(*args, **kwargs):
    pytest.fail("this test starts Ray without the `ray` marker: mark it @pytest.mark.ray (the fast lane runs without Ray)")


@pytest.fixture(autouse=True)
def ray_only_where_marked(request, monkeypatch):
    """Keeps the fast lane honest: ``ray.init`` fails a test that is not marked ``ray``."""
    if request.node.get_closest_marker("ray") is None:
        import ray

        monkeypatch.setattr(ray, "init", _ray_refused)
    yield


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


@pytest.fixture(scope="session")
def _simulators_stopping():
    yield
    join_stopped()


@pytest.fixture
def simulator(_simulators_stopping):
    """A fresh simulator per test; call it with a SimulatorConfig (default: 50 ms latency).

    Each is told to stop as its test ends and finishes stopping in the background (uvicorn takes 0.1-0.2 s; the
    session waits for them at its end): a test's stats are its own, and the next test starts at once.
    """
    stack = []

    def start(config: SimulatorConfig | None = None):
        cm = run_simulator(config or SimulatorConfig(latency_ms=50), tick_s=0.01, wait=False)
        stack.append(cm)
        return cm.__enter__()

    yield start
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


@pytest.fixture
def anyio_backend() -> str:
    """The async tests (``pytest.mark.anyio``) run on asyncio, the loop moa-ray runs on."""
    return "asyncio"
