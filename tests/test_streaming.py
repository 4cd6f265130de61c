"""Coalesced streams: every byte in order, the first delta at once, fewer chunks, the completion last."""

from __future__ import annotations

import asyncio

import pytest

from moa_ray.chat import Completion, StreamChunk, Usage
from moa_ray.streaming import coalesce


async def tokens(n: int, gap_s: float = 0.0, *, fail_at: int | None = None):
    for i in range(n):
        if fail_at == i:
            raise RuntimeError("engine died")
        if gap_s:
            await asyncio.sleep(gap_s)
        yield StreamChunk(delta=f"t{i} ")
    yield StreamChunk(completion=Completion(text="".join(f"t{i} " for i in range(n)), usage=Usage(completion_tokens=n)))


async def collect(source, **kwargs) -> list[StreamChunk]:
    return [c async for c in coalesce(source, **kwargs)]


def test_a_burst_arrives_whole_and_in_order_in_few_chunks_ending_with_the_completion():
    chunks = asyncio.run(collect(tokens(500)))
    deltas = [c.delta for c in chunks if c.completion is None]
    assert "".join(deltas) == "".join(f"t{i} " for i in range(500))
    assert deltas[0] == "t0 "  # the first token is never held back
    assert len(deltas) < 50  # 500 tokens, a few hundred characters per chunk
    assert all(len(d) <= 512 + 5 for d in deltas)
    assert chunks[-1].completion is not None and chunks[-1].completion.usage.completion_tokens == 500


def test_slow_tokens_are_not_held_past_the_window():
    chunks = asyncio.run(collect(tokens(6, gap_s=0.03), window_s=0.005))
    assert [c.delta for c in chunks if c.completion is None] == [f"t{i} " for i in range(6)]


def test_an_error_mid_stream_arrives_after_the_bytes_before_it():
    got: list[str] = []

    async def run():
        async for c in coalesce(tokens(10, fail_at=7)):
            got.append(c.delta)

    with pytest.raises(RuntimeError, match="engine died"):
        asyncio.run(run())
    assert "".join(got) == "".join(f"t{i} " for i in range(7))


def test_a_consumer_that_leaves_early_stops_the_source():
    stopped = asyncio.Event()

    async def endless():
        try:
            i = 0
            while True:
                await asyncio.sleep(0.001)
                yield StreamChunk(delta=f"{i}")
                i += 1
        finally:
            stopped.set()

    async def run():
        stream = coalesce(endless())
        async for _ in stream:
            break
        await stream.aclose()
        await asyncio.wait_for(stopped.wait(), 1)

    asyncio.run(run())
