"""Stream deltas coalesced by time and size before they cross a hop (a Ray stream, the Serve proxy).

A model writes a token at a time; sending each as its own message makes every hop pay a message's fixed
cost per token. :func:`coalesce` sends the first delta at once (time to first token is untouched), then
joins the deltas that arrive within ``window_s`` of each other's batch, or until ``max_chars``, into one
chunk. Every byte arrives, in order; a chunk that carries the completion ends the stream as it came.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from moa_ray.chat import StreamChunk

#: Defaults: a few milliseconds and a few hundred characters (what a reader cannot tell from per-token).
WINDOW_S = 0.005
MAX_CHARS = 512

_END: Any = object()


def _delta(item: Any) -> str | None:
    """The text of a plain delta chunk; None for anything else (thinking, tool calls, a completion, a result)."""
    if isinstance(item, StreamChunk) and item.is_text and item.delta:
        return item.delta
    return None


async def coalesce(source: AsyncIterator[Any], *, window_s: float = WINDOW_S, max_chars: int = MAX_CHARS) -> AsyncGenerator[Any, None]:
    """``source``'s deltas in fewer, larger chunks; anything else (a completion, a result) passes through as it is."""
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for chunk in source:
                queue.put_nowait(chunk)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            queue.put_nowait(err)
            return
        queue.put_nowait(_END)

    task = asyncio.create_task(pump())
    loop = asyncio.get_running_loop()
    first = True
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            delta = _delta(item)
            if delta is None or first:
                first = first and delta is None
                yield item
                continue
            parts, size, held = [delta], len(delta), None
            deadline = loop.time() + window_s
            while size < max_chars:
                try:
                    nxt = queue.get_nowait()
                except asyncio.QueueEmpty:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        nxt = await asyncio.wait_for(queue.get(), left)
                    except asyncio.TimeoutError:
                        break
                more = None if nxt is _END or isinstance(nxt, BaseException) else _delta(nxt)
                if more is None:
                    held = nxt
                    break
                parts.append(more)
                size += len(more)
            yield StreamChunk(delta="".join(parts))
            if held is not None:
                if held is _END:
                    return
                if isinstance(held, BaseException):
                    raise held
                yield held
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
