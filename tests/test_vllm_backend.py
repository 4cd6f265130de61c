"""The vLLM backend against a stand-in ``vllm`` module (vLLM needs a GPU; CI has none)."""

from __future__ import annotations

import asyncio
import sys
import types
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pytest

from moa_ray.backends.vllm_engine import VLLMBackend, structured_output
from moa_ray.chat import ChatMessage, ChatParams
from moa_ray.config import VLLMModelSpec

SCHEMA = {"type": "object", "properties": {"end_debate": {"type": "boolean"}}, "required": ["end_debate"]}


class Params:
    """Records the fields it was built with, like vLLM's msgspec structs."""

    def __init__(self, **fields: Any) -> None:
        self.fields = fields


class FakeEngine:
    """AsyncLLMEngine's surface the backend uses: a chat template, and cumulative outputs per step."""

    requests: ClassVar[list[tuple[str, Params]]] = []

    @classmethod
    def from_engine_args(cls, args: Params) -> FakeEngine:
        return cls()

    async def get_tokenizer(self) -> Any:
        def template(messages: list[dict[str, str]], **_: Any) -> str:
            return "".join(f"<{m['role']}>{m['content']}" for m in messages)

        return types.SimpleNamespace(apply_chat_template=template)

    async def generate(self, prompt: str, sampling: Params, request_id: str) -> AsyncIterator[Any]:
        FakeEngine.requests.append((prompt, sampling))
        text = ""
        for i, word in enumerate(["{", '"end_debate"', ": true}"], start=1):
            text += word
            output = types.SimpleNamespace(text=text, token_ids=list(range(i)), finish_reason="stop" if i == 3 else None)
            yield types.SimpleNamespace(outputs=[output], prompt_token_ids=[1, 2, 3, 4])


def fake_vllm(monkeypatch: pytest.MonkeyPatch, *, new_api: bool) -> None:
    root = types.ModuleType("vllm")
    root.AsyncEngineArgs = Params  # type: ignore[attr-defined]
    root.SamplingParams = Params  # type: ignore[attr-defined]
    sampling = types.ModuleType("vllm.sampling_params")
    setattr(sampling, "StructuredOutputsParams" if new_api else "GuidedDecodingParams", Params)
    engine = types.ModuleType("vllm.engine.async_llm_engine")
    engine.AsyncLLMEngine = FakeEngine  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", root)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)
    monkeypatch.setitem(sys.modules, "vllm.engine", types.ModuleType("vllm.engine"))
    monkeypatch.setitem(sys.modules, "vllm.engine.async_llm_engine", engine)


def test_a_judge_call_runs_through_the_engine_with_its_schema_enforced(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_vllm(monkeypatch, new_api=True)
    FakeEngine.requests.clear()
    spec = VLLMModelSpec(backend="vllm", model="Qwen/Qwen2.5-7B-Instruct", temperature=0.7, max_tokens=64)
    backend = VLLMBackend(spec)
    messages = [ChatMessage(role="user", content="judge these")]
    completion = asyncio.run(backend.chat(messages, ChatParams(json_mode=True, json_schema=SCHEMA, temperature=0.0)))
    assert completion.text == '{"end_debate": true}'
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (4, 3)
    assert completion.finish_reason == "stop"
    ((prompt, sampling),) = FakeEngine.requests
    assert prompt == "<user>judge these"
    assert sampling.fields["temperature"] == 0.0 and sampling.fields["max_tokens"] == 64
    assert sampling.fields["structured_outputs"].fields == {"json": SCHEMA}


@pytest.mark.parametrize(("new_api", "key"), [(True, "structured_outputs"), (False, "guided_decoding")])
def test_json_schema_becomes_constrained_decoding(monkeypatch: pytest.MonkeyPatch, new_api: bool, key: str) -> None:
    fake_vllm(monkeypatch, new_api=new_api)
    out = structured_output(ChatParams(json_mode=True, json_schema=SCHEMA))
    assert list(out) == [key]
    assert out[key].fields == {"json": SCHEMA}


def test_json_mode_without_schema_asks_for_any_json_object(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_vllm(monkeypatch, new_api=True)
    assert structured_output(ChatParams(json_mode=True))["structured_outputs"].fields == {"json_object": True}


def test_plain_text_calls_are_unconstrained() -> None:
    assert structured_output(ChatParams(json_schema=SCHEMA)) == {}
    assert structured_output(ChatParams()) == {}
