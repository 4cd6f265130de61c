"""HTTP errors of the endpoint, always in OpenAI's error envelope.

Decisions (documented for clients):

* bad input (malformed JSON, schema violations, limits) -> 400, body too large -> 413,
  unknown pipeline -> 404 ``model_not_found``, missing/invalid key -> 401;
* a pipeline that cannot answer because its model services failed -> 502
  ``upstream_error`` (the server works, its providers did not), or 504 when they
  timed out or the request outlived ``server.request_timeout_s``; when every failed
  call was a context-length rejection the input is too long -> 400
  ``context_length_exceeded``; when every provider refused the request (their 4xx) -> 400
  ``invalid_request``; when every provider rate-limited it -> 429;
* a pipeline whose deciding calls (the final call and its fallbacks, or the failed layer's proposers) could not get
  room in their models' own ``rpm``/``tpm`` before the request's deadline, or were rate-limited by their providers
  -> 429 ``rate_limit_exceeded`` with ``Retry-After`` (seconds, rounded up) where the wait is known, never a 5xx;
* an answer that does not follow the request's ``response_format`` -> 502 ``invalid_structured_output``;
* every error of a pipeline that ran carries ``x-should-retry: false``: its calls were retried already, and the
  ``openai`` SDKs would otherwise rerun the whole pipeline (every layer) up to twice more;
* anything else is a bug -> 500 with a generic message (details go to the log only).
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from moa_ray.errors import PipelineError
from moa_ray.pipeline.structured import InvalidStructuredOutput
from moa_ray.pipeline.trace import CallRecord
from moa_ray.serve.openai_schema import ErrorBody, ErrorDetail

# A child of "ray.serve", so Serve writes these lines to the replica's log file.
log = logging.getLogger("ray.serve.moa_ray.ingress")

_STATUS_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}


class APIError(Exception):
    """An error response: HTTP status plus OpenAI's ``message``/``type``/``param``/``code``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        retry: bool | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _STATUS_TYPES.get(status) or ("invalid_request_error" if status < 500 else "server_error")
        self.retry = retry  # False: tell clients not to retry (the x-should-retry header the openai SDKs honour)
        self.retry_after_s = retry_after_s  # when a retry could succeed (the Retry-After header)

    def body(self) -> ErrorBody:
        return ErrorBody(error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code))

    def headers(self) -> dict[str, str]:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        if self.retry is not None:
            headers["x-should-retry"] = "true" if self.retry else "false"
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return headers

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers() or None)


_UNION_BRANCHES = {"str", "int", "float", "bool", "none", "dict"}


def _loc(loc: tuple[object, ...]) -> str:
    """``("messages", 0, "content", "str")`` -> ``messages[0].content`` (union branch names dropped)."""
    out = ""
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
            continue
        part = str(item)
        if part in _UNION_BRANCHES or "[" in part or part.startswith("function-") or part[:1].isupper():
            continue  # a union's branch (a type or a model's class name), not a field
        out += f".{part}" if out else part
    return out


def from_validation_error(err: ValidationError | RequestValidationError) -> APIError:
    """400 naming each bad field, without echoing the (possibly huge or secret) input values."""
    errors = err.errors()
    parts = []
    for e in errors:
        loc = tuple(p for p in e["loc"] if p != "body")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unrecognized request argument"
        parts.append(f"{_loc(loc)}: {msg}" if loc else msg)
    param = _loc(tuple(p for p in errors[0]["loc"] if p != "body")) if errors else None
    return APIError(400, "invalid request: " + "; ".join(dict.fromkeys(parts)), code="invalid_request", param=param or None)


def _failed_calls(err: PipelineError) -> list[str]:
    """The error class of each failed or cut call (data on the call records, not parsed from messages)."""
    trace = err.trace
    if trace is None:
        return []
    return [c.error_type or c.status for c in trace.calls if c.status != "ok"]


#: When every failed call failed the same way, the client learns what its providers said.
_ALL_FAILED_ALIKE: dict[str, tuple[int, str, str]] = {
    "ContextLengthExceeded": (400, "context_length_exceeded", "the conversation is too long for the pipeline's models"),
    "BadRequest": (400, "invalid_request", "the pipeline's models rejected the request"),
    "RateLimited": (429, "rate_limit_exceeded", "the pipeline's model services are rate limited; retry later"),
}
_TIMEOUTS = {"BackendTimeout", "cut"}
#: A model's own rpm/tpm had no room in time, or its provider answered 429.
_RATE_LIMITS = {"OverRateLimit", "RateLimited"}


def _deciding_calls(err: PipelineError) -> list[CallRecord]:
    """The calls whose failure failed the request: the final call with its fallbacks, or the failed layer's proposers
    (the last calls of the trace's last layer, by role)."""
    calls = err.trace.calls if err.trace is not None else []
    if not calls:
        return []
    last = calls[-1]
    return [c for c in calls if c.layer == last.layer and c.role == last.role]


def _rate_limited(err: PipelineError) -> APIError | None:
    """429 (with Retry-After where the wait is known) when every deciding call failed for a rate limit."""
    failed = [c for c in _deciding_calls(err) if c.status != "ok"]
    if not failed or any(c.error_type not in _RATE_LIMITS for c in failed):
        return None
    own = any(c.error_type == "OverRateLimit" for c in failed)
    text = "the pipeline's models are over their configured rate limits" if own else "the pipeline's model services are rate limited"
    waits = [c.retry_after_s for c in failed if c.retry_after_s is not None]
    return APIError(
        429, f"{text}; retry later: {err}", code="rate_limit_exceeded", retry=False, retry_after_s=max(waits) if waits else None
    )


def from_pipeline_error(err: PipelineError) -> APIError:
    """A pipeline that could not answer: the input did not fit or was refused (4xx), or the fault is upstream (502/504).
    Never to be retried by the client as it is: the pipeline's calls were retried already."""
    if isinstance(err, InvalidStructuredOutput):
        return APIError(502, str(err), code="invalid_structured_output", type="upstream_error", param="response_format", retry=False)
    limited = _rate_limited(err)
    if limited is not None:
        return limited
    failures = set(_failed_calls(err))
    if len(failures) == 1 and (only := next(iter(failures))) in _ALL_FAILED_ALIKE:
        status, code, text = _ALL_FAILED_ALIKE[only]
        return APIError(status, f"{text}: {err}", code=code, param="messages" if status == 400 else None, retry=False)
    if failures and failures <= _TIMEOUTS:
        return APIError(504, f"the pipeline's model services timed out: {err}", code="upstream_timeout", type="upstream_error", retry=False)
    return APIError(502, f"the pipeline's model services failed: {err}", code="upstream_error", type="upstream_error", retry=False)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI's envelope: FastAPI's own 422 and Starlette's 404/405 included."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, message, code=code).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error while serving a request")
        return APIError(500, "internal server error", code="internal_error").response()
