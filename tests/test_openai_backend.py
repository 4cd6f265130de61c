"""The openai backend against local HTTP servers: the simulator, and scripted handlers via httpx.MockTransport.

Retries (with backoff) on 429 / 5xx / timeouts, giving up after ``max_retries``,
context-length errors reported as such and never retried, read timeouts, the API
key (sent as a Bearer token, never in errors or logs) and streaming.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable

import httpx
import pytest

from bench.simulator import Behaviour, SimulatorConfig
from moa_ray.backends.openai_http import OpenAIBackend, default_tls
from moa_ray.chat import ChatMessage, ChatParams, Completion
from moa_ray.config import OpenAIModelSpec
from moa_ray.errors import (
    AuthenticationFailed,
    BackendError,
    BackendTimeout,
    BadRequest,
    ContextLengthExceeded,
    RateLimited,
    StreamInterrupted,
    UpstreamError,
)
from moa_ray.pipeline.agents import LocalAgent

MESSAGES = [ChatMessage(role="user", content="Why is the sky blue?")]
SECRET = "sk-test-0123456789abcdefSECRET"


def spec(base_url: str = "http://provider.test/v1", **extra) -> OpenAIModelSpec:
    extra.setdefault("backoff_s", 0.01)
    extra.setdefault("backoff_max_s", 0.05)
    return OpenAIModelSpec(backend="openai", model="test/model", base_url=base_url, **extra)


def ok_body(text: str = "Rayleigh scattering.", prompt_tokens: int = 7, completion_tokens: int = 3) -> dict:
    return {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
    }


class Script:
    """A scripted provider: each request gets the next step (a status + body, or an exception to raise)."""

    def __init__(self, *steps: int | dict | Exception | tuple[int, dict]) -> None:
        self.steps = list(steps)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if isinstance(step, Exception):
            raise type(step)(str(step), request=request)
        if isinstance(step, dict):
            return httpx.Response(200, json=step)
        if isinstance(step, tuple):
            return httpx.Response(step[0], json=step[1])
        return httpx.Response(step, json={"error": {"message": f"status {step}", "type": "server_error"}})


def backend_for(script: Callable, **extra) -> OpenAIBackend:
    return OpenAIBackend(spec(**extra), transport=httpx.MockTransport(script))


def chat(backend: OpenAIBackend, params: ChatParams | None = None) -> Completion:
    async def go():
        try:
            return await backend.chat(MESSAGES, params or ChatParams())
        finally:
            await backend.aclose()

    return asyncio.run(go())


# --------------------------------------------------------------------------- retries


@pytest.mark.parametrize(
    "failures",
    [
        [429],
        [500, 503],
        [httpx.ReadTimeout("read timed out"), 502],
        [httpx.ConnectError("connection refused"), httpx.ConnectTimeout("connect timed out")],
    ],
    ids=["429", "5xx", "timeout-then-5xx", "connect-errors"],
)
def test_retries_transient_failures_then_succeeds(failures):
    script = Script(*failures, ok_body("fine"))
    completion = chat(backend_for(script, max_retries=3, timeout={"retry_read": True}))
    assert completion.text == "fine"
    assert len(script.requests) == len(failures) + 1
    assert completion.usage.prompt_tokens == 7 and completion.usage.completion_tokens == 3
    assert completion.finish_reason == "stop" and completion.model == "test/model"


@pytest.mark.parametrize(("status", "error"), [(429, RateLimited), (500, UpstreamError), (503, UpstreamError)])
def test_gives_up_after_max_retries(status, error):
    script = Script(status)
    with pytest.raises(error) as info:
        chat(backend_for(script, max_retries=2))
    assert len(script.requests) == 3
    assert info.value.status_code == status and info.value.retryable
    assert f"HTTP {status}" in str(info.value)


def test_backoff_grows_exponentially(monkeypatch):
    """Full jitter draws each wait from [0, backoff_s * 2^attempt]; pinned to the top, the waits are 0.05, 0.1, 0.2 s."""
    import tenacity.wait

    monkeypatch.setattr(tenacity.wait.random, "uniform", lambda low, high: high)
    script = Script(503, 503, 503, ok_body())
    start = time.perf_counter()
    chat(backend_for(script, max_retries=3, backoff_s=0.05, backoff_max_s=10))
    assert len(script.requests) == 4
    assert time.perf_counter() - start >= 0.05 + 0.1 + 0.2


def test_retry_after_is_honoured_and_bounded():
    """A 429's Retry-After (seconds or an HTTP date) sets the wait, capped at backoff_max_s; without one, jitter."""
    from types import SimpleNamespace

    from moa_ray.backends.openai_http import classify_response, retry_after_s

    assert retry_after_s("2.5") == 2.5 and retry_after_s("-3") == 0.0 and retry_after_s(None) is None
    assert retry_after_s("soon") is None and retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a past date
    response = httpx.Response(429, headers={"Retry-After": "7"}, json={"error": {"message": "slow down"}})
    err = classify_response(response, "m")
    assert isinstance(err, RateLimited) and err.retry_after_s == 7.0
    assert type(err).from_dict(err.to_dict()).retry_after_s == 7.0  # survives the Serve hop

    backend = backend_for(Script(ok_body()), backoff_s=0.01, backoff_max_s=5)
    state = lambda e: SimpleNamespace(outcome=SimpleNamespace(exception=lambda: e), attempt_number=1)  # noqa: E731
    assert backend._wait(state(err)) == 5  # 7 s asked, capped at backoff_max_s
    err.retry_after_s = 0.3
    assert backend._wait(state(err)) == 0.3
    assert backend._wait(state(RateLimited("no hint", model="m"))) <= 0.02  # full jitter of the first backoff
    asyncio.run(backend.aclose())


def test_a_429_with_retry_after_waits_that_long_then_succeeds():
    script = Script((429, {"error": {"message": "busy"}}), ok_body("fine"))
    original = script.__call__

    def with_header(request: httpx.Request) -> httpx.Response:
        response = original(request)
        if response.status_code == 429:
            return httpx.Response(429, headers={"Retry-After": "0.2"}, json=response.json())
        return response

    start = time.perf_counter()
    completion = chat(backend_for(with_header, max_retries=1, backoff_s=0.001, backoff_max_s=5))
    assert completion.text == "fine" and len(script.requests) == 2
    assert time.perf_counter() - start >= 0.2  # not the 1 ms backoff


def test_backoff_is_capped(monkeypatch):
    import tenacity.wait

    monkeypatch.setattr(tenacity.wait.random, "uniform", lambda low, high: high)
    script = Script(429, 429, 429, 429, ok_body())
    backend = backend_for(script, max_retries=4, backoff_s=0.05, backoff_max_s=0.06)
    waits: list[float] = []
    own_wait = backend._wait
    monkeypatch.setattr(backend, "_wait", lambda state: waits.append(own_wait(state)) or waits[-1])  # the waits it slept
    chat(backend)
    assert len(script.requests) == 5
    assert waits == pytest.approx([0.05, 0.06, 0.06, 0.06])  # instead of 0.05, 0.1, 0.2, 0.4


@pytest.mark.parametrize(
    "body",
    [
        {"error": {"message": "This model's maximum context length is 4096 tokens.", "code": "context_length_exceeded"}},
        {"error": {"message": "Input validation error: prompt is too long"}},
        {"object": "error", "message": "This model's maximum context length is 2048 tokens. However, you requested 3000"},
    ],
    ids=["openai", "tgi", "vllm"],
)
def test_context_length_error_is_reported_and_not_retried(body):
    script = Script((400, body))
    with pytest.raises(ContextLengthExceeded) as info:
        chat(backend_for(script, max_retries=3))
    assert len(script.requests) == 1
    assert not info.value.retryable and info.value.status_code == 400


def test_other_client_errors_are_not_retried():
    script = Script((400, {"error": {"message": "temperature must be <= 2"}}))
    with pytest.raises(BadRequest, match="temperature must be <= 2"):
        chat(backend_for(script, max_retries=3))
    assert len(script.requests) == 1


def test_malformed_success_is_an_upstream_error():
    script = Script({"choices": []})
    with pytest.raises(UpstreamError, match="malformed response"):
        chat(backend_for(script, max_retries=0))


def test_context_length_against_the_simulator_sends_one_request(simulator):
    sim = simulator(SimulatorConfig(latency_ms=1, context_tokens=5))
    backend = OpenAIBackend(spec(sim.base_url, max_retries=3))
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 5 tokens"):
        asyncio.run(backend.chat([ChatMessage(role="user", content="one two three four five six seven")], ChatParams()))
    assert sim.stats.requests == 1


# --------------------------------------------------------------------------- timeouts


TRANSPORTS = pytest.mark.parametrize("transport", ["aiohttp", "httpx"])


@TRANSPORTS
@pytest.mark.parametrize("retry_read", [False, True])
def test_read_timeout_raises_backend_timeout(simulator, transport, retry_read):
    """A provider that accepts the call and never answers: one attempt of read_s by default (a retry would hold the
    call read_s more, 4 x 120 s at the defaults), retried only with timeout.retry_read."""
    sim = simulator(SimulatorConfig(hang=True))
    timeout = {"read_s": 0.15, "connect_s": 1, "retry_read": retry_read}
    backend = OpenAIBackend(spec(sim.base_url, timeout=timeout, max_retries=1, http_transport=transport))
    start = time.perf_counter()
    with pytest.raises(BackendTimeout) as info:
        asyncio.run(backend.chat(MESSAGES, ChatParams()))
    assert info.value.retryable == retry_read and "test/model" in str(info.value)
    assert sim.stats.requests == info.value.attempts == (2 if retry_read else 1)  # with retry_read: one retry
    assert 0.15 * sim.stats.requests <= time.perf_counter() - start < 3


@TRANSPORTS
def test_unreachable_provider_is_an_upstream_error(transport):
    """A refused connection is a 502-class upstream error on both transports, never a timeout (httpx-aiohttp
    reports it as ConnectTimeout; the backend takes it back to what it is)."""
    from bench.simulator import free_port

    backend = OpenAIBackend(spec(f"http://127.0.0.1:{free_port()}/v1", max_retries=1, http_transport=transport))
    with pytest.raises(UpstreamError, match="connection failed") as info:
        asyncio.run(backend.chat(MESSAGES, ChatParams()))
    assert not isinstance(info.value, BackendTimeout)


@TRANSPORTS
def test_a_stream_cut_mid_answer_is_interrupted_not_timed_out(transport):
    """A provider that closes the connection after one delta: StreamInterrupted (not retried: text was sent)."""

    async def cut_after_one_delta():
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            event = json.dumps({"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]})
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            data = f"data: {event}\n\n".encode()
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.transport.abort()  # no final chunk: the body breaks off

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        backend = OpenAIBackend(spec(f"http://127.0.0.1:{port}/v1", max_retries=2, http_transport=transport))
        got = []
        try:
            with pytest.raises(StreamInterrupted):
                async for chunk in backend.stream(MESSAGES, ChatParams()):
                    got.append(chunk.delta)
        finally:
            await backend.aclose()
            server.close()
        return got

    assert asyncio.run(cut_after_one_delta()) == ["Hel"]


# --------------------------------------------------------------------------- API key


def test_api_key_is_sent_as_bearer_from_the_environment(simulator, monkeypatch):
    monkeypatch.setenv("MOA_TEST_API_KEY", SECRET)
    sim = simulator(SimulatorConfig(latency_ms=1))
    completion = asyncio.run(OpenAIBackend(spec(sim.base_url, api_key_env="MOA_TEST_API_KEY")).chat(MESSAGES, ChatParams()))
    assert completion.text
    assert sim.stats.auth_headers == [f"Bearer {SECRET}"]


def test_api_key_never_appears_in_errors_or_logs(simulator, monkeypatch, caplog):
    monkeypatch.setenv("MOA_TEST_API_KEY", SECRET)
    caplog.set_level(logging.DEBUG)  # every logger, httpx and httpcore included
    errors: list[BackendError] = []

    sim = simulator(SimulatorConfig(latency_ms=1, failure_rate=1.0, failure_status=500))
    hanging = simulator(SimulatorConfig(hang=True))
    scripts = [Script(401), Script((400, {"error": {"message": "bad"}})), Script(429)]
    backends = [
        OpenAIBackend(spec(sim.base_url, api_key_env="MOA_TEST_API_KEY", max_retries=2)),
        OpenAIBackend(spec(hanging.base_url, api_key_env="MOA_TEST_API_KEY", max_retries=1, timeout={"read_s": 0.2})),
        *[OpenAIBackend(spec(api_key_env="MOA_TEST_API_KEY", max_retries=1), transport=httpx.MockTransport(s)) for s in scripts],
    ]
    for backend in backends:
        with pytest.raises(BackendError) as info:
            asyncio.run(backend.chat(MESSAGES, ChatParams()))
        errors.append(info.value)

    assert isinstance(errors[2], AuthenticationFailed)
    assert scripts[0].requests[0].headers["authorization"] == f"Bearer {SECRET}"
    assert "retrying" in caplog.text  # the retries were logged...
    for err in errors:
        for text in (str(err), repr(err), json.dumps(err.to_dict())):
            assert SECRET not in text
    assert SECRET not in caplog.text  # ...without the key
    assert SECRET[:12] not in caplog.text


def test_missing_key_variable_warns_by_name_and_sends_no_header(simulator, monkeypatch, caplog):
    monkeypatch.delenv("MOA_TEST_MISSING_KEY", raising=False)
    sim = simulator(SimulatorConfig(latency_ms=1))
    with caplog.at_level(logging.WARNING, logger="moa_ray"):
        backend = OpenAIBackend(spec(sim.base_url, api_key_env="MOA_TEST_MISSING_KEY"))
    assert "MOA_TEST_MISSING_KEY is not set" in caplog.text
    asyncio.run(backend.chat(MESSAGES, ChatParams()))
    assert sim.stats.auth_headers == [""]


# --------------------------------------------------------------------------- payload and streaming


def test_payload_carries_model_defaults_and_call_overrides():
    script = Script(ok_body())
    backend = backend_for(script, temperature=0.3, max_tokens=77)
    chat(backend, ChatParams(top_p=0.9, stop=["\n\n"], seed=5))
    body = json.loads(script.requests[0].content)
    assert body == {
        "model": "test/model",
        "messages": [{"role": "user", "content": "Why is the sky blue?"}],
        "temperature": 0.3,
        "max_tokens": 77,
        "top_p": 0.9,
        "stop": ["\n\n"],
        "seed": 5,
    }
    assert script.requests[0].url == "http://provider.test/v1/chat/completions"
    script2 = Script(ok_body())
    chat(backend_for(script2, temperature=0.3), ChatParams(temperature=0.0, max_tokens=5, json_mode=True))
    body2 = json.loads(script2.requests[0].content)
    assert (body2["temperature"], body2["max_tokens"], body2["response_format"]) == (0.0, 5, {"type": "json_object"})


def test_streaming_yields_deltas_then_the_completion(simulator):
    sim = simulator(SimulatorConfig(latency_ms=50, output_tokens=12))
    agent = LocalAgent(OpenAIBackend(spec(sim.base_url)))

    async def consume():
        return [chunk async for chunk in agent.stream(MESSAGES, ChatParams(max_tokens=8))]

    chunks = asyncio.run(consume())
    *deltas, last = chunks
    assert len(deltas) == 8 and all(c.delta and c.completion is None for c in deltas)
    completion = last.completion
    assert completion is not None and completion.text == "".join(c.delta for c in deltas)
    assert completion.usage.completion_tokens == 8 and completion.usage.prompt_tokens > 0
    assert completion.finish_reason == "length"
    assert sim.stats.requests == 1


def test_streaming_retries_until_the_first_token(simulator):
    sim = simulator(SimulatorConfig(latency_ms=10, models={"test/model": Behaviour(latency_ms=10, failure_rate=1.0, failure_status=503)}))
    backend = OpenAIBackend(spec(sim.base_url, max_retries=2))

    async def consume():
        return [chunk async for chunk in backend.stream(MESSAGES, ChatParams())]

    with pytest.raises(UpstreamError, match="HTTP 503"):
        asyncio.run(consume())
    assert sim.stats.requests == 3


def test_chat_through_the_simulator_reports_usage_and_latency(simulator):
    sim = simulator(SimulatorConfig(latency_ms=100, output_tokens=20))
    completion = asyncio.run(OpenAIBackend(spec(sim.base_url)).chat(MESSAGES, ChatParams(max_tokens=32)))
    assert len(completion.text.split()) == 20 and completion.usage.completion_tokens == 20
    assert completion.usage.prompt_tokens == 5 and completion.finish_reason == "stop"
    assert 0.1 <= completion.latency_s < 10  # seconds (the simulator's 100 ms), not milliseconds


def test_one_backend_sends_concurrent_requests_over_its_pool(simulator):
    sim = simulator(SimulatorConfig(latency_ms=200))
    backend = OpenAIBackend(spec(sim.base_url))

    async def many():
        return await asyncio.gather(*(backend.chat(MESSAGES, ChatParams()) for _ in range(8)))

    results = asyncio.run(many())
    assert len(results) == 8 and sim.stats.max_in_flight == 8  # all eight at the provider at once: none waited for another


def test_retry_log_lines_carry_no_provider_text(caplog):
    """A provider may echo the key in its error message; the retry log keeps only the class and status."""
    script = Script((429, {"error": {"message": "bad key sk-echoed-secret-123456"}}), ok_body("fine"))
    with caplog.at_level(logging.INFO, logger="moa_ray.backends.openai_http"):
        chat(backend_for(script, max_retries=1, backoff_s=0.001))
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert retries == ["test/model: attempt 1 failed (RateLimited, HTTP 429); retrying"]
    assert "sk-echoed" not in caplog.text


@pytest.mark.parametrize("transport", ["httpx", "aiohttp"])
def test_every_backend_checks_certificates_with_one_context_made_once(transport):
    """httpx would load the CA bundle for each client (~20 ms); the backends share one context, httpx's default."""
    backends = [OpenAIBackend(spec("https://api.example.com/v1", http_transport=transport)) for _ in range(3)]
    pool = backends[0]._client._transport
    context = getattr(pool, "ssl_context", None) or pool._pool._ssl_context
    assert context is default_tls()
    assert all((getattr(b._client._transport, "ssl_context", None) or b._client._transport._pool._ssl_context) is context for b in backends)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
