"""The backend protocol, and the OpenAI-style call arguments the backends share.

A backend turns chat messages into a :class:`~moa_ray.chat.Completion`. It runs
inside a Ray Serve replica in production and in-process in unit tests; the
pipeline never sees the difference. Which backends exist, and how one is made
from a model spec, is :mod:`moa_ray.backends.registry`'s.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from moa_ray.chat import ChatMessage, ChatParams, Completion, StreamChunk

if TYPE_CHECKING:  # config.py assembles its spec union from the registry, which imports this module
    from moa_ray.config import ModelSpecBase


#: What a retrying backend awaits before each attempt after the first, with the seconds left of the call's budget
#: (None: no budget): set around a call by whoever holds the model to a rate limit
#: (:class:`moa_ray.pipeline.limits.RateLimitedAgent`), so that a retry takes room in the limit before it reaches the
#: provider. It waits for that room, or raises (:class:`~moa_ray.errors.OverRateLimit`: that attempt is not made).
RETRY_GATE: ContextVar[Callable[[float | None], Awaitable[None]] | None] = ContextVar("moa_ray_retry_gate", default=None)


async def before_retry(deadline: float | None) -> None:
    """Pass the call's :data:`RETRY_GATE`, if it has one, before a retry (``deadline``: the budget's end, monotonic)."""
    gate = RETRY_GATE.get()
    if gate is not None:
        await gate(None if deadline is None else deadline - time.monotonic())


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
