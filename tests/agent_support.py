"""Test support for a pipeline as an agent's model: a fake OpenAI-compatible provider that calls tools, follows
response formats and thinks aloud, and the endpoint's app over it (no Ray).

:class:`AgentProvider` answers a request that carries ``tools`` with a call of the first tool, and a request
whose last message is a tool's result with a sentence built from that result, so a client's tool loop runs to
its end. It records every request body, so a test can say what each model was sent.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
from pydantic import BaseModel

from moa_ray.config import parse_config

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False},
    },
}
TOOL_ARGUMENTS = '{"city": "Paris"}'
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
JUDGE_VERDICT = '{"reasoning": "both fine", "chosen_responses": [1, 2], "end_debate": false}'


def advice(model: str) -> str:
    return f"advice of {model}"


def final_text(result: str) -> str:
    """What the provider answers after a tool returned ``result``."""
    return f"The weather in Paris: {result}."


class AgentProvider:
    """An OpenAI-compatible provider (``httpx.MockTransport``) for agent tests.

    ``reasoning``: model -> its ``reasoning_content``; ``think``: model -> text it writes between ``<think>`` tags
    before its answer; ``structured``: what a request with ``response_format: json_schema`` gets as its answer;
    ``stream_usage``: whether streams end with usage (a provider that ignores ``stream_options`` sends none).
    """

    def __init__(
        self,
        *,
        reasoning: dict[str, str] | None = None,
        think: dict[str, str] | None = None,
        structured: str = '{"city": "Paris", "celsius": 18}',
        stream_usage: bool = True,
    ) -> None:
        self.reasoning = reasoning or {}
        self.think = think or {}
        self.structured = structured
        self.stream_usage = stream_usage
        self.tool_arguments = TOOL_ARGUMENTS  # what a tool call passes
        self.requests: list[dict[str, Any]] = []

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def sent_to(self, model: str) -> list[dict[str, Any]]:
        """The request bodies ``model`` received, in order."""
        return [r for r in self.requests if r["model"] == model]

    def answer(self, body: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """The message and finish reason of an answer to ``body``."""
        model, messages = body["model"], body["messages"]
        tools = body.get("tools") if body.get("tool_choice") != "none" else None
        format_type = (body.get("response_format") or {}).get("type")
        if tools and messages[-1]["role"] != "tool":
            call = {
                "id": "call_w1",
                "type": "function",
                "function": {"name": tools[0]["function"]["name"], "arguments": self.tool_arguments},
            }
            return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
        if messages[-1]["role"] == "tool":
            text = final_text(messages[-1]["content"])
        elif format_type == "json_schema":
            text = self.structured
        elif format_type == "json_object":
            text = JUDGE_VERDICT
        else:
            text = advice(model)
        if model in self.think:
            text = f"<think>{self.think[model]}</think>\n\n{text}"
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if model in self.reasoning:
            message["reasoning_content"] = self.reasoning[model]
        return message, "stop"

    @staticmethod
    def usage(body: dict[str, Any], message: dict[str, Any]) -> dict[str, int]:
        prompt = sum(len(str(m.get("content") or "")) for m in body["messages"]) // 4 + 5 * len(body["messages"])
        completion = len(str(message.get("content") or "").split()) + len(message.get("tool_calls") or []) * 5
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.requests.append(body)
        message, finish = self.answer(body)
        usage = self.usage(body, message)
        if not body.get("stream"):
            choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish}
            if body.get("logprobs"):
                choice["logprobs"] = {"content": [token_logprob(p) for p in pieces_of(message.get("content") or "")]}
            return httpx.Response(
                200, json={"id": "x", "object": "chat.completion", "model": body["model"], "choices": [choice], "usage": usage}
            )
        wants_usage = self.stream_usage and (body.get("stream_options") or {}).get("include_usage")
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream"},
            content=self._events(body["model"], message, finish, usage if wants_usage else None, bool(body.get("logprobs"))),
        )

    @staticmethod
    async def _events(
        model: str, message: dict[str, Any], finish: str, usage: dict[str, int] | None, logprobs: bool = False
    ) -> AsyncIterator[bytes]:
        def event(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            chunk = {
                "id": "x",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }
            return f"data: {json.dumps(chunk)}\n\n".encode()

        yield event({"role": "assistant", "content": ""})
        thinking = message.get("reasoning_content") or ""
        for i in range(0, len(thinking), 7):
            yield event({"reasoning_content": thinking[i : i + 7]})
        for piece in pieces_of(message.get("content") or ""):  # five characters a piece: tags arrive split
            if logprobs:
                chunk = {"id": "x", "object": "chat.completion.chunk", "model": model}
                choice = {"index": 0, "delta": {"content": piece}, "finish_reason": None, "logprobs": {"content": [token_logprob(piece)]}}
                yield f"data: {json.dumps({**chunk, 'choices': [choice]})}\n\n".encode()
            else:
                yield event({"content": piece})
            await asyncio.sleep(0)
        for index, call in enumerate(message.get("tool_calls") or []):
            yield event(
                {
                    "tool_calls": [
                        {
                            "index": index,
                            "id": call["id"],
                            "type": "function",
                            "function": {"name": call["function"]["name"], "arguments": ""},
                        }
                    ]
                }
            )
            arguments = call["function"]["arguments"]
            for i in range(0, len(arguments), 6):
                yield event({"tool_calls": [{"index": index, "function": {"arguments": arguments[i : i + 6]}}]})
        yield event({}, finish)
        if usage is not None:
            yield f"data: {json.dumps({'id': 'x', 'object': 'chat.completion.chunk', 'model': model, 'choices': [], 'usage': usage})}\n\n".encode()
        yield b"data: [DONE]\n\n"


def pieces_of(text: str) -> list[str]:
    """The pieces a streamed answer arrives in (five characters each), also its "tokens" when logprobs are asked."""
    return [text[i : i + 5] for i in range(0, len(text), 5)]


def token_logprob(token: str) -> dict[str, Any]:
    """A token's logprobs entry (OpenAI's shape), with one alternative."""
    return {
        "token": token,
        "logprob": -0.25,
        "bytes": list(token.encode()),
        "top_logprobs": [{"token": token, "logprob": -0.25}, {"token": "x", "logprob": -3.0}],
    }


def model(name: str, **extra: Any) -> dict[str, Any]:
    return {"backend": "openai", "model": name, "base_url": "http://agent.test/v1", "max_retries": 0, "http_transport": "httpx", **extra}


def agent_config(
    *, server: dict[str, Any] | None = None, extra_models: dict[str, Any] | None = None, pipelines: dict[str, Any] | None = None
) -> Any:
    """``moa``: proposers m1, m2 and the aggregator agg in one layer; ``deep``: two layers of m1, m2, m3; ``smoa``:
    m1..m3 with a judge (agg) keeping 2; ``single``: agg alone; ``rank``: a ranker over m1, m2."""
    names = ["m1", "m2", "m3", "agg"]
    return parse_config(
        {
            "models": {**{n: model(n) for n in names}, **(extra_models or {})},
            "pipelines": {
                "moa": {"kind": "moa", "layers": [["m1", "m2"]], "aggregator": "agg"},
                "deep": {"kind": "moa", "layers": [["m1", "m2", "m3"], ["m1", "m2", "m3"]], "aggregator": "agg"},
                "smoa": {"kind": "smoa", "layers": [["m1", "m2", "m3"]], "aggregator": "agg", "k": 2, "moderator": False},
                "single": {"kind": "single", "model": "agg"},
                "rank": {"kind": "ranker", "layers": [["m1", "m2"]], "aggregator": "agg"},
                **(pipelines or {}),
            },
            "server": server or {},
        }
    )


class Unreachable:
    """An agent a test never reaches (a model whose requests are refused before any call)."""

    async def chat(self, messages: Any, params: Any) -> Any:
        raise AssertionError("this model must not be called")

    def stream(self, messages: Any, params: Any) -> Any:
        raise AssertionError("this model must not be called")


def agent_service(config: Any, provider: AgentProvider) -> Any:
    """The endpoint's service over agents calling ``provider`` (models of other backends: :class:`Unreachable`)."""
    from moa_ray.backends.openai_http import OpenAIBackend
    from moa_ray.pipeline import build_pipeline
    from moa_ray.pipeline.agents import LocalAgent
    from moa_ray.serve.auth import Redactor
    from moa_ray.serve.service import ChatService

    agents: dict[str, Any] = {
        name: LocalAgent(OpenAIBackend(spec, transport=provider.transport())) if spec.backend == "openai" else Unreachable()
        for name, spec in config.models.items()
    }
    pipelines = {name: build_pipeline(config, name, agents) for name in config.pipelines}
    return ChatService(config, pipelines, Redactor.for_config(config))


def agent_api(config: Any, provider: AgentProvider) -> Any:
    from moa_ray.serve.auth import KeyVerifier
    from moa_ray.serve.ingress import create_api

    return create_api(agent_service(config, provider), KeyVerifier(()))


def asgi_client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://moa.test", timeout=30)


class Weather(BaseModel):
    """The structured answer the agent tests ask for."""

    city: str
    celsius: int


def client_for(app: Any, **options: Any) -> openai.AsyncOpenAI:
    """The official SDK over the endpoint's app in process; no retries unless asked (a test counts its calls)."""
    return openai.AsyncOpenAI(
        base_url="http://moa.test/v1", api_key="unused", http_client=asgi_client(app), **{"max_retries": 0, **options}
    )
