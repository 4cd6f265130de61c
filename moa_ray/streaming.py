"""Coalescing streams: one message per send, not one per token.

A token stream crosses two Ray hops on its way to an HTTP client (agent replica
-> ingress replica -> proxy), and each hop sends every item as its own message.
Under load a sender falls behind its producer, so :func:`coalesce` pulls the
producer in a background task and, each time the consumer asks for the next
item, merges everything that arrived meanwhile. With an idle consumer nothing
waits (the first item goes out alone, as before); with a busy one the messages
per stream fall to what the consumer can actually send.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

T = TypeVar("T")

_END = object()


class _Failure:
    """The source's error, queued after the items that came before it."""

    def __init__(self, error: Exception) -> None:
        self.error = error


async def coalesce(source: AsyncIterator[T], merge: Callable[[T, T], T | None]) -> AsyncIterator[T]:
    """Yield ``source``'s items in order, merging those queued together.

    ``merge(a, b)`` returns one item standing for ``a`` then ``b``, or None where the two
    must stay apart (a text delta and the final completion, say). An error of ``source``
    is raised after the items that came before it. Closing this generator cancels the
    pull and closes ``source``.
    """
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def pull() -> None:
        try:
            async for item in source:
                queue.put_nowait(item)
        except Exception as err:  # noqa: BLE001 - handed to the consumer, in order
            queue.put_nowait(_Failure(err))
        finally:
            queue.put_nowait(_END)

    task = asyncio.create_task(pull())
    try:
        while True:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            pending: T | None = None
            for entry in batch:
                if entry is _END or isinstance(entry, _Failure):
                    if pending is not None:
                        yield pending
                    if isinstance(entry, _Failure):
                        raise entry.error
                    return
                item: T = entry  # type: ignore[assignment]
                if pending is None:
                    pending = item
                elif (merged := merge(pending, item)) is not None:
                    pending = merged
                else:
                    yield pending
                    pending = item
            if pending is not None:
                yield pending
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
