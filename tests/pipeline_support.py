"""Helpers shared by the pipeline tests."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import httpx

from moa_ray.backends.openai_http import OpenAIBackend
from moa_ray.config import MoARayConfig
from moa_ray.pipeline.agents import Agent, LocalAgent
from moa_ray.pipeline.trace import CallRecord, Trace


class Recorder(httpx.AsyncBaseTransport):
    """Real HTTP to the simulator, keeping each request's JSON body."""

    def __init__(self) -> None:
        # no keep-alive: each test runs its pipeline in its own asyncio.run, whose end would strand a pooled connection
        self.inner = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_keepalive_connections=0))
        self.bodies: list[dict[str, Any]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(json.loads(request.content))
        return await self.inner.handle_async_request(request)

    def to(self, model: str) -> list[dict[str, Any]]:
        """The bodies sent to ``model``."""
        return [b for b in self.bodies if b["model"] == model]


def waves(trace: Trace) -> list[list[CallRecord]]:
    """The trace's calls grouped into the waves that ran one after another, from the trace's own timings.

    A call joins the current wave when it started before that wave's last call ended (``start_s`` +
    ``latency_s``); otherwise it opens the next wave. Parallel layers are one wave each; calls made one
    after another are a wave each. No wall-clock bound: only the order of starts and ends.
    """
    out: list[list[CallRecord]] = []
    end = 0.0
    for call in sorted(trace.calls, key=lambda c: c.start_s):
        if out and call.start_s < end:
            out[-1].append(call)
            end = max(end, call.start_s + call.latency_s)
        else:
            out.append([call])
            end = call.start_s + call.latency_s
    return out


def ended_s(call: CallRecord) -> float:
    """When a call ended, in seconds from its request's start (as its trace records it)."""
    return call.start_s + call.latency_s


def sim_models(base_url: str, names: list[str], **extra: Any) -> dict[str, dict[str, Any]]:
    """One simulated OpenAI-compatible model per name (the provider's model id is the name), without retries."""
    return {m: {"backend": "openai", "model": m, "base_url": base_url, "max_retries": 0, **extra} for m in names}


def local_agents(
    config: MoARayConfig, names: Iterable[str] | None = None, *, transport: httpx.AsyncBaseTransport | None = None
) -> dict[str, Agent]:
    """An in-process agent per model of ``config`` (``names``, or all), over real HTTP or ``transport`` (a Recorder)."""
    return {m: LocalAgent(OpenAIBackend(config.models[m], transport=transport)) for m in (config.models if names is None else names)}
