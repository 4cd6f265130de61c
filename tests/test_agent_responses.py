"""``/v1/responses`` (issue 20, step 5): OpenAI's Responses API over a pipeline, translated to and from chat
completions: the official client's tool loop (plain and streamed) and ``responses.parse``, and the OpenAI Agents
SDK's default model (the Responses one) with a function tool, plain and streamed. No Ray: the endpoint's app over
a fake provider that calls tools."""

from __future__ import annotations

import asyncio
import json

import pytest
from agent_support import TOOL_ARGUMENTS, USER, AgentProvider, Weather, agent_api, agent_config, asgi_client, client_for, final_text
from serve_support import serve_app

pytestmark = pytest.mark.anyio

TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False},
    "strict": True,
}
QUESTION = USER[0]["content"]


async def test_a_tool_loop_through_the_responses_api():
    provider = AgentProvider()
    async with client_for(agent_api(agent_config(), provider)) as client:
        first = await client.responses.create(model="moa", input=QUESTION, tools=[TOOL], instructions="Use the tools.")
        (call,) = first.output
        assert first.status == "completed" and call.type == "function_call"
        assert call.name == "get_weather" and call.arguments == TOOL_ARGUMENTS
        follow = [
            {"role": "user", "content": QUESTION},
            call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": "18 C"},
        ]
        second = await client.responses.create(model="moa", input=follow, tools=[TOOL])
    assert second.output_text == final_text("18 C") and second.usage.total_tokens > 0
    final = provider.sent_to("agg")
    assert final[0]["messages"][0]["content"].startswith("Use the tools.") and final[0]["tools"][0]["function"]["name"] == "get_weather"
    assert final[1]["messages"][-1] == {"role": "tool", "content": "18 C", "tool_call_id": call.call_id}
    assert all("tools" not in body for body in provider.requests if body["model"] != "agg")


async def test_a_streamed_response_ends_with_the_whole_response():
    provider = AgentProvider()
    async with client_for(agent_api(agent_config(server={"stream_coalesce_ms": 0}), provider)) as client:
        stream = await client.responses.create(model="moa", input=QUESTION, tools=[TOOL], stream=True)
        events = [e async for e in stream]
        text_stream = await client.responses.create(model="moa", input=QUESTION, stream=True)
        text_events = [e async for e in text_stream]
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "response.function_call_arguments.delta" in kinds and [e.sequence_number for e in events] == list(range(1, len(events) + 1))
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert arguments == TOOL_ARGUMENTS
    completed = events[-1].response
    assert (
        completed.output[0].type == "function_call" and completed.output[0].arguments == TOOL_ARGUMENTS and completed.usage.total_tokens > 0
    )
    deltas = "".join(e.delta for e in text_events if e.type == "response.output_text.delta")
    assert deltas == text_events[-1].response.output_text == "advice of agg"


async def test_responses_parse_returns_the_parsed_object():
    async with client_for(agent_api(agent_config(), AgentProvider())) as client:
        reply = await client.responses.parse(model="moa", input=QUESTION, text_format=Weather)
    assert reply.output_parsed == Weather(city="Paris", celsius=18)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": [{"type": "input_image_ref"}]}, "input[0].type"),
        ({"temprature": 1}, "temprature"),
        ({"background": True}, "background"),
    ],
)
async def test_what_needs_openais_service_is_a_400(extra, param):
    provider = AgentProvider()
    async with asgi_client(agent_api(agent_config(), provider)) as client:
        response = await client.post("/v1/responses", json={"model": "moa", "input": QUESTION, **extra})
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    assert provider.requests == []


def test_the_agents_sdks_default_model_runs_a_function_tool():
    pytest.importorskip("agents")
    from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    provider = AgentProvider()
    asked: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        asked.append(city)
        return "18 C and sunny"

    async def run(url: str) -> tuple[str, str]:
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        agent = Agent(name="weather", tools=[get_weather], model=OpenAIResponsesModel(model="moa", openai_client=client))
        plain = await Runner.run(agent, QUESTION)
        streamed = Runner.run_streamed(agent, QUESTION)
        async for _ in streamed.stream_events():
            pass
        await client.close()
        return plain.final_output, streamed.final_output

    with serve_app(agent_api(agent_config(), provider)) as url:
        plain, streamed = asyncio.run(run(url))
    assert plain == streamed == final_text("18 C and sunny")
    assert asked == ["Paris", "Paris"]
    assert json.loads(TOOL_ARGUMENTS) == {"city": "Paris"}
