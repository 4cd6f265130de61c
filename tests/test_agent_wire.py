"""The chat types and wire readers behind agent requests (issue 20): tool calls and thinking read from every
provider's shape, streamed tool call pieces normalised to OpenAI's, requests that cross Ray handles intact, the
keys of plain calls unchanged (stored evaluation calls stay valid), and usage counted where a stream has none."""

from __future__ import annotations

import pytest

from moa_ray.backends.llamacpp import LlamaCppBackend
from moa_ray.chat import ChatMessage, ChatParams, ChatRequest, Completion, FunctionCall, ResponseSchema, ToolCall, ToolDefinition
from moa_ray.config import parse_config
from moa_ray.errors import BadRequest
from moa_ray.pipeline.reuse import CallReuse, call_key
from moa_ray.prompts import advisory_messages
from moa_ray.wire import StreamReader, completion_of, estimated_usage

TOOL = ToolDefinition.model_validate(
    {"type": "function", "function": {"name": "get_weather", "description": "Weather.", "parameters": {"type": "object"}}}
)
MODELS = parse_config(
    {
        "models": {
            "a": {"backend": "openai", "model": "x", "base_url": "http://h/v1"},
            "l": {"backend": "llamacpp", "model": "smollm2-135m-instruct"},
        }
    }
).models


def test_plain_call_keys_are_the_ones_stored_before_tools_existed():
    """Pinned: the keys evaluations stored for plain calls (messages of role and content, no agent fields)."""
    messages = [
        ChatMessage(role="system", content="s"),
        ChatMessage(role="user", content="hello"),
        ChatMessage(role="assistant", content="a"),
    ]
    assert call_key(MODELS["a"], messages, ChatParams()) == "c2034bb8aa25bf280e84fe119b39cd23"
    assert call_key(MODELS["l"], messages, ChatParams(temperature=0, seed=3)) == "9885f41d23420e7190ea0da1e84747a0"
    assert call_key(MODELS["a"], messages, ChatParams(tools=[TOOL])) != call_key(MODELS["a"], messages, ChatParams())


def test_a_call_with_tools_is_never_answered_from_the_store():
    reuse = CallReuse(MODELS)
    assert reuse.key("a", [ChatMessage(role="user", content="q")], ChatParams(temperature=0))[1] is True
    assert reuse.key("a", [ChatMessage(role="user", content="q")], ChatParams(temperature=0, tools=[TOOL]))[1] is False


def test_a_request_with_tools_crosses_a_handle_intact():
    call = ToolCall(id="c1", function=FunctionCall(name="get_weather", arguments="{}"))
    request = ChatRequest(
        messages=[ChatMessage(role="assistant", tool_calls=[call]), ChatMessage(role="tool", content="18", tool_call_id="c1")],
        params=ChatParams(tools=[TOOL], tool_choice="required", response_schema=ResponseSchema(name="w", json_schema={"type": "object"})),
    )
    assert ChatRequest.model_validate(request.model_dump()) == request
    answer = Completion(text="", tool_calls=[call], reasoning="hm", finish_reason="tool_calls")
    assert Completion.model_validate(answer.model_dump()) == answer  # what a replica sends back
    assert request.messages[0].wire() == {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]}
    assert ChatMessage(role="user", content="hi").wire() == {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    "message",
    [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}],
        },
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": {"a": 1}}}],
        },  # Ollama's object
    ],
)
def test_tool_calls_are_read_from_either_shape(message):
    completion = completion_of({"choices": [{"message": message, "finish_reason": "tool_calls"}]}, model="m", latency_s=0)
    assert completion.text == "" and completion.tool_calls is not None
    assert completion.tool_calls[0].function.name == "f" and completion.tool_calls[0].function.arguments in ('{"a": 1}',)


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_thinking_is_read_from_either_field(field):
    completion = completion_of({"choices": [{"message": {"content": "4", field: "2+2"}}]}, model="m", latency_s=0)
    assert (completion.text, completion.reasoning) == ("4", "2+2")


def test_streamed_tool_call_pieces_come_out_as_openai_streams_them():
    """llama.cpp repeats a call's id and name in every piece: a client joining pieces would repeat the name."""
    reader = StreamReader()
    first = {"index": 0, "id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"ci'}}
    later = {"index": 0, "id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": 'ty": 1}'}}
    pieces = [reader.read({"choices": [{"delta": {"tool_calls": [d]}}]}).tool_calls for d in (first, later)]
    assert pieces[0][0].id == "c1" and pieces[0][0].function.name == "get_weather"
    assert pieces[1][0].id is None and pieces[1][0].function.name is None and pieces[1][0].function.arguments == 'ty": 1}'
    reader.read({"choices": [{"delta": {}, "finish_reason": "tool_calls"}]})
    completion = reader.completion(model="m", latency_s=0)
    assert completion.tool_calls == [ToolCall(id="c1", function=FunctionCall(name="get_weather", arguments='{"city": 1}'))]


def test_usage_of_a_stream_without_any_is_estimated():
    reader = StreamReader()
    for word in ("Paris", " is", " sunny"):
        reader.read({"choices": [{"delta": {"content": word}}]})
    request = {"messages": [{"role": "user", "content": "x" * 400}], "tools": [TOOL.model_dump()]}
    usage = estimated_usage(request, reader)
    assert usage.completion_tokens == 3 and 100 < usage.prompt_tokens < 160


def test_llamacpp_tool_arguments():
    backend = LlamaCppBackend.__new__(LlamaCppBackend)  # no model loaded: only its request arguments are looked at
    backend.spec = MODELS["l"].model_copy(update={"chat_format": "chatml-function-calling"})
    messages = [ChatMessage(role="user", content="q")]
    required = backend._kwargs(messages, ChatParams(tools=[TOOL], tool_choice="required", parallel_tool_calls=True, reasoning_effort="low"))
    assert required["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}  # one tool: named
    assert "parallel_tool_calls" not in required and "reasoning_effort" not in required  # llama.cpp takes neither
    assert backend._kwargs(messages, ChatParams(tools=[TOOL]))["tool_choice"] == "auto"
    assert "tools" not in backend._kwargs(messages, ChatParams(tools=[TOOL], tool_choice="none"))
    assert backend._kwargs(messages, ChatParams(logit_bias={"42": -5.0}))["logit_bias"] == {42: -5.0}
    backend.spec = MODELS["l"]  # the GGUF's own chat template: no function calling
    with pytest.raises(BadRequest, match="chatml-function-calling"):
        backend._kwargs(messages, ChatParams(tools=[TOOL]))


def test_proposers_read_a_plain_conversation_unchanged():
    messages = [ChatMessage(role="user", content="a"), ChatMessage(role="user", content="b")]
    assert advisory_messages(messages, None) == messages  # two user turns in a row stay two: eval prompts unchanged


def test_completion_defaults_keep_the_old_shape():
    assert Completion(text="x").tool_calls is None and Completion(text="x").reasoning is None
