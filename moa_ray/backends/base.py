"""The backend protocol and the factory that picks a backend from a model spec.

A backend turns chat messages into a :class:`~moa_ray.chat.Completion`. It runs
inside a Ray Serve replica in production and in-process in unit tests; the
pipeline never sees the difference.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from moa_ray.chat import ChatMessage, ChatParams, Completion, StreamChunk
from moa_ray.config import LlamaCppModelSpec, ModelSpecBase, OpenAIModelSpec, VLLMModelSpec


@runtime_checkable
class ChatBackend(Protocol):
    """One loaded model (or a client for one remote model)."""

    async def chat(self, messages: list[ChatMessage], params: ChatParams) -> Completion: ...

    def stream(self, messages: list[ChatMessage], params: ChatParams) -> AsyncIterator[StreamChunk]: ...

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
        "messages": [m.model_dump() for m in messages],
        "temperature": p.temperature,
        "max_tokens": p.max_tokens,
    }
    optional = {"top_p": p.top_p, "stop": p.stop or None, "seed": p.seed}
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    if p.json_mode:
        kwargs["response_format"] = {"type": "json_object"}
    return kwargs


def create_backend(spec: ModelSpecBase) -> ChatBackend:
    """Instantiate the backend a model spec names (heavy imports happen lazily here)."""
    if isinstance(spec, OpenAIModelSpec):
        from moa_ray.backends.openai_http import OpenAIBackend

        return OpenAIBackend(spec)
    if isinstance(spec, LlamaCppModelSpec):
        from moa_ray.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(spec)
    if isinstance(spec, VLLMModelSpec):
        from moa_ray.backends.vllm_engine import VLLMBackend

        return VLLMBackend(spec)
    raise TypeError(f"no backend for {type(spec).__name__}")
