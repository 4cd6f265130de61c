"""Rate limits of a model (``rpm``, ``tpm``) that hold across every process of the application.

A provider's limit is per account, not per process, so the windows live in one place: a named Ray actor
(:class:`LocalWindows` made remote, ``get_if_exists`` in the ``moa-ray`` namespace) that every ingress replica, eval
worker and driver of the cluster shares. A process without Ray (a CLI run of remote models, the fast tests) keeps the same
windows itself (:class:`LocalWindows`).

The rule, exact rather than a token bucket's average:

* Each model has a sliding log of its calls (:class:`SlidingWindow`). A call *reserves* the earliest moment, no
  earlier than the last reservation (first come, first served), at which every window of ``window_s`` seconds that
  holds it holds at most ``rpm`` calls and ``tpm`` tokens; it then sleeps until that moment. A call counts for
  ``window_s`` + :data:`LATE_START_S` from its reserved moment, so one that starts up to that late (a sleep that
  wakes late, a reply from the actor) still never lets a provider see more than the limit in any window.
* ``tpm``: a call reserves its prompt's estimated tokens (characters / 4, plus the chat format's tokens per message,
  as :func:`moa_ray.wire.estimated_usage` counts them) plus its ``max_tokens``, an upper bound of its answer. When the
  call ends, its entry becomes what the provider reported (prompt + completion tokens), which frees the room it did
  not use. A call larger than the whole ``tpm`` is let through alone, in an otherwise empty window.
* A call the backend retried counts each attempt, charged when the call ends: the retries of calls in flight can
  pass the limit in the window they fall in, and later calls wait the longer for them. A failed call keeps its
  prompt's tokens for each attempt; a call cut while it ran keeps its whole reservation.
* A call waits only while its request's deadline allows: at most :data:`MAX_WAIT_SHARE` of the time left, so the
  call itself keeps the rest. A call that would wait longer is not made and fails with
  :class:`~moa_ray.errors.OverRateLimit` (its ``retry_after_s``: when the room opens), which the endpoint answers
  with 429 and ``Retry-After``. A *patient* wait (an evaluation's: its deadline bounds work, not queueing) has no
  bound, and the pipeline moves the request's deadline back by it.

The hop to the actor is paid per group, not per call: the calls of a model waiting in one process at the same
moment are reserved together by one actor call, and their group tells the window what they took (when that differs
from what they reserved) in one more call that nothing waits for. A model without limits pays nothing at all.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from moa_ray.chat import ChatMessage, ChatParams, Completion, StreamChunk
from moa_ray.errors import BackendError, OverRateLimit
from moa_ray.wire import CHARS_PER_TOKEN, TOKENS_PER_MESSAGE, TOKENS_PER_REPLY

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from moa_ray.config import ModelSpecBase
    from moa_ray.pipeline.agents import Agent

#: The providers' window: limits are per minute.
RATE_WINDOW_S = 60.0
#: How much later than its reserved moment a call may start and still be inside the window it was counted in.
LATE_START_S = 1.0
#: The share of what is left of a request's deadline that a call may spend waiting for room.
MAX_WAIT_SHARE = 0.5
#: The most waiting calls of one process that one actor call reserves for.
MAX_GROUP = 256
#: Where the shared windows live on a Ray cluster.
ACTOR_NAME = "moa-ray-rate-limits"
ACTOR_NAMESPACE = "moa-ray"


class RateLimit(BaseModel):
    """One model's limits: calls and tokens per window (None: no limit of that kind)."""

    model_config = ConfigDict(frozen=True)

    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    window_s: float = Field(default=RATE_WINDOW_S, gt=0)

    def describe(self) -> str:
        per = "minute" if self.window_s == RATE_WINDOW_S else f"{self.window_s:g} s"
        parts = [f"{self.rpm} calls" if self.rpm else "", f"{self.tpm} tokens" if self.tpm else ""]
        return " and ".join(p for p in parts if p) + f" per {per}"


@dataclass
class _Entry:
    """One call in a window: its reserved moment, the attempts it made and the tokens it counts."""

    id: int
    start: float
    calls: int
    tokens: int


class SlidingWindow:
    """The calls and tokens of one model in its last window, and those reserved ahead: an exact sliding log.

    Entries are reserved in order of their moments, so the room at a moment ``t`` past every entry is the limit
    minus what the entries after ``t - span`` hold, and the earliest moment with room is found by letting the oldest
    entries go, one by one. Time is the caller's clock (``now``), so the log itself is clock-free and testable.
    """

    def __init__(self, limit: RateLimit) -> None:
        self.limit = limit
        self.span = limit.window_s + LATE_START_S
        self._entries: deque[_Entry] = deque()
        self._by_id: dict[int, _Entry] = {}
        self._calls = 0
        self._tokens = 0
        self._next_id = 0

    def reserve(self, now: float, tokens: list[int], max_waits: list[float | None]) -> tuple[int | None, float, int]:
        """Reserve room for a group of calls waiting in one process (first come, first served), each of ``tokens``:
        the earliest moment the first one fits, and as many of the next as fit beside it then and may wait that long.

        Returns the group's entry id (None when nothing was reserved), how long to wait, and how many calls of the
        group it holds; with none, the wait is when room opens for the first, whose ``max_wait`` was too short.
        """
        self._expire(now)
        tpm = self.limit.tpm
        asked = [min(t, tpm) if tpm else 0 for t in tokens]
        moment = max(now, self._entries[-1].start) if self._entries else now
        calls, held = self._calls, self._tokens
        for entry in self._entries:
            if self._fits(calls, held, asked[0]):
                break
            calls, held = calls - entry.calls, held - entry.tokens
            moment = max(moment, entry.start + self.span)
        wait = moment - now
        granted, total = 0, 0
        for amount, max_wait in zip(asked, max_waits, strict=True):
            if (max_wait is not None and wait > max_wait) or not self._fits(calls + granted, held + total, amount):
                break
            granted, total = granted + 1, total + amount
        if not granted:
            return None, wait, 0
        entry = _Entry(self._next_id, moment, granted, total)
        self._next_id += 1
        self._entries.append(entry)
        self._by_id[entry.id] = entry
        self._calls += granted
        self._tokens += total
        return entry.id, wait, granted

    def _fits(self, calls: int, held: int, tokens: int) -> bool:
        rpm, tpm = self.limit.rpm, self.limit.tpm
        return (rpm is None or calls + 1 <= rpm) and (tpm is None or held + tokens <= tpm)

    def settle(self, entry_id: int, calls: int, tokens: int) -> None:
        """What a group's calls turned out to take: their attempts and (with ``tpm``) their tokens; (0, 0) gives the
        room back (calls cancelled before they started)."""
        entry = self._by_id.get(entry_id)
        if entry is None:  # already out of the window
            return
        tokens = tokens if self.limit.tpm else 0
        self._calls += calls - entry.calls
        self._tokens += tokens - entry.tokens
        entry.calls, entry.tokens = calls, tokens

    def _expire(self, now: float) -> None:
        while self._entries and self._entries[0].start <= now - self.span:
            entry = self._entries.popleft()
            self._calls -= entry.calls
            self._tokens -= entry.tokens
            self._by_id.pop(entry.id, None)


class LocalWindows:
    """Every model's window, kept in this process (and, as a Ray actor, the cluster's one copy)."""

    def __init__(self) -> None:
        self._windows: dict[str, SlidingWindow] = {}
        self._lock = threading.Lock()  # a process may run several event loops (threads)

    def reserve(self, key: str, limit: RateLimit, tokens: list[int], max_waits: list[float | None]) -> tuple[int | None, float, int]:
        with self._lock:
            window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = SlidingWindow(limit)
            return window.reserve(time.monotonic(), tokens, max_waits)

    def settle(self, key: str, entry_id: int, calls: int, tokens: int) -> None:
        with self._lock:
            window = self._windows.get(key)
            if window is not None:
                window.settle(entry_id, calls, tokens)


class _Group:
    """The calls of one reservation: what they reserved, and what they took, told to the window once all have ended
    (one settlement per group, and none when they took what they reserved)."""

    def __init__(self, settle: Callable[[int, int], None], calls: int, tokens: int) -> None:
        self._settle = settle
        self.pending = calls
        self.reserved = (calls, tokens)
        self.used = [0, 0]

    def report(self, calls: int, tokens: int) -> None:
        self.used[0] += calls
        self.used[1] += tokens
        self.pending -= 1
        if self.pending == 0 and tuple(self.used) != self.reserved:
            self._settle(self.used[0], self.used[1])


class Share:
    """One call's part of a reservation."""

    def __init__(self, group: _Group, tokens: int) -> None:
        self.group = group
        self.tokens = tokens
        self._open = True

    def finish(self, calls: int, tokens: int) -> None:
        """The call ended: it made ``calls`` attempts and took ``tokens``."""
        if self._open:
            self._open = False
            self.group.report(calls, tokens)

    def release(self) -> None:
        """The call never started: its room goes back."""
        self.finish(0, 0)

    def keep(self) -> None:
        """The call was cut while it ran: what it reserved stands (the provider may have seen it)."""
        self.finish(1, self.tokens)


class Windows(Protocol):
    """Where a process reserves room: its own :class:`LocalWindows`, or the cluster's actor."""

    async def reserve(self, key: str, limit: RateLimit, tokens: int, max_wait: float | None) -> tuple[Share | None, float]: ...


class _InProcess:
    """This process's own :class:`LocalWindows`: one reservation per call (no hop to pay for)."""

    def __init__(self) -> None:
        self.windows = LocalWindows()

    async def reserve(self, key: str, limit: RateLimit, tokens: int, max_wait: float | None) -> tuple[Share | None, float]:
        entry_id, wait, _ = self.windows.reserve(key, limit, [tokens], [max_wait])
        if entry_id is None:
            return None, wait
        return Share(_Group(functools.partial(self.windows.settle, key, entry_id), 1, tokens), tokens), wait


@dataclass
class _Waiter:
    tokens: int
    max_wait: float | None
    granted: asyncio.Future[tuple[Share | None, float]]


class _Queue:
    """The calls of one model waiting for room in one event loop: one actor call reserves for all of them at once,
    so under load the hop is paid per group, not per call."""

    def __init__(self, ray_windows: _OnRay, key: str, limit: RateLimit) -> None:
        self.ray_windows, self.key, self.limit = ray_windows, key, limit
        self.waiting: list[_Waiter] = []
        self.running: asyncio.Task[None] | None = None

    async def reserve(self, tokens: int, max_wait: float | None) -> tuple[Share | None, float]:
        waiter = _Waiter(tokens, max_wait, asyncio.get_running_loop().create_future())
        self.waiting.append(waiter)
        if self.running is None:
            self.running = asyncio.get_running_loop().create_task(self._serve())
        return await waiter.granted

    async def _serve(self) -> None:
        try:
            while self.waiting:
                group = self.waiting[:MAX_GROUP]
                try:
                    entry_id, wait, granted = await self.ray_windows.call(
                        "reserve", self.key, self.limit, [w.tokens for w in group], [w.max_wait for w in group]
                    )
                except Exception as err:  # noqa: BLE001 - no actor: the calls of this group fail, and say why
                    del self.waiting[: len(group)]
                    for waiter in group:
                        if not waiter.granted.done():
                            waiter.granted.set_exception(err)
                    continue
                if not granted:  # the first could not wait that long
                    first = self.waiting.pop(0)
                    if not first.granted.done():
                        first.granted.set_result((None, wait))
                    continue
                del self.waiting[:granted]
                reserved = group[:granted]
                settle = functools.partial(self.ray_windows.settle, self.key, entry_id)
                shared = _Group(settle, granted, sum(min(w.tokens, self.limit.tpm) if self.limit.tpm else 0 for w in reserved))
                for waiter in reserved:
                    share = Share(shared, min(waiter.tokens, self.limit.tpm) if self.limit.tpm else 0)
                    if waiter.granted.done():  # cancelled while the group was asked for
                        share.release()
                    else:
                        waiter.granted.set_result((share, wait))
        finally:
            self.running = None


class _OnRay:
    """The cluster's windows: a named actor (:class:`LocalWindows` remote), found or created by name."""

    def __init__(self) -> None:
        self._actor: Any = None
        self._queues: dict[tuple[asyncio.AbstractEventLoop, str], _Queue] = {}

    def _handle(self) -> Any:
        if self._actor is None:
            import ray

            actor_class = ray.remote(num_cpus=0, max_restarts=-1)(LocalWindows)
            self._actor = actor_class.options(name=ACTOR_NAME, namespace=ACTOR_NAMESPACE, get_if_exists=True, lifetime="detached").remote()
        return self._actor

    async def call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self._handle(), method).remote(*args)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a handle from an earlier Ray of this process, or a lost actor: find it again
            self._actor = None
            return await getattr(self._handle(), method).remote(*args)

    def settle(self, key: str, entry_id: int, calls: int, tokens: int) -> None:
        """Not waited for: the window only gets roomier (or, after retries, learns of attempts already made). A call
        that answered never fails for it: without the actor, its reservation simply stands."""
        try:
            self._handle().settle.remote(key, entry_id, calls, tokens)
        except Exception:  # Ray going away as the process ends
            log.debug("could not settle a rate-limit reservation of %s", key, exc_info=True)

    async def reserve(self, key: str, limit: RateLimit, tokens: int, max_wait: float | None) -> tuple[Share | None, float]:
        loop = asyncio.get_running_loop()
        queue = self._queues.get((loop, key))
        if queue is None:
            queue = self._queues[(loop, key)] = _Queue(self, key, limit)
        return await queue.reserve(tokens, max_wait)


_in_process = _InProcess()
_on_ray = _OnRay()


def process_windows() -> Windows:
    """The windows this process reserves in: the cluster's actor where Ray is up, else the process's own."""
    ray = sys.modules.get("ray")  # not imported: not initialised either
    if ray is not None and ray.is_initialized():
        return _on_ray
    return _in_process


def reserved_tokens(messages: list[ChatMessage], params: ChatParams, default_max_tokens: int) -> int:
    """What a call reserves against ``tpm``: its prompt's estimated tokens plus its ``max_tokens``."""
    chars = sum(len(m.content) + (len(json.dumps([c.model_dump() for c in m.tool_calls])) if m.tool_calls else 0) for m in messages)
    if params.tools:
        chars += len(json.dumps([t.model_dump() for t in params.tools]))
    prompt = math.ceil(chars / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * len(messages) + TOKENS_PER_REPLY
    return prompt + (params.max_tokens or default_max_tokens)


@dataclass
class Admission:
    """Room reserved for one call, and what to tell the window when the call ends."""

    share: Share
    reserved: int
    prompt: int
    waited_s: float

    def used(self, completion: Completion) -> None:
        tokens = completion.usage.prompt_tokens + completion.usage.completion_tokens
        self.share.finish(completion.attempts, tokens or self.reserved)

    def failed(self, err: BackendError) -> None:
        self.share.finish(err.attempts, self.prompt * err.attempts)


class RateLimitedAgent:
    """An agent whose calls keep to its model's ``rpm``/``tpm`` in every process of the application.

    :meth:`chat` and :meth:`stream` wait for room as the module says. A pipeline asks for room itself
    (:meth:`admit`, then :meth:`chat_admitted` / :meth:`stream_admitted`), so that an evaluation's wait can be kept out
    of its deadline. It pickles with its inner agent, so Ray workers keep the same limits.
    """

    def __init__(self, inner: Agent, name: str, spec: ModelSpecBase, *, window_s: float = RATE_WINDOW_S) -> None:
        self.inner = inner
        self.name = name
        self.limit = RateLimit(rpm=spec.rpm, tpm=spec.tpm, window_s=window_s)
        self.default_max_tokens = spec.max_tokens
        # the window is the model's under these limits: a changed limit starts a window of its own
        self.key = f"{name}|rpm={spec.rpm}|tpm={spec.tpm}|window={window_s:g}"

    def prepare(self) -> None:
        prepare = getattr(self.inner, "prepare", None)
        if prepare is not None:
            prepare()

    async def admit(self, messages: list[ChatMessage], params: ChatParams, *, patient: bool = False) -> Admission:
        """Wait for room for this call; :class:`OverRateLimit` when it would come too late for ``params.timeout_s``
        (never when ``patient``, or without a timeout)."""
        reserved = reserved_tokens(messages, params, self.default_max_tokens) if self.limit.tpm else 0
        max_wait = None if patient or params.timeout_s is None else params.timeout_s * MAX_WAIT_SHARE
        share, wait = await process_windows().reserve(self.key, self.limit, reserved, max_wait)
        if share is None:
            raise OverRateLimit(
                f"{self.name}: over its rate limit ({self.limit.describe()}): room in {wait:.1f} s, too late for the request's deadline",
                model=self.name,
                retry_after_s=wait,
            )
        if wait > 0:
            try:
                await asyncio.sleep(wait)
            except BaseException:
                share.release()
                raise
        prompt = max(reserved - (params.max_tokens or self.default_max_tokens), 0)
        return Admission(share, reserved, prompt, wait)

    @staticmethod
    def _left_after(params: ChatParams, admission: Admission) -> ChatParams:
        if params.timeout_s is None or admission.waited_s <= 0:
            return params
        return params.model_copy(update={"timeout_s": max(params.timeout_s - admission.waited_s, 0.001)})

    async def chat_admitted(self, admission: Admission, messages: list[ChatMessage], params: ChatParams) -> Completion:
        try:
            completion = await self.inner.chat(messages, params)
        except BackendError as err:
            admission.failed(err)
            raise
        except BaseException:
            admission.share.keep()
            raise
        admission.used(completion)
        return completion

    async def stream_admitted(self, admission: Admission, messages: list[ChatMessage], params: ChatParams) -> AsyncIterator[StreamChunk]:
        try:
            async for chunk in self.inner.stream(messages, params):
                if chunk.completion is not None:
                    admission.used(chunk.completion)
                yield chunk
        except BackendError as err:
            admission.failed(err)
            raise
        finally:
            admission.share.keep()  # a stream closed or cut before its end: what it reserved stands

    async def chat(self, messages: list[ChatMessage], params: ChatParams) -> Completion:
        admission = await self.admit(messages, params)
        return await self.chat_admitted(admission, messages, self._left_after(params, admission))

    async def stream(self, messages: list[ChatMessage], params: ChatParams) -> AsyncIterator[StreamChunk]:
        admission = await self.admit(messages, params)
        async for chunk in self.stream_admitted(admission, messages, self._left_after(params, admission)):
            yield chunk


def rate_limited(agent: Agent, name: str, spec: ModelSpecBase, *, window_s: float = RATE_WINDOW_S) -> Agent:
    """``agent`` held to its model's ``rpm``/``tpm``; the agent itself for a model without limits."""
    return RateLimitedAgent(agent, name, spec, window_s=window_s) if spec.rate_limited else agent
