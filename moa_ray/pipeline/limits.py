"""Rate limits of a model (``rpm``, ``tpm``) that hold across every process of the application.

A provider's limit is per account, not per process, so the windows live in one place: a named Ray actor
(:class:`WindowsActor`, ``get_if_exists`` in the ``moa-ray`` namespace) that every ingress replica, eval worker and
driver of the cluster shares. A process without Ray (a CLI run of remote models, the fast tests) keeps the same
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
* A call the backend retried counts each attempt: its entry is charged the extra attempts when it ends. A failed
  call keeps its prompt's tokens for each attempt; a cancelled one keeps its whole reservation.
* A call waits only while its request's deadline allows: at most :data:`MAX_WAIT_SHARE` of the time left, so the
  call itself keeps the rest. A call that would wait longer is not made and fails with
  :class:`~moa_ray.errors.OverRateLimit` (its ``retry_after_s``: when the room opens), which the endpoint answers
  with 429 and ``Retry-After``. A *patient* wait (an evaluation's: its deadline bounds work, not queueing) has no
  bound, and the pipeline moves the request's deadline back by it.

One actor call per model call (two with ``tpm``: the reservation, and a settlement that is not waited for), and
none at all for a model without limits.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from moa_ray.chat import ChatMessage, ChatParams, Completion, StreamChunk
from moa_ray.errors import BackendError, OverRateLimit
from moa_ray.wire import CHARS_PER_TOKEN, TOKENS_PER_MESSAGE, TOKENS_PER_REPLY

if TYPE_CHECKING:
    from moa_ray.config import ModelSpecBase
    from moa_ray.pipeline.agents import Agent

#: The providers' window: limits are per minute.
RATE_WINDOW_S = 60.0
#: How much later than its reserved moment a call may start and still be inside the window it was counted in.
LATE_START_S = 1.0
#: The share of what is left of a request's deadline that a call may spend waiting for room.
MAX_WAIT_SHARE = 0.5
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

    def reserve(self, now: float, tokens: int, max_wait: float | None) -> tuple[int | None, float]:
        """Reserve room for a call of ``tokens``: its entry id and how long to wait, or (None, when room opens) when
        that is more than ``max_wait`` seconds away (nothing is reserved then)."""
        self._expire(now)
        tokens = min(tokens, self.limit.tpm) if self.limit.tpm else 0
        moment = max(now, self._entries[-1].start) if self._entries else now
        calls, held = self._calls, self._tokens
        for entry in self._entries:
            if self._fits(calls, held, tokens):
                break
            calls, held = calls - entry.calls, held - entry.tokens
            moment = max(moment, entry.start + self.span)
        wait = moment - now
        if max_wait is not None and wait > max_wait:
            return None, wait
        entry = _Entry(self._next_id, moment, 1, tokens)
        self._next_id += 1
        self._entries.append(entry)
        self._by_id[entry.id] = entry
        self._calls += 1
        self._tokens += tokens
        return entry.id, wait

    def _fits(self, calls: int, held: int, tokens: int) -> bool:
        rpm, tpm = self.limit.rpm, self.limit.tpm
        return (rpm is None or calls + 1 <= rpm) and (tpm is None or held + tokens <= tpm)

    def settle(self, entry_id: int, calls: int, tokens: int) -> None:
        """What the call turned out to take: its attempts and (with ``tpm``) its tokens."""
        entry = self._by_id.get(entry_id)
        if entry is None:  # already out of the window
            return
        tokens = tokens if self.limit.tpm else 0
        self._calls += calls - entry.calls
        self._tokens += tokens - entry.tokens
        entry.calls, entry.tokens = calls, tokens

    def release(self, entry_id: int) -> None:
        """A reservation given back before its call started (the call was cancelled while it waited)."""
        self.settle(entry_id, 0, 0)
        self._by_id.pop(entry_id, None)

    def _expire(self, now: float) -> None:
        while self._entries and self._entries[0].start <= now - self.span:
            entry = self._entries.popleft()
            self._calls -= entry.calls
            self._tokens -= entry.tokens
            self._by_id.pop(entry.id, None)


class LocalWindows:
    """Every model's window, kept in this process (and, as :class:`WindowsActor`, in the cluster's one actor)."""

    def __init__(self) -> None:
        self._windows: dict[str, SlidingWindow] = {}
        self._lock = threading.Lock()  # a process may run several event loops (threads)

    def _window(self, key: str, limit: RateLimit) -> SlidingWindow:
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = SlidingWindow(limit)
        return window

    def reserve(self, key: str, limit: RateLimit, tokens: int, max_wait: float | None) -> tuple[int | None, float]:
        with self._lock:
            return self._window(key, limit).reserve(time.monotonic(), tokens, max_wait)

    def settle(self, key: str, limit: RateLimit, entry_id: int, calls: int, tokens: int) -> None:
        with self._lock:
            self._window(key, limit).settle(entry_id, calls, tokens)

    def release(self, key: str, limit: RateLimit, entry_id: int) -> None:
        with self._lock:
            self._window(key, limit).release(entry_id)


class Windows(Protocol):
    """Where a process reserves room: its own :class:`LocalWindows`, or the cluster's actor."""

    async def reserve(self, key: str, limit: RateLimit, tokens: int, max_wait: float | None) -> tuple[int | None, float]: ...

    def settle(self, key: str, limit: RateLimit, entry_id: int, calls: int, tokens: int) -> None: ...

    def release(self, key: str, limit: RateLimit, entry_id: int) -> None: ...


class _InProcess:
    """:class:`LocalWindows` behind the async :class:`Windows` interface."""

    def __init__(self) -> None:
        self.windows = LocalWindows()

    async def reserve(self, key: str, limit: RateLimit, tokens: int, max_wait: float | None) -> tuple[int | None, float]:
        return self.windows.reserve(key, limit, tokens, max_wait)

    def settle(self, key: str, limit: RateLimit, entry_id: int, calls: int, tokens: int) -> None:
        self.windows.settle(key, limit, entry_id, calls, tokens)

    def release(self, key: str, limit: RateLimit, entry_id: int) -> None:
        self.windows.release(key, limit, entry_id)


class _OnRay:
    """The cluster's :class:`WindowsActor`, found (or created) by name; settlements are not waited for."""

    def __init__(self) -> None:
        self._actor: Any = None

    def _handle(self) -> Any:
        if self._actor is None:
            import ray

            actor_class = ray.remote(num_cpus=0, max_restarts=-1)(LocalWindows)
            self._actor = actor_class.options(name=ACTOR_NAME, namespace=ACTOR_NAMESPACE, get_if_exists=True, lifetime="detached").remote()
        return self._actor

    async def reserve(self, key: str, limit: RateLimit, tokens: int, max_wait: float | None) -> tuple[int | None, float]:
        try:
            return await self._handle().reserve.remote(key, limit, tokens, max_wait)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a handle from an earlier Ray of this process, or a lost actor: find it again
            self._actor = None
            return await self._handle().reserve.remote(key, limit, tokens, max_wait)

    def settle(self, key: str, limit: RateLimit, entry_id: int, calls: int, tokens: int) -> None:
        self._handle().settle.remote(key, limit, entry_id, calls, tokens)

    def release(self, key: str, limit: RateLimit, entry_id: int) -> None:
        self._handle().release.remote(key, limit, entry_id)


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

    agent: RateLimitedAgent
    windows: Windows
    entry_id: int
    reserved: int
    prompt: int
    waited_s: float

    def used(self, completion: Completion) -> None:
        tokens = completion.usage.prompt_tokens + completion.usage.completion_tokens
        self._settle(completion.attempts, tokens or self.reserved)

    def failed(self, err: BackendError) -> None:
        self._settle(err.attempts, self.prompt * err.attempts)

    def _settle(self, calls: int, tokens: int) -> None:
        limit = self.agent.limit
        if calls != 1 or (limit.tpm is not None and tokens != self.reserved):
            self.windows.settle(self.agent.key, limit, self.entry_id, calls, tokens)


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
        windows = process_windows()
        reserved = reserved_tokens(messages, params, self.default_max_tokens) if self.limit.tpm else 0
        max_wait = None if patient or params.timeout_s is None else params.timeout_s * MAX_WAIT_SHARE
        entry_id, wait = await windows.reserve(self.key, self.limit, reserved, max_wait)
        if entry_id is None:
            raise OverRateLimit(
                f"{self.name}: over its rate limit ({self.limit.describe()}): room in {wait:.1f} s, too late for the request's deadline",
                model=self.name,
                retry_after_s=wait,
            )
        if wait > 0:
            try:
                await asyncio.sleep(wait)
            except asyncio.CancelledError:
                windows.release(self.key, self.limit, entry_id)
                raise
        prompt = max(reserved - (params.max_tokens or self.default_max_tokens), 0)
        return Admission(self, windows, entry_id, reserved, prompt, wait)

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
