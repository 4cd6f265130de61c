"""Token logprobs end to end: ChatParams asks for them, every backend passes the request on, and the
OpenAI ``choices[0].logprobs.content[].top_logprobs`` answer becomes ``Completion.logprobs``."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from vllm_support import require_vllm

from bench.simulator import Behaviour, SimulatorConfig
from moa_ray.backends.base import chat_kwargs
from moa_ray.backends.openai_http import OpenAIBackend
from moa_ray.chat import ChatMessage, ChatParams, Completion, TokenLogprob, TopLogprob
from moa_ray.config import LlamaCppModelSpec, OpenAIModelSpec
from moa_ray.wire import parse_logprobs

MESSAGES = [ChatMessage(role="user", content="m or M?")]


def spec(base_url: str = "http://provider.test/v1") -> OpenAIModelSpec:
    return OpenAIModelSpec(backend="openai", model="judge/model", base_url=base_url, max_retries=0)


def response(logprobs: object | None) -> dict:
    choice: dict = {"index": 0, "message": {"role": "assistant", "content": "M"}, "finish_reason": "length"}
    if logprobs is not None:
        choice["logprobs"] = logprobs
    return {"id": "x", "object": "chat.completion", "choices": [choice], "usage": {"prompt_tokens": 9, "completion_tokens": 1}}


def chat_with(body: dict, params: ChatParams) -> tuple[Completion, dict]:
    sent: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(200, json=body)

    async def go() -> Completion:
        backend = OpenAIBackend(spec(), transport=httpx.MockTransport(handler))
        try:
            return await backend.chat(MESSAGES, params)
        finally:
            await backend.aclose()

    return asyncio.run(go()), sent[0]


OPENAI_LOGPROBS = {
    "content": [
        {
            "token": "M",
            "bytes": [77],
            "logprob": -0.0176,
            "top_logprobs": [
                {"token": "M", "bytes": [77], "logprob": -0.0176},
                {"token": "m", "bytes": [109], "logprob": -4.0488},
                {"token": "Both", "bytes": [66, 111, 116, 104], "logprob": -14.9},
            ],
        }
    ],
    "refusal": None,
}


def test_openai_backend_sends_and_parses_logprobs() -> None:
    completion, payload = chat_with(response(OPENAI_LOGPROBS), ChatParams(max_tokens=1, logprobs=True, top_logprobs=5))
    assert (payload["logprobs"], payload["top_logprobs"], payload["max_tokens"]) == (True, 5, 1)
    assert completion.text == "M"
    assert completion.logprobs == [
        TokenLogprob(
            token="M",
            logprob=-0.0176,
            top_logprobs=[
                TopLogprob(token="M", logprob=-0.0176),
                TopLogprob(token="m", logprob=-4.0488),
                TopLogprob(token="Both", logprob=-14.9),
            ],
        )
    ]


def test_no_logprobs_asked_none_sent_none_parsed() -> None:
    completion, payload = chat_with(response(None), ChatParams(max_tokens=1))
    assert "logprobs" not in payload and "top_logprobs" not in payload
    assert completion.logprobs is None


@pytest.mark.parametrize("value", [None, {"content": None}, "garbage", {"nope": []}])
def test_an_engine_without_logprobs_leaves_them_none(value: object) -> None:
    assert parse_logprobs({"logprobs": value}) is None


def test_malformed_entries_are_dropped() -> None:
    parsed = parse_logprobs(
        {
            "logprobs": {
                "content": [
                    {"token": "m"},
                    {"token": "M", "logprob": -1.0, "top_logprobs": [{"token": "x"}, {"token": "m", "logprob": -2}]},
                ]
            }
        }
    )
    assert parsed == [TokenLogprob(token="M", logprob=-1.0, top_logprobs=[TopLogprob(token="m", logprob=-2.0)])]


def test_logprobs_through_the_simulator(simulator) -> None:
    tops = [{"m": -0.2, "M": -1.8, "The": -5.0}]
    sim = simulator(SimulatorConfig(latency_ms=5, models={"judge/model": Behaviour(latency_ms=5, reply="m", top_logprobs=tops)}))

    async def go() -> Completion:
        backend = OpenAIBackend(spec(sim.base_url))
        try:
            return await backend.chat(MESSAGES, ChatParams(max_tokens=1, logprobs=True, top_logprobs=2))
        finally:
            await backend.aclose()

    completion = asyncio.run(go())
    assert completion.text == "m"
    assert completion.logprobs is not None and len(completion.logprobs) == 1
    first = completion.logprobs[0]
    assert (first.token, first.logprob) == ("m", -0.2)
    assert [(t.token, t.logprob) for t in first.top_logprobs] == [("m", -0.2), ("M", -1.8)]  # the top 2 only


def test_chat_kwargs_carry_logprobs_for_every_engine() -> None:
    """chat_kwargs feeds the HTTP backend, llama.cpp and the vLLM request body alike."""
    kwargs = chat_kwargs(spec(), MESSAGES, ChatParams(logprobs=True, top_logprobs=3))
    assert (kwargs["logprobs"], kwargs["top_logprobs"]) == (True, 3)
    assert "top_logprobs" not in chat_kwargs(spec(), MESSAGES, ChatParams(logprobs=True))
    assert "logprobs" not in chat_kwargs(spec(), MESSAGES, ChatParams(top_logprobs=3))


@pytest.mark.parametrize("logits_all, expected", [(False, None), (True, (True, 5))])
def test_llamacpp_asks_for_logprobs_only_when_the_model_keeps_all_logits(logits_all: bool, expected: object) -> None:
    from moa_ray.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend.__new__(LlamaCppBackend)  # no model load: only the request arguments are built
    backend.spec = LlamaCppModelSpec(backend="llamacpp", model="x.gguf", logits_all=logits_all)
    kwargs = backend._kwargs(MESSAGES, ChatParams(logprobs=True, top_logprobs=5))
    got = (kwargs["logprobs"], kwargs["top_logprobs"]) if "logprobs" in kwargs else None
    assert got == expected


@pytest.mark.vllm  # serve/llm_server.py imports vLLM
def test_vllm_request_body_carries_logprobs() -> None:
    require_vllm()
    from moa_ray.chat import ChatRequest
    from moa_ray.config import VLLMModelSpec
    from moa_ray.serve.llm_server import openai_request_body

    vspec = VLLMModelSpec(backend="vllm", model="org/model")
    body = openai_request_body("m", vspec, ChatRequest(messages=MESSAGES, params=ChatParams(logprobs=True, top_logprobs=5)), stream=False)
    assert (body["logprobs"], body["top_logprobs"]) == (True, 5)
