"""Structured outputs through a pipeline (issue 20, step 2): ``response_format: json_schema`` constrains the
aggregator only (passed through to an OpenAI-compatible provider, a grammar for llama.cpp, guided decoding for
vLLM), proposers stay free text, and an answer that breaks the schema is a clear error, never a 200."""

from __future__ import annotations

import json

import openai
import pytest
from agent_support import USER, AgentProvider, Weather, agent_api, agent_config, asgi_client, client_for
from serve_support import sse_events

from moa_ray.chat import ChatMessage, ChatParams, ChatRequest, ResponseSchema
from moa_ray.config import parse_config
from moa_ray.pipeline.structured import structure_error

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("pipeline", ["moa", "smoa", "single"])
async def test_parse_returns_the_parsed_object(pipeline):
    provider = AgentProvider()
    async with client_for(agent_api(agent_config(), provider)) as client:
        reply = await client.chat.completions.parse(model=pipeline, messages=USER, response_format=Weather)
    assert reply.choices[0].message.parsed == Weather(city="Paris", celsius=18)
    (final,) = [b for b in provider.sent_to("agg") if (b.get("response_format") or {}).get("type") == "json_schema"]
    sent = final["response_format"]["json_schema"]
    assert sent["name"] == "Weather" and sent["strict"] is True and sent["schema"]["required"] == ["city", "celsius"]
    for body in provider.requests:
        if body is not final:
            assert (body.get("response_format") or {}).get("type") != "json_schema"  # proposers (and a judge) are free


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        ("The weather is fine.", "not valid JSON"),
        ('{"city": "Paris"}', "the rule required"),
        ('{"city": "Paris", "celsius": "warm"}', "at celsius, the rule type"),
    ],
)
async def test_an_answer_that_breaks_the_schema_is_a_clear_error(answer, says):
    provider = AgentProvider(structured=answer)
    app = agent_api(agent_config(), provider)
    async with client_for(app) as client:
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.parse(model="moa", messages=USER, response_format=Weather)
    err = info.value
    assert err.status_code == 502 and err.code == "invalid_structured_output" and says in err.message
    assert err.response.headers["x-should-retry"] == "false"
    assert "warm" not in err.message  # the rule it broke, not the answer's text (errors reach logs)
    async with asgi_client(app) as raw:
        schema = {"type": "json_schema", "json_schema": {"name": "Weather", "schema": Weather.model_json_schema()}}
        streamed = await raw.post(
            "/v1/chat/completions", json={"model": "moa", "messages": USER, "stream": True, "response_format": schema}
        )
    events = sse_events(streamed.text)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "invalid_structured_output"
    assert not any(e.get("choices") and e["choices"][0].get("finish_reason") for e in events[:-1] if isinstance(e, dict))


async def test_json_object_mode_needs_a_json_object():
    provider = AgentProvider()
    async with asgi_client(agent_api(agent_config(), provider)) as client:
        ok = await client.post(
            "/v1/chat/completions", json={"model": "single", "messages": USER, "response_format": {"type": "json_object"}}
        )
    assert ok.status_code == 200 and json.loads(ok.json()["choices"][0]["message"]["content"])["chosen_responses"] == [1, 2]
    assert structure_error("[1, 2]", ChatParams(json_mode=True)) == "the answer is JSON but not an object"


async def test_an_invalid_schema_or_a_ranker_is_refused_before_any_call():
    provider = AgentProvider()
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    good = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    async with asgi_client(agent_api(agent_config(), provider)) as client:
        invalid = await client.post("/v1/chat/completions", json={"model": "moa", "messages": USER, "response_format": bad})
        ranker = await client.post("/v1/chat/completions", json={"model": "rank", "messages": USER, "response_format": good})
        missing = await client.post(
            "/v1/chat/completions", json={"model": "moa", "messages": USER, "response_format": {"type": "json_schema"}}
        )
    assert invalid.status_code == 400 and invalid.json()["error"]["param"] == "response_format.json_schema.schema"
    assert ranker.status_code == 400 and ranker.json()["error"]["param"] == "response_format"
    assert missing.status_code == 400
    assert provider.requests == []


SCHEMA = Weather.model_json_schema()
PARAMS = ChatParams(response_schema=ResponseSchema(name="Weather", json_schema=SCHEMA, strict=True))
MESSAGES = [ChatMessage(role="user", content="hi")]
MODELS = parse_config(
    {
        "models": {
            "remote": {"backend": "openai", "model": "r"},
            "llama": {"backend": "llamacpp", "model": "smollm2-135m-instruct"},
            "big": {"backend": "vllm", "model": "v"},
        }
    }
).models


def test_a_provider_gets_the_schema_and_llamacpp_a_grammar():
    from moa_ray.backends.base import chat_kwargs
    from moa_ray.backends.llamacpp import LlamaCppBackend

    remote = chat_kwargs(MODELS["remote"], MESSAGES, PARAMS)
    assert remote["response_format"] == {"type": "json_schema", "json_schema": {"name": "Weather", "schema": SCHEMA, "strict": True}}
    llama = LlamaCppBackend.__new__(LlamaCppBackend)  # no model loaded: only its request arguments are looked at
    llama.spec = MODELS["llama"]
    assert llama._kwargs(MESSAGES, PARAMS)["response_format"] == {"type": "json_object", "schema": SCHEMA}  # compiled to a grammar


@pytest.mark.vllm  # serve/llm_server.py imports vLLM
def test_vllm_gets_guided_decoding():
    from vllm_support import require_vllm

    require_vllm()
    from moa_ray.serve.llm_server import openai_request_body

    body = openai_request_body("big", MODELS["big"], ChatRequest(messages=MESSAGES, params=PARAMS), stream=False)
    assert body["structured_outputs"] == {"json": SCHEMA} and "response_format" not in body


async def test_a_broken_answer_is_counted_as_an_error_when_its_call_ends(monkeypatch):
    """The metrics count each call once, as it ends: the schema check comes first, so a broken answer is an error."""
    import moa_ray.pipeline.trace as trace_module

    ended: list[tuple[str, str]] = []
    monkeypatch.setattr(trace_module, "record_call", lambda record: ended.append((record.role, record.status)))
    app = agent_api(agent_config(), AgentProvider(structured="The weather is fine."))
    schema = {"type": "json_schema", "json_schema": {"name": "Weather", "schema": Weather.model_json_schema()}}
    async with asgi_client(app) as raw:
        for stream in (False, True):
            ended.clear()
            body = {"model": "moa", "messages": USER, "stream": stream, "response_format": schema}
            reply = await raw.post("/v1/chat/completions", json=body)
            assert reply.status_code == (200 if stream else 502)  # a stream's error comes as its last event
            assert ("aggregator", "error") in ended and ("aggregator", "ok") not in ended, (stream, ended)
