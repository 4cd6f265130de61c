"""Embedded GGUF models through llama-cpp-python: the no-GPU, no-API-key default.

The model is loaded once per backend instance (one per Serve replica). A
``llama_cpp.Llama`` object is not re-entrant, so generations are serialised by
an ``asyncio.Lock``: concurrent requests queue instead of crashing, and the
replica's event loop stays free because generation runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from moa_ray.backends.base import chat_kwargs
from moa_ray.chat import (
    ChatMessage,
    ChatParams,
    Completion,
    FunctionCallDelta,
    NamedFunction,
    NamedToolChoice,
    StreamChunk,
    ToolCallDelta,
    Usage,
)
from moa_ray.config import LlamaCppModelSpec
from moa_ray.errors import BackendError, BadRequest, ConfigError, ContextLengthExceeded
from moa_ray.packaged_models import resolve_model_path
from moa_ray.wire import StreamReader, completion_of, has_content

#: OpenAI request fields llama-cpp-python's chat call does not take.
#: llama-cpp-python's chat handlers that call functions (the others ignore ``tools``).
LLAMACPP_TOOL_FORMATS = frozenset({"chatml-function-calling", "functionary", "functionary-v1", "functionary-v2"})


def llamacpp_tools_unsupported(name: str, spec: LlamaCppModelSpec) -> str | None:
    """llama.cpp calls functions through a function-calling chat handler only."""
    if spec.chat_format in LLAMACPP_TOOL_FORMATS:
        return None
    return (
        f"the model {name!r} (llama.cpp, chat_format {spec.chat_format or 'from the GGUF'}) has no function-calling chat "
        f"handler; set its chat_format to one of {', '.join(sorted(LLAMACPP_TOOL_FORMATS))}"
    )


_NOT_TAKEN = ("parallel_tool_calls", "reasoning_effort")


class LlamaCppBackend:
    """One GGUF model loaded in this process."""

    def __init__(self, spec: LlamaCppModelSpec) -> None:
        try:
            from llama_cpp import Llama  # heavy import, only where the model runs
        except ImportError as err:
            raise ConfigError("backend 'llamacpp' needs llama-cpp-python: pip install 'moa-ray[embedded]'") from err

        self.spec = spec
        self.path = resolve_model_path(spec.model)
        kwargs: dict[str, Any] = {
            "model_path": str(self.path),
            "n_ctx": spec.n_ctx,
            "seed": spec.seed,
            "verbose": False,
        }
        if spec.n_threads is not None:
            kwargs["n_threads"] = spec.n_threads
            kwargs["n_threads_batch"] = spec.n_threads
        if spec.chat_format:
            kwargs["chat_format"] = spec.chat_format
        if spec.logits_all:
            kwargs["logits_all"] = True
        self._llm = Llama(**kwargs)
        self._lock = asyncio.Lock()

    def _kwargs(self, messages: list[ChatMessage], params: ChatParams) -> dict[str, Any]:
        if params.tools:
            params = self._tool_params(params)
        kwargs = chat_kwargs(self.spec, messages, params)
        for name in _NOT_TAKEN:
            kwargs.pop(name, None)
        if params.response_schema is not None:  # compiled to a grammar by llama.cpp, as the judge's schema is
            kwargs["response_format"] = {"type": "json_object", "schema": params.response_schema.json_schema}
        elif params.json_mode and params.json_schema:
            kwargs["response_format"]["schema"] = params.json_schema  # compiled to a grammar by llama.cpp
        if params.logit_bias:  # token ids: strings on the wire, integers here
            kwargs["logit_bias"] = {int(token): bias for token, bias in params.logit_bias.items()}
        if not self.spec.logits_all:  # llama.cpp refuses logprobs without logits_all: answer without them
            kwargs.pop("logprobs", None)
            kwargs.pop("top_logprobs", None)
        return kwargs

    def _tool_params(self, params: ChatParams) -> ChatParams:
        """``tools`` as llama.cpp's function-calling handler takes them: it knows ``auto`` and a named function
        (``required`` with one tool names it; with several it is ``auto``), and ``none`` leaves the tools out."""
        reason = llamacpp_tools_unsupported(self.spec.model, self.spec)
        if reason is not None:
            raise BadRequest(f"{self.spec.model}: {reason}", model=self.spec.model, status_code=400)
        assert params.tools is not None
        choice = params.tool_choice
        if choice == "none":
            return params.model_copy(update={"tools": None, "tool_choice": None})
        if choice == "required" and len(params.tools) == 1:
            choice = NamedToolChoice(function=NamedFunction(name=params.tools[0].function.name))
        elif choice is None or choice == "required":
            choice = "auto"
        return params.model_copy(update={"tool_choice": choice})

    def _error(self, err: Exception) -> BackendError:
        """llama-cpp raises ValueError when the prompt overflows the context window."""
        if isinstance(err, ValueError) and "context" in str(err).lower():
            return ContextLengthExceeded(f"{self.spec.model}: {err}", model=self.spec.model)
        return BackendError(f"{self.spec.model}: {type(err).__name__}: {err}", model=self.spec.model)

    async def chat(self, messages: list[ChatMessage], params: ChatParams) -> Completion:
        kwargs = self._kwargs(messages, params)
        async with self._lock:
            start = time.perf_counter()
            try:
                out = await asyncio.to_thread(self._llm.create_chat_completion, **kwargs)
            except Exception as err:  # noqa: BLE001 - mapped onto the error hierarchy
                raise self._error(err) from None
            latency = time.perf_counter() - start
        assert isinstance(out, dict), "a non-streaming call returns one response"
        return completion_of(out, model=self.spec.model, latency_s=latency)

    async def stream(self, messages: list[ChatMessage], params: ChatParams) -> AsyncIterator[StreamChunk]:
        """Stream tokens from a worker thread; stops generating if the consumer goes away."""
        kwargs = self._kwargs(messages, params)
        if kwargs.get("tools") and kwargs.get("tool_choice") == "auto":
            # llama-cpp-python's handler cannot stream a call it chose itself ("Automatic streaming tool choice is
            # not supported"): the answer is made whole, then sent as one text piece or one piece per tool call
            async for chunk in self._whole_as_stream(messages, params):
                yield chunk
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        stop = threading.Event()

        def produce() -> None:
            try:
                for chunk in self._llm.create_chat_completion(stream=True, **kwargs):
                    if stop.is_set():
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, ("chunk", chunk))
                loop.call_soon_threadsafe(queue.put_nowait, ("end", None))
            except Exception as err:  # noqa: BLE001 - forwarded to the consumer
                loop.call_soon_threadsafe(queue.put_nowait, ("error", err))

        async with self._lock:
            start = time.perf_counter()
            worker = loop.run_in_executor(None, produce)
            reader = StreamReader()
            try:
                while True:
                    kind, item = await queue.get()
                    if kind == "end":
                        break
                    if kind == "error":
                        raise self._error(item)
                    piece = reader.read(item)
                    if has_content(piece):
                        yield piece
            finally:
                stop.set()
                await worker
            calls = reader.tools.calls() or []
            text = reader.text + "".join(c.function.name + c.function.arguments for c in calls) + "".join(reader.thoughts)
            completion_tokens = len(self._llm.tokenize(text.encode(), add_bos=False)) if text else 0
            # llama.cpp streams no usage. After generation the context holds the prompt and the generated
            # tokens, except the last one when max_tokens stopped it (sampled, never evaluated)
            unevaluated = 1 if reader.finish_reason == "length" else 0
            prompt_tokens = max(self._llm.n_tokens - completion_tokens + unevaluated, 0)
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        yield StreamChunk(completion=reader.completion(model=self.spec.model, latency_s=time.perf_counter() - start, usage=usage))

    async def _whole_as_stream(self, messages: list[ChatMessage], params: ChatParams) -> AsyncIterator[StreamChunk]:
        completion = await self.chat(messages, params)
        if completion.text:
            yield StreamChunk(delta=completion.text)
        for index, call in enumerate(completion.tool_calls or []):
            function = FunctionCallDelta(name=call.function.name, arguments=call.function.arguments)
            yield StreamChunk(tool_calls=[ToolCallDelta(index=index, id=call.id, type="function", function=function)])
        yield StreamChunk(completion=completion)

    async def check_health(self) -> None:
        """The model and its context are still loaded (closing a ``Llama`` frees both pointers)."""
        if getattr(self._llm._model, "model", None) is None or getattr(self._llm._ctx, "ctx", None) is None:
            raise BackendError(f"{self.spec.model}: the llama.cpp model is not loaded", model=self.spec.model)

    async def aclose(self) -> None:
        self._llm.close()
