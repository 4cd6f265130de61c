"""One provider that accepts calls and never answers (a black hole) must not hold every request.

Before: each call to it waited (max_retries + 1) x read_s = 4 x 120 s, inside the endpoint's 600 s budget, and a
layer waited for all its proposers, so its live peers' answers sat for 481 s. Now a read timeout is not retried
(``timeout.retry_read``), and a layer without a deadline cuts its stragglers once most of it answered
(``straggler_wait_s``, ``straggler_factor``); ``straggler_wait_s: null`` keeps the papers' wait for all.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from bench.simulator import Behaviour, SimulatorConfig
from moa_ray.backends.openai_http import OpenAIBackend
from moa_ray.chat import ChatParams, as_messages
from moa_ray.config import LayerSpec, OpenAIModelSpec, parse_config
from moa_ray.errors import BackendTimeout
from moa_ray.pipeline import build_pipeline
from moa_ray.pipeline.agents import in_process_agents
from tests.test_serve_api import USER, asgi_client, make_api

MESSAGES = [{"role": "user", "content": "Why is the sky blue?"}]


class BlackHole:
    """A TCP server that accepts every connection and never answers: a provider down behind a live socket."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.listener.settimeout(0.1)
        self.connections: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}/v1"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:  # the accept timed out (or the listener closed): look again
                continue
            self.connections.append(connection)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for connection in self.connections:
            connection.close()
        self.listener.close()


@pytest.fixture
def black_hole() -> Iterator[BlackHole]:
    hole = BlackHole()
    yield hole
    hole.close()


def moa_config(live_url: str, dead_url: str, layer: dict[str, Any] | None = None, **model: Any) -> Any:
    """``moa``: proposers ``a`` and ``b`` (live) and ``dead`` in one layer, ``a`` aggregates; every model at the
    default retries and timeouts unless ``model`` says otherwise."""
    models = {
        "a": {"backend": "openai", "model": "a", "base_url": live_url, **model},
        "b": {"backend": "openai", "model": "b", "base_url": live_url, **model},
        "dead": {"backend": "openai", "model": "dead", "base_url": dead_url, **model},
    }
    return parse_config(
        {
            "models": models,
            "pipelines": {"moa": {"kind": "moa", "layers": [{"proposers": ["a", "b", "dead"], **(layer or {})}], "aggregator": "a"}},
        }
    )


def test_a_provider_that_never_answers_gets_one_attempt_at_the_default_retries(black_hole: BlackHole) -> None:
    """At the defaults (3 retries) a read timeout is not retried: one read_s, not four."""
    spec = OpenAIModelSpec(backend="openai", model="dead", base_url=black_hole.base_url, timeout={"read_s": 0.5})
    assert spec.max_retries == 3 and not spec.timeout.retry_read
    backend = OpenAIBackend(spec)

    async def call() -> None:
        try:
            await backend.chat(as_messages(MESSAGES), ChatParams())
        finally:
            await backend.aclose()

    start = time.perf_counter()
    with pytest.raises(BackendTimeout) as info:
        asyncio.run(call())
    assert info.value.attempts == 1 and not info.value.retryable
    assert len(black_hole.connections) == 1 and 0.5 <= time.perf_counter() - start < 5


@pytest.mark.anyio
async def test_a_black_holed_proposer_is_cut_by_the_straggler_bound_and_traced(simulator, black_hole: BlackHole) -> None:
    """The default rule with a short floor: once 2 of 3 proposers answered, the third is cut at
    max(straggler_wait_s, 3 x the slowest answer), and the layer goes on with the live two."""
    sim = simulator(SimulatorConfig(latency_ms=20))
    config = moa_config(sim.base_url, black_hole.base_url, layer={"straggler_wait_s": 0.5})
    pipeline = build_pipeline(config, "moa", in_process_agents(config, ["a", "b", "dead"]))
    start = time.perf_counter()
    result = await pipeline.run(MESSAGES, timeout_s=600)  # the endpoint's default budget
    assert time.perf_counter() - start < 30
    calls = {(c.role, c.model): c for c in result.trace.calls}
    assert calls["proposer", "a"].status == calls["proposer", "b"].status == calls["aggregator", "a"].status == "ok"
    dead = calls["proposer", "dead"]
    assert dead.status == "cut" and "cut as a straggler" in (dead.error or "") and "2 of 3 proposers had answered" in (dead.error or "")
    bound = float(re.search(r"at ([\d.]+) s:", dead.error or "").group(1))  # type: ignore[union-attr]
    assert bound >= 0.5 and dead.latency_s is not None and bound - 0.05 <= dead.latency_s < bound + 5
    assert len(result.trace.calls) == 4 and sim.stats.requests == 3  # the live peers were not called again


@pytest.mark.anyio
async def test_the_bound_follows_the_slowest_peer_and_wait_for_all_is_kept_when_asked(simulator) -> None:
    """A proposer slower than the floor but within straggler_factor x its slowest peer is waited for; with
    straggler_wait_s: null (or min_responses = every proposer) every proposer is waited for, as in the papers."""
    sim = simulator(SimulatorConfig(latency_ms=20, models={"b": Behaviour(latency_ms=400), "slow": Behaviour(latency_ms=800)}))
    models = {m: {"backend": "openai", "model": m, "base_url": sim.base_url, "max_retries": 0} for m in ("a", "b", "slow")}

    def run(layer: dict[str, Any]) -> Any:
        config = parse_config(
            {
                "models": models,
                "pipelines": {"moa": {"kind": "moa", "layers": [{"proposers": ["a", "b", "slow"], **layer}], "aggregator": "a"}},
            }
        )
        return build_pipeline(config, "moa", in_process_agents(config, list(models))).run(MESSAGES)

    def statuses(result: Any) -> list[str]:
        return [c.status for c in result.trace.calls if c.role == "proposer"]

    layers = [
        # bound = max(0.1 s, 3 x ~0.4 s) = ~1.2 s > 0.8 s: kept
        ({"straggler_wait_s": 0.1}, ["ok", "ok", "ok"]),
        # bound = max(0.1 s, 1 x ~0.4 s) < 0.8 s: cut
        ({"straggler_wait_s": 0.1, "straggler_factor": 1.0}, ["ok", "ok", "cut"]),
        # asked to wait for all
        ({"straggler_wait_s": None, "straggler_factor": 1.0}, ["ok", "ok", "ok"]),
        ({"straggler_wait_s": 0.1, "straggler_factor": 1.0, "min_responses": 3}, ["ok", "ok", "ok"]),
        # a layer's own deadline replaces the bound
        ({"straggler_wait_s": 0.1, "straggler_factor": 1.0, "deadline_s": 5}, ["ok", "ok", "ok"]),
    ]
    # the five runs are independent (each its own pipeline and bound), so they run at once: one run's time, not five
    results = await asyncio.gather(*(run(layer) for layer, _ in layers))
    assert [statuses(result) for result in results] == [expected for _, expected in layers]


def test_the_default_bound_leaves_room_for_the_answer_within_60_s() -> None:
    """At the defaults, with live peers answering within 6 s, a dead proposer is cut at 20 s."""
    layer = LayerSpec(proposers=["a", "b", "dead"])  # type: ignore[list-item]
    assert layer.straggler_wait_s == 20.0 and layer.straggler_factor == 3.0
    assert max(layer.straggler_wait_s, layer.straggler_factor * 6.0) == 20.0


@pytest.mark.slow
@pytest.mark.anyio
async def test_at_default_settings_a_black_holed_proposer_leaves_a_200_within_60_s(simulator, black_hole: BlackHole) -> None:
    """The fault as found: default retries, timeouts, request budget and layer, through the endpoint."""
    sim = simulator(SimulatorConfig(latency_ms=50))
    config = moa_config(sim.base_url, black_hole.base_url)
    assert config.server.request_timeout_s == 600 and config.models["dead"].timeout.read_s == 120
    start = time.perf_counter()
    async with asgi_client(make_api(config)) as client:
        client.timeout = 120
        response = await client.post("/v1/chat/completions", json={"model": "moa", "messages": USER, "moa": {"trace": True}})
    elapsed = time.perf_counter() - start
    assert response.status_code == 200, response.text
    assert elapsed < 60
    dead = [c for c in response.json()["moa"]["trace"]["calls"] if c["model"] == "dead"]
    assert [c["status"] for c in dead] == ["cut"] and dead[0]["error"].startswith("cut as a straggler at 20.0 s")
