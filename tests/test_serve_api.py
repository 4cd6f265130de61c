"""The OpenAI-compatible API in-process (no Ray): the FastAPI app of the ingress over agents that call the
simulator, driven by the official ``openai`` client and raw HTTP. Covers the schema, usage sums, streaming,
the trace extension, every bad-input path (4xx, never 5xx), auth, failure mapping and key redaction."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import openai
import pytest

from bench.simulator import Behaviour, SimulatorConfig
from moa_ray.backends import create_backend
from moa_ray.backends.openai_http import OpenAIBackend
from moa_ray.config import parse_config
from moa_ray.pipeline import build_pipeline
from moa_ray.pipeline.agents import LocalAgent
from moa_ray.serve.auth import REDACTED, KeyVerifier, Redactor
from moa_ray.serve.ingress import create_api
from moa_ray.serve.service import ChatService

pytestmark = pytest.mark.anyio

KEY = "test-client-key-0001"
OUTPUT_TOKENS = 12


def make_config(base_url: str, *, server: dict | None = None, extra_models: dict | None = None, pipelines: dict | None = None) -> Any:
    model = {"backend": "openai", "base_url": base_url, "max_retries": 0, "max_tokens": 64}
    models = {"a": {**model, "model": "a"}, "b": {**model, "model": "b"}, **(extra_models or {})}
    return parse_config(
        {
            "models": models,
            "pipelines": pipelines
            or {
                "moa2": {"kind": "moa", "description": "two proposers", "layers": [["a", "b"]], "aggregator": "a"},
                "single": {"kind": "moa", "layers": [["b"]], "aggregator": "b"},
            },
            "server": server or {},
        }
    )


def make_api(config: Any, *, keys: tuple[str, ...] = (KEY,), agents: dict | None = None) -> Any:
    agents = agents or {name: LocalAgent(create_backend(spec)) for name, spec in config.models.items()}
    pipelines = {name: build_pipeline(config, name, agents) for name in config.pipelines}
    return create_api(ChatService(config, pipelines, Redactor.for_config(config, extra=keys)), KeyVerifier(keys))


def asgi_client(app: Any, key: str | None = KEY) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://moa.test", headers=headers, timeout=30)


def openai_client(app: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://moa.test/v1", api_key=KEY, http_client=asgi_client(app, None), max_retries=0)


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and isinstance(err["message"], str)
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.fixture
def sim(simulator):
    return simulator(SimulatorConfig(latency_ms=20, output_tokens=OUTPUT_TOKENS))


USER = [{"role": "user", "content": "What is a mixture of agents?"}]


# --------------------------------------------------------------------------- happy paths


async def test_openai_client_completion_sums_usage_over_every_call(sim):
    app = make_api(make_config(sim.base_url))
    async with openai_client(app) as client:
        reply = await client.chat.completions.create(model="moa2", messages=USER, extra_body={"moa": {"trace": True}})
    assert reply.object == "chat.completion" and reply.model == "moa2" and reply.id.startswith("chatcmpl-")
    assert len(reply.choices) == 1
    assert reply.choices[0].message.role == "assistant" and len(reply.choices[0].message.content.split()) == OUTPUT_TOKENS
    assert reply.choices[0].finish_reason == "stop"
    trace = reply.model_extra["moa"]["trace"]
    calls = trace["calls"]
    assert [c["role"] for c in calls] == ["proposer", "proposer", "aggregator"] and all(c["status"] == "ok" for c in calls)
    assert reply.usage.completion_tokens == 3 * OUTPUT_TOKENS == sum(c["completion_tokens"] for c in calls)
    assert reply.usage.prompt_tokens == sum(c["prompt_tokens"] for c in calls) > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert sim.stats.requests == 3


async def test_trace_only_when_asked(sim):
    async with asgi_client(make_api(make_config(sim.base_url))) as client:
        body = (await client.post("/v1/chat/completions", json={"model": "moa2", "messages": USER})).json()
    assert "moa" not in body and body["choices"][0]["logprobs"] is None


async def test_openai_client_stream_ends_with_usage_and_done(sim):
    app = make_api(make_config(sim.base_url, server={"stream_coalesce_ms": 0}))  # one event per token
    async with openai_client(app) as client:
        plain = await client.chat.completions.create(model="moa2", messages=USER)
        stream = await client.chat.completions.create(
            model="moa2", messages=USER, stream=True, stream_options={"include_usage": True}, extra_body={"moa": {"trace": True}}
        )
        chunks = [chunk async for chunk in stream]
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(deltas) == plain.choices[0].message.content
    assert len([d for d in deltas if d]) == OUTPUT_TOKENS  # token by token, not one blob
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].choices[0].finish_reason == "stop"
    assert final[0].model_extra["moa"]["trace"]["calls"][-1]["role"] == "aggregator"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == {**plain.usage.model_dump()}
    assert {c.id for c in chunks} == {chunks[0].id}


async def test_coalesced_stream_carries_every_byte_in_fewer_events(sim):
    app = make_api(make_config(sim.base_url, server={"stream_coalesce_ms": 50}))
    async with openai_client(app) as client:
        plain = await client.chat.completions.create(model="moa2", messages=USER)
        stream = await client.chat.completions.create(model="moa2", messages=USER, stream=True)
        chunks = [chunk async for chunk in stream]
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == plain.choices[0].message.content
    assert 2 <= len(deltas) < OUTPUT_TOKENS  # the first token alone, then batches
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason == "stop") == 1


async def test_raw_stream_is_server_sent_events_ending_with_done(sim):
    async with asgi_client(make_api(make_config(sim.base_url))) as client:
        response = await client.post("/v1/chat/completions", json={"model": "single", "messages": USER, "stream": True})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [e for e in response.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "stop"


async def test_sampling_fields_apply_to_the_final_call(sim):
    async with openai_client(make_api(make_config(sim.base_url))) as client:
        reply = await client.chat.completions.create(
            model="moa2", messages=USER, max_tokens=3, temperature=0.1, extra_body={"moa": {"trace": True}}
        )
    assert len(reply.choices[0].message.content.split()) == 3 and reply.choices[0].finish_reason == "length"
    proposers = [c for c in reply.model_extra["moa"]["trace"]["calls"] if c["role"] == "proposer"]
    assert [c["completion_tokens"] for c in proposers] == [OUTPUT_TOKENS, OUTPUT_TOKENS]


async def test_models_lists_pipelines(sim):
    async with openai_client(make_api(make_config(sim.base_url))) as client:
        models = await client.models.list()
        one = await client.models.retrieve("moa2")
    assert [m.id for m in models.data] == ["moa2", "single"]
    assert one.id == "moa2" and one.owned_by == "moa-ray" and one.model_extra["kind"] == "moa"


async def test_content_parts_and_developer_role_are_accepted(sim):
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    async with asgi_client(make_api(make_config(sim.base_url))) as client:
        response = await client.post("/v1/chat/completions", json={"model": "single", "messages": messages})
    assert response.status_code == 200, response.text


# --------------------------------------------------------------------------- bad input: 4xx, OpenAI body


def _msgs(n: int = 1, size: int = 5) -> list[dict]:
    return [{"role": "user", "content": "x" * size} for _ in range(n)]


LIMITS = {"max_tokens_limit": 100, "max_message_chars": 50, "max_messages": 3, "max_request_bytes": 4096}
BAD_REQUESTS = [
    ("malformed JSON", b'{"model": "moa2", "messages": [', 400, "invalid_json", None),
    # found by fuzzing: each was a 500 or a 502 before
    (
        "seed beyond 64 bits",
        {"model": "moa2", "messages": [{"role": "user", "content": "hi"}], "seed": 10**30},
        400,
        "invalid_request",
        "seed",
    ),
    (
        "lone surrogate in a message",
        b'{"model": "moa2", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
        400,
        "invalid_json",
        None,
    ),
    (
        "lone surrogate in stop",
        b'{"model": "moa2", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\udfff"]}',
        400,
        "invalid_json",
        None,
    ),
    (
        "raw surrogate bytes in a message",  # ED A0 80: U+D800 as UTF-8-style bytes, which json.loads lets through
        b'{"model": "moa2", "messages": [{"role": "user", "content": "a\xed\xa0\x80b"}]}',
        400,
        "invalid_json",
        None,
    ),
    (
        "raw surrogate bytes in stop",
        b'{"model": "moa2", "messages": [{"role": "user", "content": "hi"}], "stop": ["\xed\xbf\xbf"]}',
        400,
        "invalid_json",
        None,
    ),
    ("not an object", b"[1, 2]", 400, "invalid_json", None),
    ("not UTF-8", b'{"model": "\xff"}', 400, "invalid_json", None),
    ("unknown pipeline", {"model": "gpt-4", "messages": _msgs()}, 404, "model_not_found", "model"),
    ("missing model", {"messages": _msgs()}, 400, "invalid_request", "model"),
    ("missing messages", {"model": "moa2"}, 400, "invalid_request", "messages"),
    ("empty messages", {"model": "moa2", "messages": []}, 400, "invalid_request", "messages"),
    ("too many messages", {"model": "moa2", "messages": _msgs(4)}, 400, "too_many_messages", "messages"),
    ("oversized message", {"model": "moa2", "messages": _msgs(1, 51)}, 400, "message_too_long", "messages[0].content"),
    ("max_tokens over limit", {"model": "moa2", "messages": _msgs(), "max_tokens": 101}, 400, "max_tokens_exceeded", "max_tokens"),
    (
        "max_completion_tokens over limit",
        {"model": "moa2", "messages": _msgs(), "max_completion_tokens": 500},
        400,
        "max_tokens_exceeded",
        "max_completion_tokens",
    ),
    ("max_tokens zero", {"model": "moa2", "messages": _msgs(), "max_tokens": 0}, 400, "invalid_request", "max_tokens"),
    ("temperature out of range", {"model": "moa2", "messages": _msgs(), "temperature": 3}, 400, "invalid_request", "temperature"),
    ("n > 1", {"model": "moa2", "messages": _msgs(), "n": 2}, 400, "invalid_request", "n"),
    (
        "tool without its function",
        {"model": "moa2", "messages": _msgs(), "tools": [{"type": "function"}]},
        400,
        "invalid_request",
        "tools[0].function",
    ),
    (
        "custom tool",
        {"model": "moa2", "messages": _msgs(), "tools": [{"type": "custom", "custom": {"name": "x"}}]},
        400,
        "invalid_request",
        "tools[0].type",
    ),
    (
        "tool_choice naming no tool",
        {"model": "moa2", "messages": _msgs(), "tool_choice": "required"},
        400,
        "invalid_request",
        "tool_choice",
    ),
    ("deprecated functions", {"model": "moa2", "messages": _msgs(), "functions": [{"name": "f"}]}, 400, "invalid_request", "functions"),
    ("a field outside OpenAI's schema", {"model": "moa2", "messages": _msgs(), "temprature": 0.5}, 400, "invalid_request", "temprature"),
    (
        "tool message without its call id",
        {"model": "moa2", "messages": [{"role": "tool", "content": "42"}]},
        400,
        "invalid_request",
        "messages[0].tool_call_id",
    ),
    (
        "tool message answering no call",
        {"model": "moa2", "messages": [*_msgs(), {"role": "tool", "content": "42", "tool_call_id": "call_1"}]},
        400,
        "invalid_request",
        "messages[1].tool_call_id",
    ),
    ("unknown proposer", {"model": "moa2", "messages": _msgs(), "moa": {"proposers": ["zz"]}}, 400, "invalid_request", "moa.proposers"),
    ("unknown role", {"model": "moa2", "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_request", "messages[0].role"),
    (
        "image part",
        {"model": "moa2", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        400,
        "invalid_request",
        "messages[0].content",
    ),
    ("null content", {"model": "moa2", "messages": [{"role": "user", "content": None}]}, 400, "invalid_request", "messages[0].content"),
    ("stream not bool", {"model": "moa2", "messages": _msgs(), "stream": "maybe"}, 400, "invalid_request", "stream"),
    ("bad moa extension", {"model": "moa2", "messages": _msgs(), "moa": {"trace": True, "x": 1}}, 400, "invalid_request", "moa.x"),
    (
        "logprobs beyond 20",
        {"model": "moa2", "messages": _msgs(), "logprobs": True, "top_logprobs": 21},
        400,
        "invalid_request",
        "top_logprobs",
    ),
    ("body too large", {"model": "moa2", "messages": _msgs(1, 5000)}, 413, "request_too_large", None),
]


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "moa2", "messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
        b'{"model": "moa2", "messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000 + b"}",
    ],
    ids=["nested 10,000 deep", "seed of 5,000 digits"],
)
async def test_pathological_json_is_a_400_not_a_500(sim, body):
    """Found by fuzzing (each was a 500): under the default body limit, refused before any model is called."""
    async with asgi_client(make_api(make_config(sim.base_url))) as client:
        response = await client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert_openai_error(response, 400, "invalid_json")
    assert sim.stats.requests == 0


@pytest.mark.parametrize(("body", "status", "code", "param"), [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
async def test_bad_input_gets_4xx_with_openai_error(sim, body, status, code, param):
    app = make_api(make_config(sim.base_url, server=LIMITS))
    async with asgi_client(app) as client:
        for stream in (False, True):
            if isinstance(body, dict):
                payload = json.dumps({**body, "stream": stream} if "stream" not in body and "model" in body else body).encode()
            else:
                payload = body
            response = await client.post("/v1/chat/completions", content=payload, headers={"Content-Type": "application/json"})
            assert_openai_error(response, status, code, param)
    assert sim.stats.requests == 0  # rejected before any model call


async def test_openai_client_raises_typed_errors(sim):
    async with openai_client(make_api(make_config(sim.base_url, server=LIMITS))) as client:
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="nope", messages=USER)
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="moa2", messages=USER, max_tokens=10_000)
        assert info.value.code == "max_tokens_exceeded"


async def test_routes_and_methods_answer_in_openai_format(sim):
    async with asgi_client(make_api(make_config(sim.base_url))) as client:
        assert_openai_error(await client.get("/v1/chat/completions"), 405, "method_not_allowed")
        assert_openai_error(await client.get("/v2/nothing"), 404, "not_found")
        assert_openai_error(await client.get("/v1/models/unknown"), 404, "model_not_found")


# --------------------------------------------------------------------------- auth


async def test_missing_or_wrong_key_gets_401(sim):
    app = make_api(make_config(sim.base_url))
    for key in (None, "wrong-key", KEY + "x"):
        async with asgi_client(app, key) as client:
            response = await client.post("/v1/chat/completions", json={"model": "moa2", "messages": USER})
            assert_openai_error(response, 401, "invalid_api_key")
            assert response.headers["www-authenticate"] == "Bearer"
            assert_openai_error(await client.get("/v1/models"), 401, "invalid_api_key")
            assert (await client.get("/health")).json()["status"] == "ok"  # probes need no key
    async with asgi_client(app, KEY) as client:
        assert (await client.get("/v1/models")).status_code == 200
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://moa.test") as client:
        response = await client.get("/v1/models", headers={"Authorization": f"Basic {KEY}"})
        assert_openai_error(response, 401)
    with pytest.raises(openai.AuthenticationError):
        async with openai.AsyncOpenAI(base_url="http://moa.test/v1", api_key="bad", http_client=asgi_client(app, None)) as client:
            await client.models.list()
    assert sim.stats.requests == 0


async def test_a_body_that_stalls_is_a_408_not_a_held_connection(sim):
    """A Content-Length larger than the body sent (found by fault injection: the server waited 35 s for the rest)."""
    import asyncio

    async def stalling():
        yield b'{"model": "single", "messages": ['
        await asyncio.sleep(30)  # the rest never comes in time
        yield b"]}"

    app = make_api(make_config(sim.base_url, server={"body_timeout_s": 0.3}))
    async with asgi_client(app) as client:
        response = await client.post("/v1/chat/completions", content=stalling(), headers={"Content-Type": "application/json"})
    assert_openai_error(response, 408, "request_timeout")
    assert sim.stats.requests == 0


async def test_no_schema_or_docs_answer_without_a_key(sim):
    async with asgi_client(make_api(make_config(sim.base_url)), key=None) as client:
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert (await client.get(path)).status_code == 404, path


async def test_without_configured_keys_the_endpoint_is_open(sim):
    async with asgi_client(make_api(make_config(sim.base_url), keys=()), key=None) as client:
        assert (await client.post("/v1/chat/completions", json={"model": "single", "messages": USER})).status_code == 200


# --------------------------------------------------------------------------- upstream failures


def failing(model: str, **behaviour: Any) -> dict:
    return {model: Behaviour(**behaviour)}


async def test_dropped_proposer_still_answers_with_the_failure_traced(simulator):
    sim = simulator(SimulatorConfig(latency_ms=20, output_tokens=5, models=failing("b", failure_rate=1.0, failure_status=503)))
    async with openai_client(make_api(make_config(sim.base_url))) as client:
        reply = await client.chat.completions.create(model="moa2", messages=USER, extra_body={"moa": {"trace": True}})
    calls = reply.model_extra["moa"]["trace"]["calls"]
    assert [(c["model"], c["status"]) for c in calls] == [("a", "ok"), ("b", "error"), ("a", "ok")]
    assert "UpstreamError" in calls[1]["error"]
    assert reply.usage.completion_tokens == 10


@pytest.mark.parametrize("stream", [False, True])
async def test_every_proposer_failing_is_a_502(simulator, stream):
    sim = simulator(SimulatorConfig(latency_ms=20, models=failing("b", failure_rate=1.0, failure_status=500)))
    async with asgi_client(make_api(make_config(sim.base_url))) as client:
        response = await client.post("/v1/chat/completions", json={"model": "single", "messages": USER, "stream": stream})
    err = assert_openai_error(response, 502, "upstream_error")
    assert err["type"] == "upstream_error" and "every proposer failed" in err["message"]


async def test_aggregator_failing_is_a_502(simulator):
    sim = simulator(SimulatorConfig(latency_ms=20, models=failing("a", failure_rate=1.0, failure_status=500)))
    pipelines = {"agg-fails": {"kind": "moa", "layers": [["b"]], "aggregator": "a"}}
    async with asgi_client(make_api(make_config(sim.base_url, pipelines=pipelines))) as client:
        response = await client.post("/v1/chat/completions", json={"model": "agg-fails", "messages": USER})
    assert "aggregator" in assert_openai_error(response, 502, "upstream_error")["message"]


@pytest.mark.parametrize(
    ("provider_status", "status", "code"), [(400, 400, "invalid_request"), (422, 400, "invalid_request"), (429, 429, "rate_limit_exceeded")]
)
async def test_providers_refusing_the_request_is_the_clients_4xx_not_a_502(simulator, provider_status, status, code):
    behaviour = {"failure_rate": 1.0, "failure_status": provider_status}
    sim = simulator(SimulatorConfig(latency_ms=5, models={**failing("a", **behaviour), **failing("b", **behaviour)}))
    async with asgi_client(make_api(make_config(sim.base_url))) as client:
        response = await client.post("/v1/chat/completions", json={"model": "moa2", "messages": USER})
        traced = await client.post("/v1/chat/completions", json={"model": "moa2", "messages": USER, "moa": {"trace": True}})
    assert_openai_error(response, status, code)
    assert traced.status_code == status


async def test_more_than_four_stop_sequences_are_refused_before_any_model_is_called(simulator):
    sim = simulator(SimulatorConfig(latency_ms=5))
    async with asgi_client(make_api(make_config(sim.base_url))) as client:
        five = await client.post("/v1/chat/completions", json={"model": "single", "messages": USER, "stop": list("abcde")})
        four = await client.post("/v1/chat/completions", json={"model": "single", "messages": USER, "stop": list("abcd")})
    assert "at most 4" in assert_openai_error(five, 400, "invalid_request", "stop")["message"]
    assert four.status_code == 200
    assert sim.stats.requests == 2  # only the accepted request (a proposer and the aggregator) reached the provider


async def test_context_length_rejections_are_the_clients_400(simulator):
    sim = simulator(SimulatorConfig(latency_ms=5, context_tokens=20))
    async with asgi_client(make_api(make_config(sim.base_url))) as client:
        response = await client.post(
            "/v1/chat/completions", json={"model": "single", "messages": _msgs(1, 10) * 1 + [{"role": "user", "content": "word " * 30}]}
        )
    assert_openai_error(response, 400, "context_length_exceeded", "messages")


@pytest.mark.parametrize("stream", [False, True])
async def test_request_timeout_is_a_504(simulator, stream):
    sim = simulator(SimulatorConfig(latency_ms=3000))
    app = make_api(make_config(sim.base_url, server={"request_timeout_s": 0.3}))
    async with asgi_client(app) as client:
        response = await client.post("/v1/chat/completions", json={"model": "single", "messages": USER, "stream": stream})
    assert_openai_error(response, 504, "timeout")


# --------------------------------------------------------------------------- provider keys never leave


PROVIDER_SECRET = "sk-provider-secret-7f3a9c1e5b"


def echo_key_provider(request: httpx.Request) -> httpx.Response:
    """Test double of a provider that (badly) echoes the caller's key in its error messages."""
    return httpx.Response(400, json={"error": {"message": f"bad request from {request.headers.get('authorization')}"}})


async def test_provider_keys_are_redacted_from_responses_traces_and_logs(simulator, monkeypatch, caplog):
    monkeypatch.setenv("LEAKY_PROVIDER_KEY", PROVIDER_SECRET)
    sim = simulator(SimulatorConfig(latency_ms=5, output_tokens=4))
    leaky = {
        "backend": "openai",
        "model": "leaky",
        "base_url": "http://leaky.test/v1",
        "api_key_env": "LEAKY_PROVIDER_KEY",
        "max_retries": 0,
    }
    config = make_config(
        sim.base_url,
        extra_models={"leaky": leaky},
        pipelines={
            "mixed": {"kind": "moa", "layers": [["a", "leaky"]], "aggregator": "a"},
            "broken": {"kind": "moa", "layers": [["leaky"]], "aggregator": "a"},
        },
    )
    agents = {name: LocalAgent(create_backend(config.models[name])) for name in ("a", "b")}
    agents["leaky"] = LocalAgent(OpenAIBackend(config.models["leaky"], transport=httpx.MockTransport(echo_key_provider)))
    app = make_api(config, agents=agents)
    caplog.set_level(logging.DEBUG)
    bodies = []
    async with asgi_client(app) as client:
        for pipeline in ("mixed", "broken"):
            for stream in (False, True):
                response = await client.post(
                    "/v1/chat/completions", json={"model": pipeline, "messages": USER, "stream": stream, "moa": {"trace": True}}
                )
                bodies.append(response.text)
    assert bodies[2].startswith('{"error"') and REDACTED in bodies[2]  # the failure message was redacted, not dropped
    assert any(REDACTED in b for b in bodies[:2])  # the mixed pipeline's trace carries the redacted error
    assert all(PROVIDER_SECRET not in b for b in bodies)
    assert PROVIDER_SECRET not in caplog.text


def test_redactor_rewrites_nested_json_and_ignores_short_values():
    redactor = Redactor(["sk-abcdef123", "abc"])
    data = {"a": ["x sk-abcdef123 y", {"b": "sk-abcdef123"}], "n": 3, "abc": "abc"}
    assert redactor.json(data) == {"a": [f"x {REDACTED} y", {"b": REDACTED}], "n": 3, "abc": "abc"}


@pytest.mark.parametrize("text", ["Hel", ' "quoted" \\ back', "line\nbreak\ttab", "naïve 日本 🙂", "\x00\x1f", "</script>"])
def test_a_content_events_bytes_are_the_chunk_models(text):
    """Deltas are sent through a per-stream template: byte for byte what the chunk model would have sent."""
    from moa_ray.serve.openai_schema import ChatCompletionChunk, ChunkChoice, Delta
    from moa_ray.serve.service import content_event_template, sse

    head, tail = content_event_template("chatcmpl-x", 1700000000, 'moa "lite"')
    built = ChatCompletionChunk(id="chatcmpl-x", created=1700000000, model='moa "lite"', choices=[ChunkChoice(delta=Delta(content=text))])
    assert head + json.dumps(text) + tail == sse(built.wire())
