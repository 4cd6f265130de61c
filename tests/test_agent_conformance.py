"""Conformance with what real clients send and check (issue 20, step 5): every field of OpenAI's chat-completions
request is accepted (applied to the aggregator, or ignored); a failed pipeline tells the SDKs not to rerun it;
streamed usage is exact where the provider streams it and counted where it does not; CORS is a server option;
``system_fingerprint`` names the configuration. No Ray: the endpoint's app over fake providers."""

from __future__ import annotations

import httpx
import openai
import pytest
from agent_support import USER, WEATHER_TOOL, AgentProvider, agent_api, agent_config, asgi_client, client_for, model
from openai.types.chat.completion_create_params import CompletionCreateParamsBase
from serve_support import sse_events

from moa_ray.config import parse_config
from moa_ray.serve.openai_schema import IGNORED_FIELDS, ChatCompletionRequest

pytestmark = pytest.mark.anyio


#: A value for every field of the SDK's request type (``functions`` and ``function_call`` aside: refused, below).
EVERY_FIELD = {
    "audio": {"voice": "alloy", "format": "mp3"},
    "frequency_penalty": 0.25,
    "logit_bias": {"50256": -100},
    "logprobs": False,
    "max_completion_tokens": 40,
    "max_tokens": 40,
    "metadata": {"session": "s1"},
    "modalities": ["text"],
    "moderation": {"model": "omni-moderation-latest"},
    "n": 1,
    "parallel_tool_calls": True,
    "prediction": {"type": "content", "content": "The weather"},
    "presence_penalty": 0.5,
    "prompt_cache_key": "user-1",
    "prompt_cache_options": {"mode": "implicit"},
    "prompt_cache_retention": "24h",
    "reasoning_effort": "low",
    "response_format": {"type": "text"},
    "safety_identifier": "user-1-hash",
    "seed": 7,
    "service_tier": "auto",
    "stop": ["\n\nUser:"],
    "store": False,
    "stream": True,
    "stream_options": {"include_usage": True, "include_obfuscation": False},
    "temperature": 0.3,
    "tool_choice": "auto",
    "tools": [WEATHER_TOOL],
    "top_logprobs": 2,
    "top_p": 0.9,
    "user": "user-1",
    "verbosity": "low",
    "web_search_options": {"search_context_size": "low"},
}
#: What the aggregator receives of them, as it was sent.
APPLIED = ("frequency_penalty", "logit_bias", "presence_penalty", "reasoning_effort", "seed", "stop", "temperature", "tool_choice", "top_p")


def test_the_request_model_knows_every_field_of_the_sdks_request():
    sdk = set(CompletionCreateParamsBase.__annotations__) | {"stream"}
    assert sdk <= set(ChatCompletionRequest.model_fields)
    assert sdk - {"messages", "model", "functions", "function_call"} == set(EVERY_FIELD)


@pytest.mark.parametrize("stream", [False, True])
async def test_every_field_of_openais_request_is_accepted(stream):
    provider = AgentProvider()
    body = {"model": "moa", "messages": USER, **EVERY_FIELD, "stream": stream}
    if not stream:
        del body["stream_options"]
    async with asgi_client(agent_api(agent_config(), provider)) as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    (final,) = provider.sent_to("agg")
    assert {name: final[name] for name in APPLIED} == {name: EVERY_FIELD[name] for name in APPLIED}
    assert final["max_tokens"] == 40 and final["tools"] == [WEATHER_TOOL] and final["parallel_tool_calls"] is True
    ignored = {name.split(".")[-1] for name in IGNORED_FIELDS}
    for sent in provider.requests:
        assert not ignored & set(sent), ignored & set(sent)
    for proposer in provider.sent_to("m1"):  # proposers keep their own sampling: the request's fields are the aggregator's
        assert not {"presence_penalty", "logit_bias", "reasoning_effort", "tools"} & set(proposer)


@pytest.mark.parametrize(("field", "value"), [("functions", [{"name": "get_weather"}]), ("function_call", "auto"), ("n", 2)])
async def test_what_a_pipeline_cannot_do_is_a_400_that_says_so(field, value):
    async with asgi_client(agent_api(agent_config(), AgentProvider())) as client:
        response = await client.post("/v1/chat/completions", json={"model": "moa", "messages": USER, field: value})
    assert response.status_code == 400 and response.json()["error"]["param"] == field


async def test_a_tool_conversation_replays_as_sdks_send_it():
    """Content as parts, a null content beside tool calls, a refusal, names, the developer role, tool content parts."""
    conversation = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}], "name": "ops"},
        {"role": "user", "content": "Weather in Paris?", "name": "ann"},
        {
            "role": "assistant",
            "content": None,
            "refusal": None,
            "tool_calls": [{"id": "c9", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c9", "content": [{"type": "text", "text": "18 C"}]},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot share that."}]},
        {"role": "user", "content": "And now?"},
    ]
    provider = AgentProvider()
    async with asgi_client(agent_api(agent_config(), provider)) as client:
        response = await client.post("/v1/chat/completions", json={"model": "moa", "messages": conversation, "tools": [WEATHER_TOOL]})
    assert response.status_code == 200, response.text
    sent = provider.sent_to("agg")[0]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "tool", "assistant", "user"]
    assert sent[3] == {"role": "tool", "content": "18 C", "tool_call_id": "c9"} and sent[4]["content"] == "I cannot share that."


async def test_logprobs_are_the_answering_calls_plain_and_streamed():
    provider = AgentProvider()
    async with client_for(agent_api(agent_config(server={"stream_coalesce_ms": 20}), provider)) as client:
        plain = await client.chat.completions.create(model="moa", messages=USER, logprobs=True, top_logprobs=2)
        stream = await client.chat.completions.create(model="moa", messages=USER, logprobs=True, top_logprobs=2, stream=True)
        chunks = [c async for c in stream]
    tokens = plain.choices[0].logprobs.content
    assert "".join(t.token for t in tokens) == plain.choices[0].message.content and len(tokens) > 1
    assert tokens[0].logprob == -0.25 and [c.token for c in tokens[0].top_logprobs] == [tokens[0].token, "x"]
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in tokens]
    for body in provider.requests:
        assert ("logprobs" in body) == (body["model"] == "agg"), body["model"]  # only the answering call is asked
    assert provider.sent_to("agg")[0]["top_logprobs"] == 2


# --------------------------------------------------------------------------- a failed pipeline is not rerun


def failing_config() -> tuple:
    calls: list[str] = []

    def down(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        return httpx.Response(500, json={"error": {"message": "the provider is down"}})

    config = parse_config({"models": {"agg": model("agg")}, "pipelines": {"single": {"kind": "single", "model": "agg"}}})
    from moa_ray.backends.openai_http import OpenAIBackend
    from moa_ray.pipeline import build_pipeline
    from moa_ray.pipeline.agents import LocalAgent
    from moa_ray.serve.auth import KeyVerifier, Redactor
    from moa_ray.serve.ingress import create_api
    from moa_ray.serve.service import ChatService

    agents = {"agg": LocalAgent(OpenAIBackend(config.models["agg"], transport=httpx.MockTransport(down)))}
    service = ChatService(config, {"single": build_pipeline(config, "single", agents)}, Redactor([]))
    return create_api(service, KeyVerifier(())), calls


@pytest.mark.parametrize("stream", [False, True])
async def test_the_sdk_does_not_rerun_a_failed_pipeline(stream):
    app, calls = failing_config()
    async with client_for(app, max_retries=openai.DEFAULT_MAX_RETRIES) as client:  # the SDK's default: two retries of a 5xx
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(model="single", messages=USER, stream=stream)
    assert info.value.status_code == 502 and info.value.response.headers["x-should-retry"] == "false"
    assert len(calls) == 1  # one pipeline run, not three


# --------------------------------------------------------------------------- usage


async def test_streamed_usage_equals_the_plain_usage_when_providers_stream_it():
    provider = AgentProvider()
    async with client_for(agent_api(agent_config(), provider)) as client:
        plain = await client.chat.completions.create(model="moa", messages=USER)
        stream = await client.chat.completions.create(model="moa", messages=USER, stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
    assert chunks[-1].usage.model_dump() == plain.usage.model_dump()
    streamed_request = next(b for b in provider.sent_to("agg") if b.get("stream"))
    assert streamed_request["stream_options"] == {"include_usage": True}  # providers are asked for it


async def test_streamed_usage_is_counted_where_a_provider_streams_none():
    provider = AgentProvider(stream_usage=False)
    async with client_for(agent_api(agent_config(), provider)) as client:
        plain = await client.chat.completions.create(model="moa", messages=USER)
        stream = await client.chat.completions.create(
            model="moa", messages=USER, stream=True, stream_options={"include_usage": True}, extra_body={"moa": {"trace": True}}
        )
        chunks = [c async for c in stream]
    usage = chunks[-1].usage
    final_call = next(c for c in chunks if c.choices and c.choices[0].finish_reason).model_extra["moa"]["trace"]["calls"][-1]
    assert final_call["usage_estimated"] is True and final_call["prompt_tokens"] > 0
    assert abs(usage.total_tokens - plain.usage.total_tokens) <= 0.25 * plain.usage.total_tokens, (usage, plain.usage)


# --------------------------------------------------------------------------- CORS, fingerprint


PREFLIGHT = {
    "Origin": "https://app.example",
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization,content-type",
}


async def test_cors_is_off_by_default():
    async with asgi_client(agent_api(agent_config(), AgentProvider())) as client:
        preflight = await client.options("/v1/chat/completions", headers=PREFLIGHT)
        plain = await client.post(
            "/v1/chat/completions", json={"model": "moa", "messages": USER}, headers={"Origin": "https://app.example"}
        )
    assert preflight.status_code == 405 and "access-control-allow-origin" not in preflight.headers
    assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers


async def test_cors_when_configured_answers_preflights_before_any_key_check():
    from agent_support import agent_service

    from moa_ray.serve.auth import KeyVerifier
    from moa_ray.serve.ingress import create_api

    config = agent_config(server={"cors": {"allow_origins": ["https://app.example"]}})
    app = create_api(agent_service(config, AgentProvider()), KeyVerifier(["client-key-1234"]))
    async with asgi_client(app) as client:
        preflight = await client.options("/v1/chat/completions", headers=PREFLIGHT)
        other = await client.options("/v1/chat/completions", headers={**PREFLIGHT, "Origin": "https://evil.example"})
        call = await client.post(
            "/v1/chat/completions",
            json={"model": "moa", "messages": USER},
            headers={"Origin": "https://app.example", "Authorization": "Bearer client-key-1234"},
        )
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    assert call.status_code == 200 and call.headers["access-control-allow-origin"] == "https://app.example"


async def test_system_fingerprint_names_the_configuration():
    provider = AgentProvider()
    async with asgi_client(agent_api(agent_config(), provider)) as client:
        plain = (await client.post("/v1/chat/completions", json={"model": "moa", "messages": USER})).json()
        again = (await client.post("/v1/chat/completions", json={"model": "moa", "messages": USER})).json()
        stream = await client.post("/v1/chat/completions", json={"model": "moa", "messages": USER, "stream": True})
        shaped = (await client.post("/v1/chat/completions", json={"model": "moa", "messages": USER, "moa": {"proposers": ["m1"]}})).json()
        other = (await client.post("/v1/chat/completions", json={"model": "deep", "messages": USER})).json()
    fingerprint = plain["system_fingerprint"]
    assert fingerprint.startswith("fp_") and again["system_fingerprint"] == fingerprint
    events = [e for e in sse_events(stream.text) if isinstance(e, dict)]
    assert {e["system_fingerprint"] for e in events} == {fingerprint}
    assert shaped["system_fingerprint"] != fingerprint and other["system_fingerprint"] != fingerprint
    changed = agent_config(pipelines={"moa": {"kind": "moa", "layers": [["m1", "m2"]], "aggregator": {"model": "agg", "temperature": 0}}})
    async with asgi_client(agent_api(changed, provider)) as client:
        moved = (await client.post("/v1/chat/completions", json={"model": "moa", "messages": USER})).json()
    assert moved["system_fingerprint"] != fingerprint
