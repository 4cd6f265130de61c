"""OpenAI-compatible chat backend over ``httpx.AsyncClient``.

Works with vLLM, Together, Ollama, OpenAI and anything else speaking
``/v1/chat/completions``. One connection pool per backend instance (one per
Serve replica); retries with full-jitter exponential backoff on 429, 5xx and
timeouts (a read timeout only with ``timeout.retry_read``); context-length errors surface as :class:`ContextLengthExceeded` and are
never retried. The API key is read from the environment and never logged.
"""

from __future__ import annotations

import datetime
import email.utils
import functools
import json
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from httpx_sse import aconnect_sse
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_any,
    stop_before_delay,
    wait_random_exponential,
)

from moa_ray.backends.base import before_retry, chat_kwargs
from moa_ray.chat import ChatMessage, ChatParams, Completion, StreamChunk
from moa_ray.config import OpenAIModelSpec
from moa_ray.errors import BackendError, BackendTimeout, ConfigError, OverRateLimit, StreamInterrupted, UpstreamError, error_for_status
from moa_ray.wire import MalformedResponse, StreamReader, completion_of, estimated_usage, has_content

log = logging.getLogger(__name__)


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
        err = body.get("error", body) if isinstance(body, dict) else body
        if isinstance(err, dict):
            return str(err.get("message") or err)[:500]
        return str(err)[:500]
    except (ValueError, json.JSONDecodeError):
        return response.text[:500]


def classify_response(response: httpx.Response, model: str) -> BackendError:
    """Map an unsuccessful HTTP response onto the error hierarchy."""
    text = _error_text(response)
    return error_for_status(
        response.status_code,
        f"{model}: HTTP {response.status_code}: {text}",
        model=model,
        detail=json.dumps(_safe_json(response)),
        retry_after_s=retry_after_s(response.headers.get("Retry-After")),
    )


def retry_after_s(value: str | None) -> float | None:
    """``Retry-After`` in seconds: a number of seconds or an HTTP date (RFC 9110); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())


def _safe_json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _with_attempts(err: BackendError, retries: list[str]) -> BackendError:
    """The final error, carrying how many attempts were made and why the earlier ones failed. An OverRateLimit is the
    rate limit refusing a retry (:func:`~moa_ray.backends.base.before_retry`): that attempt was not made."""
    err.attempts, err.retries = len(retries) + (0 if isinstance(err, OverRateLimit) else 1), list(retries)
    return err


@functools.cache
def default_tls() -> ssl.SSLContext:
    """httpx's default certificate check (certifi's bundle, or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``), made once per
    process: making it loads the CA bundle (~20 ms of CPU), which every backend, and so every model of every eval
    worker and ingress replica, paid anew; one context serves any number of connections."""
    return httpx.create_ssl_context()


def _client_class(transport: str) -> type[httpx.AsyncClient]:
    """``httpx.AsyncClient``, or its subclass on aiohttp's connection pool (httpx-aiohttp): same API, same errors."""
    if transport == "aiohttp":
        from httpx_aiohttp import HttpxAiohttpClient

        return HttpxAiohttpClient
    return httpx.AsyncClient


def _transport_error(err: httpx.TransportError) -> httpx.TransportError:
    """The error as httpx's own transport would raise it.

    httpx-aiohttp 0.2 maps every aiohttp connection error (refused, reset, closed) to ``ConnectTimeout``; only
    aiohttp's timeouts are timeouts, so any other becomes the ``ConnectError`` it is (a 502, not a 504)."""
    import aiohttp

    cause = err.__cause__
    if isinstance(err, httpx.ConnectTimeout) and isinstance(cause, aiohttp.ClientError) and not isinstance(cause, TimeoutError):
        return httpx.ConnectError(str(err))
    return err


class OpenAIBackend:
    """Client for one model on an OpenAI-compatible endpoint."""

    def __init__(self, spec: OpenAIModelSpec, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.spec = spec
        headers = {"Content-Type": "application/json"}
        if spec.api_key_env:
            # keys loaded from secret files often end in a newline: sent as is, httpx would refuse (and quote) them
            key = (os.environ.get(spec.api_key_env) or "").strip()
            if not key:
                log.warning("environment variable %s is not set; calling %s without an API key", spec.api_key_env, spec.base_url)
            elif not key.isprintable() or " " in key:  # never echo the value
                raise ConfigError(f"the API key in {spec.api_key_env} holds spaces or control characters inside it")
            else:
                headers["Authorization"] = f"Bearer {key}"
        self._client = _client_class(spec.http_transport)(
            base_url=spec.base_url,
            headers=headers,
            timeout=httpx.Timeout(spec.timeout.read_s, connect=spec.timeout.connect_s),
            limits=httpx.Limits(max_connections=spec.max_connections, max_keepalive_connections=spec.max_connections),
            transport=transport,
            verify=default_tls(),
        )
        self._jitter = wait_random_exponential(multiplier=spec.backoff_s, max=spec.backoff_max_s)

    def _payload(self, messages: list[ChatMessage], params: ChatParams, stream: bool) -> dict[str, Any]:
        payload = {"model": self.spec.model, **chat_kwargs(self.spec, messages, params)}
        if stream:
            payload["stream"] = True
            payload["stream_options"] = {"include_usage": True}
        return payload

    def _retrying(self, budget_s: float | None, retries: list[str]) -> AsyncRetrying:
        """Retries until ``max_retries``, or until the next attempt would start after the call's budget
        (``ChatParams.timeout_s``) is spent; each failed attempt's cause is appended to ``retries``."""
        attempts = stop_after_attempt(self.spec.max_retries + 1)
        stop = attempts if budget_s is None else stop_any(attempts, stop_before_delay(budget_s))

        def before_sleep(state: RetryCallState) -> None:
            err = state.outcome.exception() if state.outcome else None
            retries.append(err.cause if isinstance(err, BackendError) else type(err).__name__)
            self._log_retry(state)

        return AsyncRetrying(
            stop=stop,
            wait=self._wait,
            retry=retry_if_exception(lambda e: isinstance(e, BackendError) and e.retryable),
            reraise=True,
            before_sleep=before_sleep,
        )

    def _log_retry(self, state: RetryCallState) -> None:
        """The error's class and status only: a provider's message may echo the key it was sent."""
        err = state.outcome.exception() if state.outcome else None
        status = getattr(err, "status_code", None)
        log.info(
            "%s: attempt %d failed (%s%s); retrying",
            self.spec.model,
            state.attempt_number,
            type(err).__name__,
            f", HTTP {status}" if status else "",
        )

    def _wait(self, state: RetryCallState) -> float:
        """The provider's ``Retry-After`` when it gave one (capped at ``backoff_max_s``), else full-jitter backoff."""
        err = state.outcome.exception() if state.outcome else None
        hinted = getattr(err, "retry_after_s", None)
        if hinted is not None:
            return min(float(hinted), self.spec.backoff_max_s)
        return self._jitter(state)

    def _attempt_timeout(self, deadline: float | None) -> httpx.Timeout:
        """The client's timeouts, shortened to what is left of the call's budget."""
        if deadline is None:
            return self._client.timeout
        left = deadline - time.monotonic()
        if left <= 0:
            raise BackendTimeout(f"{self.spec.model}: the call's time budget ran out", model=self.spec.model)
        read, connect = self.spec.timeout.read_s, self.spec.timeout.connect_s
        return httpx.Timeout(min(read, left), connect=min(connect, left), pool=left)

    def _timed_out(self, message: str, err: httpx.TimeoutException) -> BackendTimeout:
        """The attempt's timeout error. One that waited ``read_s`` for an answer is retried only with
        ``timeout.retry_read``: a provider that accepts calls and holds them (down, overloaded) would otherwise hold
        each call (max_retries + 1) x read_s, 480 s by default, where a refused connection fails at once."""
        timeout = BackendTimeout(message, model=self.spec.model)
        if isinstance(err, httpx.ReadTimeout) and not self.spec.timeout.retry_read:
            timeout.retryable = False
        return timeout

    @staticmethod
    def _deadline(params: ChatParams) -> float | None:
        return None if params.timeout_s is None else time.monotonic() + params.timeout_s

    async def _post_once(self, payload: dict[str, Any], deadline: float | None) -> dict[str, Any]:
        timeout = self._attempt_timeout(deadline)
        try:
            response = await self._client.post("/chat/completions", json=payload, timeout=timeout)
        except httpx.TransportError as raised:
            err = _transport_error(raised)
            if isinstance(err, httpx.TimeoutException):
                raise self._timed_out(f"{self.spec.model}: {type(err).__name__} after {timeout}", err) from None
            raise UpstreamError(f"{self.spec.model}: connection failed: {type(err).__name__}: {err}", model=self.spec.model) from None
        if response.status_code != 200:
            raise classify_response(response, self.spec.model)
        try:
            body: dict[str, Any] = response.json()
            return body
        except ValueError:
            raise UpstreamError(f"{self.spec.model}: response is not JSON", model=self.spec.model) from None

    async def chat(self, messages: list[ChatMessage], params: ChatParams) -> Completion:
        payload = self._payload(messages, params, stream=False)
        start = time.perf_counter()
        deadline, retries = self._deadline(params), list[str]()
        try:
            async for attempt in self._retrying(params.timeout_s, retries):
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        await before_retry(deadline)  # a rate-limited model's retry takes room first
                    body = await self._post_once(payload, deadline)
        except BackendError as err:
            raise _with_attempts(err, retries) from None
        try:
            return completion_of(
                body, model=self.spec.model, latency_s=time.perf_counter() - start, attempts=len(retries) + 1, retries=retries
            )
        except MalformedResponse as err:
            raise UpstreamError(f"{self.spec.model}: {err}", model=self.spec.model) from None

    async def stream(self, messages: list[ChatMessage], params: ChatParams) -> AsyncIterator[StreamChunk]:
        """Stream deltas; retries only until the first token has been received."""
        payload = self._payload(messages, params, stream=True)
        deadline, retries = self._deadline(params), list[str]()
        try:
            async for chunk in self._stream_attempts(payload, params.timeout_s, deadline, retries):
                yield chunk
        except BackendError as err:
            raise _with_attempts(err, retries) from None

    async def _stream_attempts(
        self, payload: dict[str, Any], budget_s: float | None, deadline: float | None, retries: list[str]
    ) -> AsyncIterator[StreamChunk]:
        start = time.perf_counter()
        async for attempt in self._retrying(budget_s, retries):
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    await before_retry(deadline)
                reader = StreamReader()
                timeout = self._attempt_timeout(deadline)
                try:
                    async with aconnect_sse(self._client, "POST", "/chat/completions", json=payload, timeout=timeout) as source:
                        if source.response.status_code != 200:
                            await source.response.aread()
                            raise classify_response(source.response, self.spec.model)
                        async for event in source.aiter_sse():
                            if event.data.strip() == "[DONE]":
                                break
                            if deadline is not None and time.monotonic() > deadline:
                                raise httpx.ReadTimeout("the call's time budget ran out")
                            piece = reader.read(event.json())
                            if has_content(piece):
                                yield piece
                except httpx.TransportError as raised:
                    err = _transport_error(raised)
                    started = bool(reader.parts or reader.thoughts or reader.tools.calls())
                    if isinstance(err, httpx.TimeoutException):
                        if started:
                            raise StreamInterrupted(f"{self.spec.model}: stream timed out mid-answer", model=self.spec.model) from None
                        raise self._timed_out(f"{self.spec.model}: stream timed out", err) from None
                    if started:
                        raise StreamInterrupted(f"{self.spec.model}: stream broke mid-answer: {err}", model=self.spec.model) from None
                    raise UpstreamError(f"{self.spec.model}: connection failed: {err}", model=self.spec.model) from None
        # a provider that ignores stream_options.include_usage: count here, and say so on the call's record
        fallback = None if reader.usage else estimated_usage(payload, reader)
        completion = reader.completion(
            model=self.spec.model, latency_s=time.perf_counter() - start, usage=fallback, attempts=len(retries) + 1, retries=retries
        )
        completion.usage_estimated = fallback is not None
        yield StreamChunk(completion=completion)

    async def check_health(self) -> None:
        """Healthy while the client is open. A failing provider is not a dead replica: restarting this
        replica would not mend it and would drop its other calls, so provider errors stay per-call errors
        (retried, traced) instead of health failures."""
        if self._client.is_closed:
            raise BackendError(f"{self.spec.model}: the HTTP client is closed", model=self.spec.model)

    async def aclose(self) -> None:
        await self._client.aclose()
