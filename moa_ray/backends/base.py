"""The backend protocol and the factory that picks a backend from a model spec.

A backend turns chat messages into a :class:`~moa_ray.chat.Completion`. It runs
inside a Ray Serve replica in production and in-process in unit tests; the
pipeline never sees the difference.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, runtime_checkable

from moa_ray.chat import ChatMessage, ChatParams, Completion, StreamChunk
from moa_ray.config import LlamaCppModelSpec, ModelSpecBase, OpenAIModelSpec, VLLMModelSpec


@runtime_checkable
class ChatBackend(Protocol):
    """One loaded model (or a client for one remote model)."""

    async def chat(self, messages: list[ChatMessage], params: ChatParams) -> Completion: ...

    def stream(self, messages: list[ChatMessage], params: ChatParams) -> AsyncIterator[StreamChunk]: ...

    async def check_health(self) -> None:
        """Raise when this backend can no longer answer (the replica is then replaced)."""
        ...

    async def aclose(self) -> None: ...


def effective_params(spec: ModelSpecBase, params: ChatParams) -> ChatParams:
    """Fill the call's unset sampling parameters from the model's configured defaults."""
    return params.model_copy(
        update={
            "temperature": spec.temperature if params.temperature is None else params.temperature,
            "max_tokens": spec.max_tokens if params.max_tokens is None else params.max_tokens,
        }
    )


def chat_kwargs(spec: ModelSpecBase, messages: list[ChatMessage], params: ChatParams) -> dict[str, Any]:
    """OpenAI-style chat arguments (llama-cpp-python takes the same names): messages plus the set sampling params."""
    p = effective_params(spec, params)
    kwargs: dict[str, Any] = {
        "messages": [m.wire() for m in messages],
        "temperature": p.temperature,
        "max_tokens": p.max_tokens,
    }
    optional = {
        "top_p": p.top_p,
        "stop": p.stop or None,
        "seed": p.seed,
        "presence_penalty": p.presence_penalty,
        "frequency_penalty": p.frequency_penalty,
        "logit_bias": p.logit_bias,
        "reasoning_effort": p.reasoning_effort,
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    if p.response_schema is not None:
        kwargs["response_format"] = p.response_schema.openai()
    elif p.json_mode:
        kwargs["response_format"] = {"type": "json_object"}
    if p.logprobs:
        kwargs["logprobs"] = True
        if p.top_logprobs is not None:
            kwargs["top_logprobs"] = p.top_logprobs
    if p.tools:
        kwargs["tools"] = [t.model_dump(exclude_none=True) for t in p.tools]
        if p.tool_choice is not None:
            kwargs["tool_choice"] = p.tool_choice if isinstance(p.tool_choice, str) else p.tool_choice.model_dump()
        if p.parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = p.parallel_tool_calls
    return kwargs


#: llama-cpp-python's chat handlers that call functions (the others ignore ``tools``).
LLAMACPP_TOOL_FORMATS = frozenset({"chatml-function-calling", "functionary", "functionary-v1", "functionary-v2"})


def tools_unsupported(name: str, spec: ModelSpecBase) -> str | None:
    """Why model ``name`` cannot answer with tool calls, or None when it can.

    OpenAI-compatible providers take ``tools`` as they are; llama.cpp calls functions through a function-calling
    chat handler only; vLLM parses tool calls only with its auto tool choice and a parser set in the engine.
    """
    if isinstance(spec, LlamaCppModelSpec) and spec.chat_format not in LLAMACPP_TOOL_FORMATS:
        return (
            f"the model {name!r} (llama.cpp, chat_format {spec.chat_format or 'from the GGUF'}) has no function-calling chat "
            f"handler; set its chat_format to one of {', '.join(sorted(LLAMACPP_TOOL_FORMATS))}"
        )
    if isinstance(spec, VLLMModelSpec) and not (
        spec.engine_kwargs.get("enable_auto_tool_choice") and spec.engine_kwargs.get("tool_call_parser")
    ):
        return (
            f"the model {name!r} (vLLM) parses no tool calls; set engine_kwargs enable_auto_tool_choice: true and "
            "tool_call_parser (hermes, llama3_json, mistral...) for its model"
        )
    return None


def create_backend(spec: ModelSpecBase) -> ChatBackend:
    """Instantiate the in-process backend a model spec names (heavy imports happen lazily here).

    vLLM models have no in-process backend: Ray Serve LLM hosts them (:mod:`moa_ray.serve.llm`).
    """
    factory = BACKENDS.get(type(spec).__name__)
    if factory is None:
        raise TypeError(f"no in-process backend for {type(spec).__name__} (backend {getattr(spec, 'backend', '?')!r})")
    return factory(spec)


def _openai(spec: ModelSpecBase) -> ChatBackend:
    from moa_ray.backends.openai_http import OpenAIBackend

    return OpenAIBackend(spec)  # type: ignore[arg-type]


def _llamacpp(spec: ModelSpecBase) -> ChatBackend:
    from moa_ray.backends.llamacpp import LlamaCppBackend

    return LlamaCppBackend(spec)  # type: ignore[arg-type]


#: Registered in-process backends, by spec class: the engine is imported only when one is made.
BACKENDS: dict[str, Callable[[ModelSpecBase], ChatBackend]] = {
    OpenAIModelSpec.__name__: _openai,
    LlamaCppModelSpec.__name__: _llamacpp,
}
