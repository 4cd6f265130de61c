"""One deadline per request, retries included, and retries visible on every call record.

A provider that accepts connections and never answers must not hold a request for
read-timeout x attempts: the request's deadline (``server.request_timeout_s``, ``moa-ray run
--timeout``, ``eval generate --timeout``) is the budget of every call and every retry in it.
Retries that rescued a call show on its record (attempts, causes), so reliability reports are true.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from bench.simulator import SimulatorConfig
from moa_ray.backends import create_backend
from moa_ray.backends.openai_http import OpenAIBackend
from moa_ray.chat import ChatMessage, ChatParams
from moa_ray.config import OpenAIModelSpec, parse_config
from moa_ray.errors import AggregatorFailed, BackendError, BackendTimeout, LayerFailed, UpstreamError
from moa_ray.pipeline import build_pipeline
from moa_ray.pipeline.agents import LocalAgent
from moa_ray.serve.http_errors import from_pipeline_error
from tests.test_serve_api import USER, asgi_client, assert_openai_error, make_api

MESSAGES = [ChatMessage(role="user", content="hello")]
#: The models' read timeout: what a call without its budget would wait per attempt (x 4 attempts).
READ_S = 120
#: An upper bound for "kept to its budget": 10x or more every budget here, 12x under one read timeout; never
#: tighter, so a busy machine cannot fail it, and a call that waited for its read timeout always does.
WITHIN_BUDGET_S = READ_S / 12


class FlakyProvider:
    """Test double: answers 503 ``failures`` times (with ``Retry-After`` when given), then a completion."""

    def __init__(self, failures: int, retry_after_s: float | None = None) -> None:
        self.failures = failures
        self.retry_after_s = retry_after_s
        self.requests = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        if self.requests <= self.failures:
            headers = {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else None
            return httpx.Response(503, json={"error": {"message": "overloaded"}}, headers=headers)
        if json.loads(request.content).get("stream"):
            events = [
                {"choices": [{"delta": {"content": "fine"}, "finish_reason": "stop"}]},
                {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}},
            ]
            body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
            return httpx.Response(200, text=body, headers={"Content-Type": "text/event-stream"})
        return httpx.Response(
            200,
            json={
                "choices": [{"message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1},
            },
        )


def slow_spec(**extra) -> OpenAIModelSpec:
    """A model whose own timeouts alone would hold a call for minutes: 120 s reads x 4 attempts."""
    base = {"backend": "openai", "model": "m", "base_url": "http://provider.test/v1", "max_retries": 3, "backoff_s": 0.01}
    return OpenAIModelSpec.model_validate({**base, "timeout": {"read_s": READ_S}, **extra})


def backend_over(transport: httpx.AsyncBaseTransport, **extra) -> OpenAIBackend:
    return OpenAIBackend(slow_spec(**extra), transport=transport)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the backend keeps to its budget


@pytest.mark.parametrize("stream", [False, True])
def test_a_hanging_provider_costs_the_calls_budget_not_read_timeout_times_attempts(simulator, stream):
    sim = simulator(SimulatorConfig(hang=True))  # a real socket that accepts and never answers
    backend = OpenAIBackend(slow_spec(base_url=sim.base_url))

    async def go():
        params = ChatParams(timeout_s=0.4)
        if stream:
            return [c async for c in backend.stream(MESSAGES, params)]
        return await backend.chat(MESSAGES, params)

    start = time.perf_counter()
    with pytest.raises(BackendTimeout) as info:
        asyncio.run(go())
    elapsed = time.perf_counter() - start
    assert elapsed < WITHIN_BUDGET_S, elapsed
    assert sim.stats.requests == 1  # no retry was started that could not finish in time
    assert info.value.attempts == 1


def test_retries_stop_when_the_next_attempt_would_start_after_the_budget():
    provider = FlakyProvider(failures=100, retry_after_s=0.3)  # each retry waits 0.3 s: the second would end past 0.5 s
    backend = backend_over(provider)  # type: ignore[arg-type]
    start = time.perf_counter()
    with pytest.raises(UpstreamError) as info:
        asyncio.run(backend.chat(MESSAGES, ChatParams(timeout_s=0.5)))
    assert time.perf_counter() - start < WITHIN_BUDGET_S
    assert provider.requests == 2  # max_retries alone would have allowed 4 (and a third attempt would start past 0.5 s)
    assert info.value.attempts == provider.requests
    assert info.value.retries == ["UpstreamError (HTTP 503)"] * (provider.requests - 1)


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_after_retries_says_how_many_attempts_and_why(stream):
    provider = FlakyProvider(failures=2)
    backend = backend_over(provider)  # type: ignore[arg-type]

    async def go():
        if stream:
            chunks = [c async for c in backend.stream(MESSAGES, ChatParams())]
            return chunks[-1].completion
        return await backend.chat(MESSAGES, ChatParams())

    completion = asyncio.run(go())
    assert completion.text == "fine"
    assert completion.attempts == 3
    assert completion.retries == ["UpstreamError (HTTP 503)", "UpstreamError (HTTP 503)"]


def test_attempts_cross_the_serve_handle_with_the_error():
    err = UpstreamError("down", model="m", status_code=503)
    err.attempts, err.retries = 3, ["RateLimited (HTTP 429)", "UpstreamError (HTTP 503)"]
    back = BackendError.from_dict(err.to_dict())
    assert isinstance(back, UpstreamError)
    assert (back.attempts, back.retries) == (3, ["RateLimited (HTTP 429)", "UpstreamError (HTTP 503)"])
    assert "down" not in back.cause  # a retry cause never carries the provider's text


# --------------------------------------------------------------------------- the pipeline shares one deadline


def pipeline_over(transports: dict[str, httpx.AsyncBaseTransport | None], base_url: str = "http://provider.test/v1"):
    models = {name: slow_spec(model=name, base_url=base_url).model_dump() for name in transports}
    config = parse_config({"models": models, "pipelines": {"p": {"kind": "moa", "layers": [["a", "b"]], "aggregator": "a"}}})
    agents = {name: LocalAgent(OpenAIBackend(config.models[name], transport=t)) for name, t in transports.items()}  # type: ignore[arg-type]
    return build_pipeline(config, "p", agents)


def test_one_deadline_bounds_the_whole_request_and_maps_to_504(simulator):
    sim = simulator(SimulatorConfig(hang=True))
    pipeline = pipeline_over({"a": None, "b": None}, sim.base_url)
    start = time.perf_counter()
    with pytest.raises(LayerFailed) as info:
        asyncio.run(pipeline.run("hi", timeout_s=0.5))
    assert time.perf_counter() - start < WITHIN_BUDGET_S
    calls = info.value.trace.calls
    assert [c.error_type for c in calls] == ["BackendTimeout", "BackendTimeout"]
    assert from_pipeline_error(info.value).status == 504


def test_retries_behind_an_answer_show_on_the_trace():
    flaky = FlakyProvider(failures=1)
    pipeline = pipeline_over({"a": flaky, "b": FlakyProvider(failures=0)})  # type: ignore[dict-item]
    result = asyncio.run(pipeline.run("hi"))
    retried = [c for c in result.trace.calls if c.retries]
    assert len(retried) == 1 and retried[0].attempts == 2
    assert retried[0].retries == ["UpstreamError (HTTP 503)"]
    assert result.trace.summary()["retries"] == 1
    assert result.trace.to_json_dict()["calls"][retried[0].index]["attempts"] == 2


def test_a_failed_calls_attempts_are_on_its_record():
    pipeline = pipeline_over({"a": FlakyProvider(failures=100), "b": FlakyProvider(failures=0)})  # type: ignore[dict-item]
    with pytest.raises(AggregatorFailed) as info:  # a is also the aggregator, so the request fails
        asyncio.run(pipeline.run("hi"))
    failed = [c for c in info.value.trace.calls if c.status == "error"]
    assert failed and all(c.attempts == 4 and len(c.retries) == 3 for c in failed)


# --------------------------------------------------------------------------- the endpoint


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_endpoint_answers_504_at_its_deadline_with_a_hanging_provider(simulator, stream):
    sim = simulator(SimulatorConfig(hang=True))
    config = parse_config(
        {
            "models": {"a": slow_spec(model="a", base_url=sim.base_url).model_dump()},
            "pipelines": {"single": {"kind": "moa", "layers": [["a"]], "aggregator": "a"}},
            "server": {"request_timeout_s": 0.5},
        }
    )
    app = make_api(config, agents={"a": LocalAgent(create_backend(config.models["a"]))})
    start = time.perf_counter()
    async with asgi_client(app) as client:
        response = await client.post("/v1/chat/completions", json={"model": "single", "messages": USER, "stream": stream})
    assert time.perf_counter() - start < WITHIN_BUDGET_S
    assert_openai_error(response, 504)
    assert sim.stats.requests == 1  # read_s=120 x 4 attempts would have been 8 minutes
