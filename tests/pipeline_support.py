"""Helpers shared by the pipeline tests."""

from __future__ import annotations

import json
from typing import Any

import httpx


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
