"""Agent frameworks complete their loops against a pipeline (issue 20): langchain-openai's ``bind_tools`` and
``with_structured_output``, the OpenAI Agents SDK's chat-completions model with a function tool, and LiteLLM's
tool loop, each over the endpoint's app served on loopback (no Ray) and a fake provider that calls tools. Each
framework is a dev dependency; a test skips only where its package is missing."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from agent_support import TOOL_ARGUMENTS, USER, WEATHER_TOOL, AgentProvider, Weather, agent_api, agent_config, final_text
from serve_support import serve_app


@pytest.fixture
def endpoint():
    """The endpoint on loopback over a fresh fake provider: ``(base_url + "/v1", provider)``."""
    provider = AgentProvider()
    with serve_app(agent_api(agent_config(), provider)) as url:
        yield f"{url}/v1", provider


def proposers_got_no_tools(provider: AgentProvider) -> bool:
    return all("tools" not in body for body in provider.requests if body["model"] != "agg")


def test_langchain_bind_tools_runs_a_tool_loop(endpoint):
    pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    base_url, provider = endpoint
    llm = ChatOpenAI(model="moa", base_url=base_url, api_key="unused", max_retries=0)
    with_tools = llm.bind_tools([WEATHER_TOOL])
    messages: list = [HumanMessage(USER[0]["content"])]
    first = with_tools.invoke(messages)
    (call,) = first.tool_calls
    assert call["name"] == "get_weather" and call["args"] == json.loads(TOOL_ARGUMENTS)
    messages += [first, ToolMessage("18 C", tool_call_id=call["id"])]
    second = with_tools.invoke(messages)
    assert second.content == final_text("18 C") and not second.tool_calls
    streamed = list(with_tools.stream([HumanMessage(USER[0]["content"])]))
    joined = streamed[0]
    for piece in streamed[1:]:
        joined += piece
    assert joined.tool_calls[0]["name"] == "get_weather" and joined.tool_calls[0]["args"] == {"city": "Paris"}
    assert proposers_got_no_tools(provider)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(endpoint, method):
    pytest.importorskip("langchain_openai")
    from langchain_openai import ChatOpenAI

    base_url, provider = endpoint
    if method == "function_calling":  # the answer comes as a call of a tool named after the schema
        provider.structured = ""
        provider.tool_arguments = '{"city": "Paris", "celsius": 18}'
    structured = ChatOpenAI(model="moa", base_url=base_url, api_key="unused", max_retries=0).with_structured_output(Weather, method=method)
    assert structured.invoke(USER[0]["content"]) == Weather(city="Paris", celsius=18)


def test_the_openai_agents_sdk_runs_an_agent_with_a_function_tool(endpoint):
    pytest.importorskip("agents")
    from agents import Agent, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # no trace export to OpenAI
    base_url, provider = endpoint
    asked: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        asked.append(city)
        return "18 C and sunny"

    async def run() -> str:
        client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
        model = OpenAIChatCompletionsModel(model="moa", openai_client=client)
        agent = Agent(name="weather", instructions="Answer weather questions with the tool.", tools=[get_weather], model=model)
        result = await Runner.run(agent, USER[0]["content"])
        await client.close()
        return result.final_output

    assert asyncio.run(run()) == final_text("18 C and sunny")
    assert asked == ["Paris"]
    assert proposers_got_no_tools(provider)
    aggregator_calls = [b for b in provider.sent_to("agg") if "tools" in b]
    assert len(aggregator_calls) == 2 and aggregator_calls[0]["tools"][0]["function"]["name"] == "get_weather"


def test_litellm_runs_a_tool_loop(endpoint, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of the price list at import
    litellm = pytest.importorskip("litellm")
    base_url, provider = endpoint
    kwargs = {"model": "openai/moa", "api_base": base_url, "api_key": "unused", "tools": [WEATHER_TOOL], "num_retries": 0}
    messages: list = list(USER)
    first = litellm.completion(messages=messages, **kwargs)
    (call,) = first.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    messages += [first.choices[0].message.model_dump(), {"role": "tool", "tool_call_id": call.id, "content": "18 C"}]
    second = litellm.completion(messages=messages, **kwargs)
    assert second.choices[0].message.content == final_text("18 C")
    assert proposers_got_no_tools(provider)
    assert os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"
