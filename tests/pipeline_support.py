"""Helpers shared by the pipeline tests."""

from __future__ import annotations

import json
from typing import Any

import httpx

from moa_ray.pipeline.trace import CallRecord, Trace


class Recorder(httpx.AsyncBaseTransport):
    """Real HTTP to the simulator, keeping each request's JSON body."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
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
