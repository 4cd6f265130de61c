"""One structured line per API request, and the request's metrics, written when its response's last byte is sent.

:class:`AccessLog` is an ASGI middleware around the endpoint's app. Every ``/v1/`` request has a request id, returned
as the ``x-request-id`` response header. In a Serve replica, Ray Serve assigns it (the client's own ``x-request-id``,
else a fresh one), puts it in the request's headers and returns it; the access log uses the same. Without Serve (the
app served on its own), the middleware does that itself, keeping a client's id only when it is plain (up to 128
letters, digits and ``._:-``, since it is logged and sent back). The route and the
:class:`~moa_ray.serve.service.ChatService` fill the request's :class:`RequestOutcome` (the pipeline, the trace, the
first token's time, an error inside a stream); once the response has ended, the middleware writes one JSON line
(``request_id``, ``method``, ``path``, ``pipeline``, ``status``, ``latency_s``, ``ttft_s``, ``stream``, ``calls``,
``prompt_tokens``, ``completion_tokens``, ``cost_usd``) and counts a completion request
(:func:`moa_ray.metrics.record_request`). No prompt, answer or key is ever in either.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, cast

from moa_ray.metrics import record_request
from moa_ray.pipeline.trace import Trace

# A child of "ray.serve", so Serve writes these lines to the ingress replica's log file.
log = logging.getLogger("ray.serve.moa_ray.access")

REQUEST_ID_HEADER = "x-request-id"
#: A client's request id is kept only when it is short and plain (it is logged and sent back as a header).
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
#: The routes whose requests run a pipeline: the ones counted in the request metrics.
COMPLETION_PATHS = frozenset({"/v1/chat/completions", "/v1/responses"})
#: The status of a request whose client went away before its response ended (nginx's convention).
CLIENT_CLOSED = 499

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


@dataclass
class RequestOutcome:
    """What one request came to: filled by the route and the service, read once its response has ended."""

    request_id: str
    started: float  # time.perf_counter() at arrival
    pipeline: str | None = None
    stream: bool = False
    error_status: int | None = None  # an error the response could no longer carry as its HTTP status (inside a stream)
    ttft_s: float | None = None
    trace: Trace | None = None

    def first_token(self) -> None:
        """The answer's first piece is leaving now (the first call wins)."""
        if self.ttft_s is None:
            self.ttft_s = time.perf_counter() - self.started

    def line(self, method: str, path: str, status: int, latency_s: float) -> dict[str, Any]:
        """The access log's record: numbers and names only."""
        totals = self.trace.totals() if self.trace is not None else None
        accounting = self.trace.accounting if self.trace is not None else None
        cost = accounting.totals.cost_usd if accounting is not None else None
        return {
            "request_id": self.request_id,
            "method": method,
            "path": path,
            "pipeline": self.pipeline,
            "status": status,
            "latency_s": round(latency_s, 4),
            "ttft_s": None if self.ttft_s is None else round(self.ttft_s, 4),
            "stream": self.stream,
            "calls": totals.calls if totals else 0,
            "prompt_tokens": totals.prompt_tokens if totals else 0,
            "completion_tokens": totals.completion_tokens if totals else 0,
            "cost_usd": cost,
        }


def request_id_of(headers: list[tuple[bytes, bytes]], *, trusted: bool = False) -> str:
    """The request's ``x-request-id`` (when ``trusted``: Ray Serve's, as it is; else only a plain one), or a new one."""
    for name, value in headers:
        if name.lower() == REQUEST_ID_HEADER.encode():
            sent = value.decode("latin-1")
            if sent and (trusted or _CLIENT_REQUEST_ID.fullmatch(sent)):
                return sent
            break
    return uuid.uuid4().hex


def outcome_of(request: Any) -> RequestOutcome | None:
    """The :class:`RequestOutcome` of a Starlette request (None outside :class:`AccessLog`, as in unit tests)."""
    return cast("RequestOutcome | None", request.scope.get("state", {}).get("moa_outcome"))


class AccessLog:
    """ASGI middleware: a request id on every ``/v1/`` request, then its access line (when ``enabled``) and metrics.

    ``serve_request_ids``: Ray Serve has set the request's ``x-request-id`` and returns it (in a replica); else this
    middleware sets and returns it.
    """

    def __init__(self, app: ASGIApp, *, enabled: bool = True, serve_request_ids: bool = False) -> None:
        self.app = app
        self.enabled = enabled
        self.serve_request_ids = serve_request_ids

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/") or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope.get("headers", []), trusted=self.serve_request_ids)
        outcome = RequestOutcome(request_id=request_id, started=time.perf_counter())
        scope.setdefault("state", {})["moa_outcome"] = outcome
        header = (REQUEST_ID_HEADER.encode(), outcome.request_id.encode())
        status = 500  # what the client gets when the app fails before starting a response (Starlette's error page)

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if not self.serve_request_ids:
                    message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except (asyncio.CancelledError, OSError):  # the client went away (a cancelled handler, a closed socket)
            status = CLIENT_CLOSED
            raise
        finally:
            self._done(outcome, scope, outcome.error_status or status)

    def _done(self, outcome: RequestOutcome, scope: Scope, status: int) -> None:
        latency_s = time.perf_counter() - outcome.started
        if scope["path"] in COMPLETION_PATHS:
            record_request(outcome.pipeline, status, latency_s, outcome.ttft_s)
        if self.enabled:
            log.info("%s", json.dumps(outcome.line(scope["method"], scope["path"], status, latency_s), separators=(",", ":")))
