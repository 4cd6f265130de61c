"""coalesce(): order kept, queued deltas merged, errors after what came before, closing cleans up."""

from __future__ import annotations

import asyncio
import operator
from collections.abc import AsyncIterator

import pytest

from moa_ray.chat import Completion, StreamChunk, Usage
from moa_ray.streaming import coalesce


async def burst(items: list[str], *, fail: Exception | None = None) -> AsyncIterator[str]:
    for item in items:
        yield item
    if fail is not None:
        raise fail


async def collect(stream: AsyncIterator[str], *, busy_s: float = 0.0) -> list[str]:
    out = []
    async for item in stream:
        out.append(item)
        await asyncio.sleep(busy_s)  # a consumer that takes time to send each item
    return out


def test_a_busy_consumer_gets_the_queued_items_merged_in_order() -> None:
    items = [f"t{i} " for i in range(50)]
    out = asyncio.run(collect(coalesce(burst(items), operator.add), busy_s=0.01))
    assert "".join(out) == "".join(items)
    assert len(out) < len(items)


def test_a_slow_source_is_passed_through_item_by_item() -> None:
    async def slow() -> AsyncIterator[str]:
        for item in "abc":
            await asyncio.sleep(0.02)
            yield item

    assert asyncio.run(collect(coalesce(slow(), operator.add))) == ["a", "b", "c"]


def test_deltas_merge_but_the_final_completion_stays_its_own_chunk() -> None:
    final = Completion(text="ab", usage=Usage(prompt_tokens=1, completion_tokens=2), latency_s=0.1)

    async def chunks() -> AsyncIterator[StreamChunk]:
        yield StreamChunk(delta="a")
        yield StreamChunk(delta="b")
        yield StreamChunk(completion=final)

    async def run() -> list[StreamChunk]:
        return [c async for c in coalesce(chunks(), StreamChunk.merge)]  # the source is all queued at the first get

    out = asyncio.run(run())
    assert [(c.delta, c.completion) for c in out] == [("ab", None), ("", final)]


def test_an_error_comes_after_the_items_before_it() -> None:
    seen: list[str] = []

    async def run() -> None:
        async for item in coalesce(burst(["a", "b"], fail=RuntimeError("backend died")), operator.add):
            seen.append(item)

    with pytest.raises(RuntimeError, match="backend died"):
        asyncio.run(run())
    assert "".join(seen) == "ab"


def test_closing_early_cancels_the_pull_and_closes_the_source() -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[str]:
        try:
            while True:
                await asyncio.sleep(0.005)
                yield "x"
        finally:
            closed.set()

    async def run() -> bool:
        stream = coalesce(endless(), operator.add)
        assert await stream.__anext__()
        await stream.aclose()
        return closed.is_set()

    assert asyncio.run(run())
