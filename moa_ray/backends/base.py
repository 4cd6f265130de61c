"""The backend protocol and the factory that picks a backend from a model spec.

A backend turns chat messages into a :class:`~moa_ray.chat.Completion`. It runs
inside a Ray Serve replica in production and in-process in unit tests; the
pipeline never sees the difference.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, runtime_checkable

from moa_ray.chat import ChatMessage, ChatParams, Completion, StreamChunk
from moa_ray.config import LlamaCppModelSpec, ModelSpecBase, OpenAIModelSpec


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
        "messages": [m.model_dump() for m in messages],
        "temperature": p.temperature,
        "max_tokens": p.max_tokens,
    }
    optional = {"top_p": p.top_p, "stop": p.stop or None, "seed": p.seed}
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    if p.json_mode:
        kwargs["response_format"] = {"type": "json_object"}
    if p.logprobs:
        kwargs["logprobs"] = True
        if p.top_logprobs is not None:
            kwargs["top_logprobs"] = p.top_logprobs
    return kwargs


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
