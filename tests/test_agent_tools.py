"""A pipeline as an agent's model, tools (issue 20, step 1): the aggregator gets the tools and the real messages and
its tool calls are the response, plain and streamed in OpenAI's deltas; proposers advise in text and never see a
tool schema; a replayed tool conversation completes the loop. The official ``openai`` client over the endpoint's
app (no Ray) and a fake provider that calls tools."""

from __future__ import annotations

import json

import pytest
from agent_support import (
    TOOL_ARGUMENTS,
    USER,
    WEATHER_TOOL,
    AgentProvider,
    advice,
    agent_api,
    agent_config,
    asgi_client,
    client_for,
    final_text,
)

pytestmark = pytest.mark.anyio


async def run_tool(name: str, arguments: str) -> str:
    assert name == "get_weather" and json.loads(arguments) == {"city": "Paris"}
    return "18 C and sunny"


@pytest.mark.parametrize("pipeline", ["moa", "smoa", "single"])
async def test_an_openai_sdk_tool_loop_completes_through_a_pipeline(pipeline):
    provider = AgentProvider()
    async with client_for(agent_api(agent_config(), provider)) as client:
        messages: list = list(USER)
        first = await client.chat.completions.create(model=pipeline, messages=messages, tools=[WEATHER_TOOL])
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather" and call.function.arguments == TOOL_ARGUMENTS and call.id
        messages.append(choice.message.model_dump(exclude_none=True))
        messages.append({"role": "tool", "tool_call_id": call.id, "content": await run_tool(call.function.name, call.function.arguments)})
        second = await client.chat.completions.create(model=pipeline, messages=messages, tools=[WEATHER_TOOL])
    assert second.choices[0].finish_reason == "stop" and second.choices[0].message.tool_calls is None
    assert second.choices[0].message.content == final_text("18 C and sunny")
    answering = "agg"
    for body in provider.requests:
        if body["model"] != answering:  # proposers and the judge: text only, no tool schema, no tool message
            assert "tools" not in body and "tool_choice" not in body
            assert all(m["role"] in ("system", "user", "assistant") and "tool_calls" not in m for m in body["messages"])
    final = [b for b in provider.sent_to(answering) if "tools" in b]
    assert len(final) == 2 and final[0]["tools"] == [WEATHER_TOOL]
    replayed = final[1]["messages"]
    assert replayed[-2]["tool_calls"][0]["id"] == call.id and replayed[-2]["content"] is None
    assert replayed[-1] == {"role": "tool", "content": "18 C and sunny", "tool_call_id": call.id}


async def test_proposers_read_the_tool_exchange_as_text_and_advise():
    provider = AgentProvider()
    conversation = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": TOOL_ARGUMENTS}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
    ]
    async with client_for(agent_api(agent_config(), provider)) as client:
        reply = await client.chat.completions.create(model="moa", messages=conversation, tools=[WEATHER_TOOL])
    assert reply.choices[0].message.content == final_text("18 C")
    proposer = provider.sent_to("m1")[0]["messages"]
    assert proposer[0]["role"] == "system" and "get_weather: The current weather in a city." in proposer[0]["content"]
    assert "cannot call them" in proposer[0]["content"] and '"properties"' not in proposer[0]["content"]
    assert proposer[2] == {"role": "assistant", "content": f"[called the tool get_weather with {TOOL_ARGUMENTS}]"}
    assert proposer[3] == {"role": "user", "content": "[result of get_weather]\n18 C"}
    aggregator = provider.sent_to("agg")[0]["messages"]
    assert advice("m1") in aggregator[0]["content"] and "call the tools available to you" in aggregator[0]["content"]
    assert [m["role"] for m in aggregator] == ["system", "user", "assistant", "tool"]


async def test_streamed_tool_calls_reassemble_to_the_plain_ones():
    provider = AgentProvider()
    app = agent_api(agent_config(server={"stream_coalesce_ms": 20}), provider)
    async with client_for(app) as client:
        plain = await client.chat.completions.create(model="moa", messages=USER, tools=[WEATHER_TOOL])
        stream = await client.chat.completions.create(model="moa", messages=USER, tools=[WEATHER_TOOL], stream=True)
        chunks = [c async for c in stream]
        async with client.chat.completions.stream(model="moa", messages=USER, tools=[WEATHER_TOOL]) as helper:
            async for _ in helper:
                pass
            accumulated = await helper.get_final_completion()
    pieces = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert len(pieces) > 2  # the name first, then the arguments in pieces, as OpenAI streams them
    assert pieces[0].id == "call_w1" and pieces[0].function.name == "get_weather"
    assert "".join(p.function.arguments or "" for p in pieces) == TOOL_ARGUMENTS
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"]

    def essence(call) -> tuple:
        return call.id, call.type, call.function.name, call.function.arguments

    assert [essence(c) for c in accumulated.choices[0].message.tool_calls] == [essence(c) for c in plain.choices[0].message.tool_calls]
    assert accumulated.choices[0].finish_reason == plain.choices[0].finish_reason == "tool_calls"


async def test_tool_choice_none_leaves_the_tools_out():
    provider = AgentProvider()
    async with client_for(agent_api(agent_config(), provider)) as client:
        reply = await client.chat.completions.create(model="moa", messages=USER, tools=[WEATHER_TOOL], tool_choice="none")
    assert reply.choices[0].message.content == advice("agg") and reply.choices[0].finish_reason == "stop"
    assert all("tools" not in body for body in provider.requests)


async def test_tool_choice_and_parallel_tool_calls_reach_the_aggregator():
    provider = AgentProvider()
    choice = {"type": "function", "function": {"name": "get_weather"}}
    async with client_for(agent_api(agent_config(), provider)) as client:
        await client.chat.completions.create(
            model="moa", messages=USER, tools=[WEATHER_TOOL], tool_choice=choice, parallel_tool_calls=False
        )
    (final,) = provider.sent_to("agg")
    assert final["tool_choice"] == choice and final["parallel_tool_calls"] is False


async def test_the_trace_records_the_aggregators_tool_calls():
    provider = AgentProvider()
    async with client_for(agent_api(agent_config(), provider)) as client:
        full = await client.chat.completions.create(model="moa", messages=USER, tools=[WEATHER_TOOL], extra_body={"moa": {"trace": "full"}})
        summary = await client.chat.completions.create(
            model="moa", messages=USER, tools=[WEATHER_TOOL], extra_body={"moa": {"trace": True}}
        )
    calls = full.model_extra["moa"]["trace"]["calls"]
    assert calls[-1]["role"] == "aggregator" and calls[-1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert "tool_calls" not in summary.model_extra["moa"]["trace"]["calls"][-1]


@pytest.mark.parametrize(
    ("models", "pipeline", "named"),
    [
        ({"llama": {"backend": "llamacpp", "model": "smollm2-135m-instruct"}}, "llama-agg", "llama"),
        ({"big": {"backend": "vllm", "model": "Qwen/Qwen2.5-7B-Instruct"}}, "vllm-agg", "big"),
    ],
)
async def test_an_aggregator_that_cannot_call_tools_is_a_400_naming_it(models, pipeline, named):
    provider = AgentProvider()
    (name,) = models
    config = agent_config(extra_models=models, pipelines={pipeline: {"kind": "moa", "layers": [["m1"]], "aggregator": name}})
    async with asgi_client(agent_api(config, provider)) as client:
        refused = await client.post("/v1/chat/completions", json={"model": pipeline, "messages": USER, "tools": [WEATHER_TOOL]})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "tools_unsupported" and error["param"] == "tools" and repr(named) in error["message"]
    assert provider.requests == []  # refused before any model was called


async def test_llamacpp_with_a_function_calling_handler_and_vllm_with_a_parser_are_accepted():
    from moa_ray.backends.registry import tools_unsupported
    from moa_ray.config import parse_config

    config = parse_config(
        {
            "models": {
                "llama": {"backend": "llamacpp", "model": "smollm2-135m-instruct", "chat_format": "chatml-function-calling"},
                "big": {"backend": "vllm", "model": "x", "engine_kwargs": {"enable_auto_tool_choice": True, "tool_call_parser": "hermes"}},
            }
        }
    )
    assert tools_unsupported("llama", config.models["llama"]) is None and tools_unsupported("big", config.models["big"]) is None


async def test_a_ranker_cannot_call_tools():
    async with asgi_client(agent_api(agent_config(), AgentProvider())) as client:
        response = await client.post("/v1/chat/completions", json={"model": "rank", "messages": USER, "tools": [WEATHER_TOOL]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tools"
    assert "verbatim" in response.json()["error"]["message"]


@pytest.mark.vllm  # serve/llm_server.py imports vLLM
def test_vllm_gets_the_tools_in_its_openai_request():
    from vllm_support import require_vllm

    require_vllm()
    from moa_ray.chat import ChatMessage, ChatParams, ChatRequest, ToolDefinition
    from moa_ray.config import parse_config
    from moa_ray.serve.llm_server import openai_request_body

    spec = parse_config({"models": {"big": {"backend": "vllm", "model": "v", "engine_kwargs": {"enable_auto_tool_choice": True}}}}).models[
        "big"
    ]
    params = ChatParams(tools=[ToolDefinition.model_validate(WEATHER_TOOL)], tool_choice="auto", parallel_tool_calls=False)
    body = openai_request_body("big", spec, ChatRequest(messages=[ChatMessage(role="user", content="q")], params=params), stream=True)
    assert body["tools"] == [WEATHER_TOOL] and body["tool_choice"] == "auto" and body["parallel_tool_calls"] is False
    assert body["stream_options"] == {"include_usage": True}
