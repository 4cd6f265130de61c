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
* Every attempt holds room before it reaches the provider, retries included: a retrying backend passes each retry
  through :data:`~moa_ray.backends.base.RETRY_GATE`, which the limited agent sets around the call, and the retry
  reserves room like a call (it waits, or, with no room within :data:`MAX_WAIT_SHARE` of the call's time left, is
  not made: :class:`~moa_ray.errors.OverRateLimit`). A failed attempt keeps its prompt's tokens; a call cut while it
  ran keeps what each of its attempts reserved. A model that runs as a Serve deployment retries in its replica:
  the caller takes room for the first attempt, the replica (:class:`ReplicaRetries`) for each retry, in the same
  window, and each settles its own. A backend that retries without the gate has its extra attempts charged when
  the call ends.
* A call waits only while its request's deadline allows: at most :data:`MAX_WAIT_SHARE` of the time left, so the
  call itself keeps the rest. A call that would wait longer is not made and fails with
  :class:`~moa_ray.errors.OverRateLimit` (its ``retry_after_s``: when the room opens), which the endpoint answers
  with 429 and ``Retry-After``. A *patient* wait (an evaluation's: its deadline bounds work, not queueing) has no
  bound, and the pipeline moves the request's deadline back by it.

The hop to the actor is paid per lease, not per call. The calls of a model waiting in one process at the same moment
are reserved together by one actor call, which also leases *spare* room when the group can start at once: up to
``spare`` more calls (and tokens) that the process starts itself, without asking, for :func:`lease_seconds` (at most
:data:`LEASE_S`, and :data:`LEASE_WINDOW_SHARE` of the window). The window counts a lease from its moment until its
last usable moment plus ``window_s`` + :data:`LATE_START_S`, so a spare call started at the lease's end is counted for
a whole window as well, and a process spends spare room only between the actor's reply and its request's send time
plus the lease (its own clock): inside the lease as the actor counted it, whatever the hop took. So exactness holds
however many processes lease. The process sizes its leases to its own recent
rate (:data:`LEASE_HEADROOM` times the calls it started over one lease's time), never more than
:data:`LEASE_LIMIT_SHARE` of the limit, so a small limit (``rpm: 6``) leases no spare room at all and stays first
come, first served between processes, while a high one costs an actor call per many calls. When a lease has ended
and its calls with it, what they took (spare room not spent goes back, tokens as reported) rides on the process's
next lease request, or, when none comes within :data:`SETTLE_AFTER_S`, on one call that nothing waits for. A model
without limits pays nothing at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import json
import logging
import math
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from moa_ray.backends.base import RETRY_GATE
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
#: How long a lease's spare room may be spent by the process that holds it, at most...
LEASE_S = 0.5
#: ...and at most this share of the window (a test's window of 2 s: 20 ms): a lease holds its room that much longer.
LEASE_WINDOW_SHARE = 0.01
#: The most spare room one lease holds, as a share of the limit (``rpm``, ``tpm``): a small limit stays fair.
LEASE_LIMIT_SHARE = 1 / 16
#: A lease's spare calls: this many times the calls the process started over one lease's time, recently.
LEASE_HEADROOM = 2.0
#: How soon what the leases spent goes to the actor when no lease request takes it there first.
SETTLE_AFTER_S = 0.05
#: The windows actor's protocol (its methods and their arguments): a detached actor outlives upgrades, so a cluster
#: that still runs an older one gets a new actor of its own name instead of calls the old one cannot answer.
ACTOR_PROTOCOL = 2
#: Where the shared windows live on a Ray cluster.
ACTOR_NAME = f"moa-ray-rate-limits-v{ACTOR_PROTOCOL}"
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
    """Room in a window: its moment, the moment it leaves the window, and the calls and tokens it holds."""

    id: int
    start: float
    end: float
    calls: int
    tokens: int


class SlidingWindow:
    """The calls and tokens of one model in its last window, and those reserved ahead: an exact sliding log.

    Each entry holds room from its moment (``start``) until ``end``: ``window_s`` + :data:`LATE_START_S` later, plus,
    for a lease, the time its room may still be spent. Entries are reserved in order of their moments (first come,
    first served), so the room at a moment ``t`` no earlier than every entry's is the limit minus what the entries
    that end after ``t`` hold, and the earliest moment with room is found by letting entries go in order of their
    ends. Time is the caller's clock (``now``), so the log itself is clock-free and testable.
    """

    def __init__(self, limit: RateLimit) -> None:
        self.limit = limit
        self.span = limit.window_s + LATE_START_S
        self._entries: dict[int, _Entry] = {}
        self._ends: list[tuple[float, int]] = []  # a heap: when each entry leaves the window
        self._calls = 0
        self._tokens = 0
        self._next_id = 0
        self._last_start = -math.inf

    def reserve(self, now: float, tokens: list[int], max_waits: list[float | None]) -> tuple[int | None, float, int]:
        """Reserve room for a group of calls waiting in one process (first come, first served), each of ``tokens``:
        the earliest moment the first one fits, and as many of the next as fit beside it then and may wait that long.

        Returns the group's entry id (None when nothing was reserved), how long to wait, and how many calls of the
        group it holds; with none, the wait is when room opens for the first, whose ``max_wait`` was too short.
        """
        entry_id, wait, granted, _, _ = self.lease(now, tokens, max_waits)
        return entry_id, wait, granted

    def lease(
        self, now: float, tokens: list[int], max_waits: list[float | None], spare: int = 0, spare_tokens: int = 0, lease_s: float = 0.0
    ) -> tuple[int | None, float, int, int, int]:
        """:meth:`reserve`, and, when the group starts now, up to ``spare`` more calls (and ``spare_tokens`` tokens)
        that the process may start itself, without asking, for ``lease_s``: the entry then holds its room for
        ``lease_s`` longer, so that a call started at the lease's last moment is counted a whole window too.

        Returns the entry id, the wait, the calls of the group it holds, and the spare calls and tokens it holds."""
        self._expire(now)
        tpm = self.limit.tpm
        asked = [min(t, tpm) if tpm else 0 for t in tokens]
        moment, calls, held = self._earliest(now, asked[0])
        wait = moment - now
        granted, total = 0, 0
        for amount, max_wait in zip(asked, max_waits, strict=True):
            if (max_wait is not None and wait > max_wait) or not self._fits(calls + granted, held + total, amount):
                break
            granted, total = granted + 1, total + amount
        if not granted:
            return None, wait, 0, 0, 0
        extra, extra_tokens = 0, 0
        if wait <= 0 and spare > 0 and lease_s > 0:
            rpm = self.limit.rpm
            extra = spare if rpm is None else min(spare, rpm - calls - granted)
            extra_tokens = 0 if tpm is None else min(spare_tokens, tpm - held - total)
            if extra <= 0 or (tpm is not None and extra_tokens <= 0):
                extra, extra_tokens = 0, 0
        end = moment + self.span + (lease_s if extra else 0.0)
        entry = _Entry(self._next_id, moment, end, granted + extra, total + extra_tokens)
        self._next_id += 1
        self._entries[entry.id] = entry
        heapq.heappush(self._ends, (end, entry.id))
        self._last_start = max(self._last_start, moment)
        self._calls += entry.calls
        self._tokens += entry.tokens
        return entry.id, wait, granted, extra, extra_tokens

    def _earliest(self, now: float, tokens: int) -> tuple[float, int, int]:
        """The earliest moment, no earlier than ``now`` nor the last entry's, with room for one call of ``tokens``,
        and the calls and tokens the window holds then."""
        moment = max(now, self._last_start)
        calls, held = self._calls, self._tokens
        if moment > now:  # reservations ahead: what has left the window by then does not count
            for entry in self._entries.values():
                if entry.end <= moment:
                    calls, held = calls - entry.calls, held - entry.tokens
        if self._fits(calls, held, tokens):
            return moment, calls, held
        for entry in sorted((e for e in self._entries.values() if e.end > moment), key=lambda e: e.end):
            calls, held, moment = calls - entry.calls, held - entry.tokens, entry.end
            if self._fits(calls, held, tokens):
                break
        return moment, calls, held

    def _fits(self, calls: int, held: int, tokens: int) -> bool:
        rpm, tpm = self.limit.rpm, self.limit.tpm
        return (rpm is None or calls + 1 <= rpm) and (tpm is None or held + tokens <= tpm)

    def settle(self, entry_id: int, calls: int, tokens: int) -> None:
        """What an entry's calls turned out to take: their attempts and (with ``tpm``) their tokens; what a lease did
        not spend goes back, and (0, 0) gives all the room back (calls cancelled before they started)."""
        entry = self._entries.get(entry_id)
        if entry is None:  # already out of the window
            return
        tokens = tokens if self.limit.tpm else 0
        self._calls += calls - entry.calls
        self._tokens += tokens - entry.tokens
        entry.calls, entry.tokens = calls, tokens

    def _expire(self, now: float) -> None:
        while self._ends and self._ends[0][0] <= now:
            _, entry_id = heapq.heappop(self._ends)
            entry = self._entries.pop(entry_id, None)
            if entry is not None:
                self._calls -= entry.calls
                self._tokens -= entry.tokens


class LocalWindows:
    """Every model's window, kept in this process (and, as a Ray actor, the cluster's one copy)."""

    def __init__(self) -> None:
        self._windows: dict[str, SlidingWindow] = {}
        self._lock = threading.Lock()  # a process may run several event loops (threads)

    def _window(self, key: str, limit: RateLimit) -> SlidingWindow:
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = SlidingWindow(limit)
        return window

    def reserve(self, key: str, limit: RateLimit, tokens: list[int], max_waits: list[float | None]) -> tuple[int | None, float, int]:
        with self._lock:
            return self._window(key, limit).reserve(time.monotonic(), tokens, max_waits)

    def lease(
        self,
        key: str,
        limit: RateLimit,
        tokens: list[int],
        max_waits: list[float | None],
        spare: int,
        spare_tokens: int,
        lease_s: float,
        settlements: list[tuple[str, int, int, int]],
    ) -> tuple[int | None, float, int, int, int]:
        """The settlements a process has not sent yet (what its earlier leases spent), then a lease
        (:meth:`SlidingWindow.lease`): one actor call for both."""
        with self._lock:
            self._settle_all(settlements)
            return self._window(key, limit).lease(time.monotonic(), tokens, max_waits, spare, spare_tokens, lease_s)

    def settle(self, key: str, entry_id: int, calls: int, tokens: int) -> None:
        with self._lock:
            self._settle_all([(key, entry_id, calls, tokens)])

    def settle_all(self, settlements: list[tuple[str, int, int, int]]) -> None:
        with self._lock:
            self._settle_all(settlements)

    def _settle_all(self, settlements: list[tuple[str, int, int, int]]) -> None:
        for key, entry_id, calls, tokens in settlements:
            window = self._windows.get(key)
            if window is not None:
                window.settle(entry_id, calls, tokens)


class _Lease:
    """Room one reservation holds for this process: the calls it was asked for, and spare calls (and tokens) the
    process starts itself until ``until`` (its own clock), with no actor call. Once it is closed (spent, expired,
    replaced) and its calls have ended, the window is told what they took, when that differs from what it holds:
    the spare room not spent goes back."""

    __slots__ = ("_settle", "counts_tokens", "free", "free_tokens", "held", "open", "pending", "until", "used_calls", "used_tokens")

    def __init__(
        self,
        settle: Callable[[int, int], None],
        counts_tokens: bool,
        calls: int,
        tokens: int,
        spare: int = 0,
        spare_tokens: int = 0,
        until: float = 0.0,
    ) -> None:
        self._settle = settle
        self.counts_tokens = counts_tokens
        self.held = (calls + spare, tokens + spare_tokens)
        self.free, self.free_tokens, self.until = spare, spare_tokens, until
        self.open = spare > 0
        self.pending = calls
        self.used_calls, self.used_tokens = 0, 0

    def take(self, tokens: int, now: float) -> Share | None:
        """A spare call's room, while the lease lasts and has enough of it."""
        if not self.open:
            return None
        if now >= self.until:
            self.close()
            return None
        if self.free < 1 or self.free_tokens < tokens:
            return None
        self.free -= 1
        self.free_tokens -= tokens
        self.pending += 1
        return Share(self, tokens)

    def close(self) -> None:
        """No more spare calls: what is not spent goes back once the calls already started have ended."""
        if self.open:
            self.open = False
            self._settle_if_done()

    def report(self, calls: int, tokens: int) -> None:
        self.used_calls += calls
        self.used_tokens += tokens if self.counts_tokens else 0
        self.pending -= 1
        self._settle_if_done()

    def _settle_if_done(self) -> None:
        if not self.open and self.pending == 0 and (self.used_calls, self.used_tokens) != self.held:
            self._settle(self.used_calls, self.used_tokens)


class Share:
    """One call's (or one attempt's) part of a reservation."""

    __slots__ = ("_open", "lease", "tokens")

    def __init__(self, lease: _Lease, tokens: int) -> None:
        self.lease = lease
        self.tokens = tokens
        self._open = True

    def finish(self, calls: int, tokens: int) -> None:
        """The call ended: it made ``calls`` attempts and took ``tokens``."""
        if self._open:
            self._open = False
            self.lease.report(calls, tokens)

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
        tokens = min(tokens, limit.tpm) if limit.tpm else 0
        lease = _Lease(functools.partial(self.windows.settle, key, entry_id), limit.tpm is not None, 1, tokens)
        return Share(lease, tokens), wait


def lease_seconds(limit: RateLimit) -> float:
    """How long a lease's spare room may be spent: :data:`LEASE_S`, or less in a short window."""
    return min(LEASE_S, limit.window_s * LEASE_WINDOW_SHARE)


@dataclass
class _Waiter:
    tokens: int
    max_wait: float | None
    granted: asyncio.Future[tuple[Share | None, float]]


class _Queue:
    """The calls of one model in one event loop: they start on the current lease's spare room while it lasts, and
    otherwise wait in line, first come first served, for one actor call that reserves for all of them at once and
    leases spare room for the calls expected next (:meth:`_spare`). What the leases spent goes to the actor with the
    next lease, or, when none follows soon, in a call that nothing waits for (:data:`SETTLE_AFTER_S`)."""

    def __init__(self, ray_windows: _OnRay, key: str, limit: RateLimit) -> None:
        self.ray_windows, self.key, self.limit = ray_windows, key, limit
        self.lease_s = lease_seconds(limit)
        self.waiting: list[_Waiter] = []
        self.running: asyncio.Task[None] | None = None
        self.lease: _Lease | None = None
        self.settlements: list[tuple[str, int, int, int]] = []
        self.flushing: asyncio.TimerHandle | None = None
        # the process's own recent rate: calls started (and their tokens) since the last lease was asked for
        self.asked_at = -math.inf
        self.started = 0
        self.started_tokens = 0

    def take(self, tokens: int) -> Share | None:
        """Room on the current lease, without an actor call; None when it has none, or calls wait before this one."""
        lease = self.lease
        if lease is None or self.waiting:
            return None
        share = lease.take(tokens, time.monotonic())
        if share is None:
            if not lease.open:
                self.lease = None
            return None
        self.started += 1
        self.started_tokens += tokens
        return share

    async def reserve(self, tokens: int, max_wait: float | None) -> tuple[Share | None, float]:
        loop = asyncio.get_running_loop()
        waiter = _Waiter(tokens, max_wait, loop.create_future())
        self.waiting.append(waiter)
        if self.running is None:
            self.running = loop.create_task(self._serve())
        return await waiter.granted

    def _spare(self, group: list[_Waiter]) -> tuple[int, int]:
        """Spare room to lease beside the waiting ``group``: the calls this process started in the last while, at
        that rate over one lease (twice, for headroom), at most :data:`LEASE_LIMIT_SHARE` of the limit, so that
        processes share a small limit fairly (none for ``rpm`` under 1 / LEASE_LIMIT_SHARE)."""
        now = time.monotonic()
        count = self.started + len(group)
        tokens = self.started_tokens + sum(w.tokens for w in group)
        expected = count * self.lease_s / max(now - self.asked_at, self.lease_s)
        self.asked_at, self.started, self.started_tokens = now, 0, 0
        spare = math.ceil(LEASE_HEADROOM * expected) - len(group)
        rpm, tpm = self.limit.rpm, self.limit.tpm
        if rpm is not None:
            spare = min(spare, int(rpm * LEASE_LIMIT_SHARE))
        if spare <= 0:
            return 0, 0
        if tpm is None:
            return spare, 0
        per_call = max(math.ceil(tokens / count), 1)
        spare_tokens = min(spare * per_call, int(tpm * LEASE_LIMIT_SHARE))
        return (spare, spare_tokens) if spare_tokens >= per_call else (0, 0)

    def settle_later(self, entry_id: int, calls: int, tokens: int) -> None:
        """What a lease spent, sent with the next lease or soon after (nothing waits for it)."""
        self.settlements.append((self.key, entry_id, calls, tokens))
        if self.flushing is None:
            try:
                self.flushing = asyncio.get_running_loop().call_later(SETTLE_AFTER_S, self.flush)
            except RuntimeError:  # no loop running here (it ended): send it now
                self.flush()

    def flush(self) -> None:
        self.flushing = None
        settlements, self.settlements = self.settlements, []
        if settlements:
            self.ray_windows.settle_all(settlements)

    def _expire(self, lease: _Lease) -> None:
        lease.close()
        if self.lease is lease:
            self.lease = None

    def _from_lease(self) -> None:
        """Waiters the current lease still has room for (it came back while they queued)."""
        while self.waiting and self.lease is not None:
            share = self.lease.take(self.waiting[0].tokens, time.monotonic())
            if share is None:
                self._expire(self.lease)
                return
            waiter = self.waiting.pop(0)
            self.started += 1
            self.started_tokens += waiter.tokens
            if waiter.granted.done():
                share.release()
            else:
                waiter.granted.set_result((share, 0.0))

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.waiting:
                self._from_lease()
                if not self.waiting:
                    break
                group = self.waiting[:MAX_GROUP]
                spare, spare_tokens = self._spare(group)
                settlements, self.settlements = self.settlements, []
                sent = time.monotonic()
                try:
                    entry_id, wait, granted, spare, spare_tokens = await self.ray_windows.call(
                        "lease",
                        self.key,
                        self.limit,
                        [w.tokens for w in group],
                        [w.max_wait for w in group],
                        spare,
                        spare_tokens,
                        self.lease_s,
                        settlements,
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
                group_tokens = sum(w.tokens for w in reserved)
                self.started += granted
                self.started_tokens += group_tokens
                # spare room is spent from now until the lease's end as the actor counts it, whatever the hop took
                lease = _Lease(
                    functools.partial(self.settle_later, entry_id),
                    self.limit.tpm is not None,
                    granted,
                    group_tokens,
                    spare,
                    spare_tokens,
                    sent + self.lease_s,
                )
                if spare:
                    self.lease = lease
                    loop.call_later(self.lease_s, self._expire, lease)  # what it did not spend goes back
                for waiter in reserved:
                    share = Share(lease, waiter.tokens)
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

    def settle_all(self, settlements: list[tuple[str, int, int, int]]) -> None:
        """Not waited for: the window only gets roomier (or, after unheld retries, learns of attempts already made).
        A call that answered never fails for it: without the actor, its reservation simply stands."""
        try:
            self._handle().settle_all.remote(settlements)
        except Exception:  # Ray going away as the process ends
            log.debug("could not settle %d rate-limit reservations", len(settlements), exc_info=True)

    async def reserve(self, key: str, limit: RateLimit, tokens: int, max_wait: float | None) -> tuple[Share | None, float]:
        loop = asyncio.get_running_loop()
        queue = self._queues.get((loop, key))
        if queue is None:
            queue = self._queues[(loop, key)] = _Queue(self, key, limit)
        tokens = min(tokens, limit.tpm) if limit.tpm else 0
        share = queue.take(tokens)
        if share is not None:
            return share, 0.0
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


class _HeldByCaller:
    """The first attempt's room as a Serve replica sees it: the caller's process took it, and settles it."""

    tokens = 0

    def finish(self, calls: int, tokens: int) -> None:
        pass

    def release(self) -> None:
        pass

    def keep(self) -> None:
        pass


HELD_BY_CALLER = _HeldByCaller()


@dataclass
class Admission:
    """Room reserved for one call (its first attempt, and each retry the backend made), and what to tell the window
    when the call ends. ``retries_elsewhere``: the backend runs in a Serve replica, which takes and settles the
    retries' room itself (:class:`ReplicaRetries`), so this process settles the first attempt alone."""

    share: Share | _HeldByCaller
    reserved: int
    prompt: int
    waited_s: float
    retries: list[Share] = field(default_factory=list)
    retries_elsewhere: bool = False

    def used(self, completion: Completion) -> None:
        tokens = completion.usage.prompt_tokens + completion.usage.completion_tokens
        self._ended(completion.attempts, tokens or self.reserved)

    def failed(self, err: BackendError) -> None:
        self._ended(err.attempts, None)

    def _ended(self, attempts: int, answered: int | None) -> None:
        """Each attempt's room: the answer's tokens on the last (when it answered), the prompt's on a failed one.
        Attempts made without room of their own (a backend that retries without the gate) are charged on the last,
        now; a deployed model's caller settles its first attempt alone (its replica settled the retries)."""
        if self.retries_elsewhere:
            self.share.finish(1, self.prompt if answered is None or attempts > 1 else answered)
            return
        shares = [self.share, *self.retries]
        unheld = max(attempts - len(shares), 0)
        made = min(attempts, len(shares))
        for i, share in enumerate(shares):
            if i >= made:
                share.release()  # room taken for an attempt that was not made
            elif i < made - 1:
                share.finish(1, self.prompt)
            else:
                share.finish(1 + unheld, (self.prompt if answered is None else answered) + self.prompt * unheld)

    def keep(self) -> None:
        """The call was cut while it ran: the room of each attempt stands."""
        self.share.keep()
        for share in self.retries:
            share.keep()


class _RetryGate:
    """Room in the model's limit for each retry of one call, before the backend sends it (:data:`RETRY_GATE`): the
    same wait as a call's, bounded by :data:`MAX_WAIT_SHARE` of the call's time left; OverRateLimit when it would
    come too late. Closed once the call has ended (a gate left in a context admits nothing more)."""

    __slots__ = ("admission", "agent", "open")

    def __init__(self, agent: RateLimitedAgent, admission: Admission) -> None:
        self.agent, self.admission, self.open = agent, admission, True

    async def __call__(self, left_s: float | None) -> None:
        if not self.open:
            return
        max_wait = None if left_s is None else max(left_s, 0.0) * MAX_WAIT_SHARE
        share, _ = await self.agent.room(self.admission.reserved, max_wait, " for a retry", "the call's deadline")
        self.admission.retries.append(share)


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
        # a deployed model's backend retries in its Serve replica, which takes room for each retry there
        self.retries_elsewhere = spec.deployed

    def prepare(self) -> None:
        prepare = getattr(self.inner, "prepare", None)
        if prepare is not None:
            prepare()

    async def admit(self, messages: list[ChatMessage], params: ChatParams, *, patient: bool = False) -> Admission:
        """Wait for room for this call; :class:`OverRateLimit` when it would come too late for ``params.timeout_s``
        (never when ``patient``, or without a timeout)."""
        reserved, prompt = self._tokens(messages, params)
        max_wait = None if patient or params.timeout_s is None else params.timeout_s * MAX_WAIT_SHARE
        share, wait = await self.room(reserved, max_wait, "", "the request's deadline")
        return Admission(share, reserved, prompt, wait, retries_elsewhere=self.retries_elsewhere)

    def retries_admission(self, messages: list[ChatMessage], params: ChatParams) -> Admission:
        """A Serve replica's part of a call whose caller took room for the first attempt: room for each retry."""
        reserved, prompt = self._tokens(messages, params)
        return Admission(HELD_BY_CALLER, reserved, prompt, 0.0)

    def _tokens(self, messages: list[ChatMessage], params: ChatParams) -> tuple[int, int]:
        """What an attempt reserves under ``tpm`` (its prompt's estimate plus ``max_tokens``; 0 without), and of that
        its prompt's part, what a failed attempt keeps."""
        reserved = reserved_tokens(messages, params, self.default_max_tokens) if self.limit.tpm else 0
        return reserved, max(reserved - (params.max_tokens or self.default_max_tokens), 0)

    async def room(self, reserved: int, max_wait: float | None, what: str, deadline: str) -> tuple[Share, float]:
        """Room for one attempt (a call's first, or a retry: ``what``), waited for; :class:`OverRateLimit` naming
        ``deadline`` when it would open later than ``max_wait``. Returns the share and how long it waited."""
        share, wait = await process_windows().reserve(self.key, self.limit, reserved, max_wait)
        if share is None:
            raise OverRateLimit(
                f"{self.name}: over its rate limit ({self.limit.describe()}){what}: room in {wait:.1f} s, too late for {deadline}",
                model=self.name,
                retry_after_s=wait,
            )
        if wait > 0:
            try:
                await asyncio.sleep(wait)
            except BaseException:
                share.release()
                raise
        return share, wait

    @staticmethod
    def _left_after(params: ChatParams, admission: Admission) -> ChatParams:
        if params.timeout_s is None or admission.waited_s <= 0:
            return params
        return params.model_copy(update={"timeout_s": max(params.timeout_s - admission.waited_s, 0.001)})

    async def chat_admitted(self, admission: Admission, messages: list[ChatMessage], params: ChatParams) -> Completion:
        gate = _RetryGate(self, admission)
        entered = RETRY_GATE.set(gate)  # each retry the backend makes takes room of its own first
        try:
            completion = await self.inner.chat(messages, params)
        except BackendError as err:
            admission.failed(err)
            raise
        except BaseException:
            admission.keep()
            raise
        finally:
            gate.open = False
            RETRY_GATE.reset(entered)
        admission.used(completion)
        return completion

    async def stream_admitted(self, admission: Admission, messages: list[ChatMessage], params: ChatParams) -> AsyncIterator[StreamChunk]:
        gate = _RetryGate(self, admission)
        entered = RETRY_GATE.set(gate)
        try:
            async for chunk in self.inner.stream(messages, params):
                if chunk.completion is not None:
                    admission.used(chunk.completion)
                yield chunk
        except BackendError as err:
            admission.failed(err)
            raise
        finally:
            admission.keep()  # a stream closed or cut before its end: what it reserved stands
            gate.open = False
            with contextlib.suppress(ValueError):  # closed from another context (a generator finalised late)
                RETRY_GATE.reset(entered)

    async def chat(self, messages: list[ChatMessage], params: ChatParams) -> Completion:
        admission = await self.admit(messages, params)
        return await self.chat_admitted(admission, messages, self._left_after(params, admission))

    async def stream(self, messages: list[ChatMessage], params: ChatParams) -> AsyncIterator[StreamChunk]:
        admission = await self.admit(messages, params)
        async for chunk in self.stream_admitted(admission, messages, self._left_after(params, admission)):
            yield chunk


class ReplicaRetries:
    """A rate-limited model's backend in its Serve replica: the calling process took room for each call's first
    attempt (:class:`RateLimitedAgent`), and each retry the backend makes here takes room of its own before it is sent,
    in the same window (the same named actor, the same key), so retries keep to the limit however many replicas."""

    def __init__(self, backend: Agent, name: str, spec: ModelSpecBase, *, window_s: float = RATE_WINDOW_S) -> None:
        self.limiter = RateLimitedAgent(backend, name, spec, window_s=window_s)

    async def chat(self, messages: list[ChatMessage], params: ChatParams) -> Completion:
        admission = self.limiter.retries_admission(messages, params)
        return await self.limiter.chat_admitted(admission, messages, params)

    async def stream(self, messages: list[ChatMessage], params: ChatParams) -> AsyncIterator[StreamChunk]:
        admission = self.limiter.retries_admission(messages, params)
        async for chunk in self.limiter.stream_admitted(admission, messages, params):
            yield chunk


def replica_backend(backend: Agent, name: str, spec: ModelSpecBase) -> Agent:
    """What a Serve replica calls for its model: the backend, its retries held to the model's limits when it has any."""
    return ReplicaRetries(backend, name, spec) if spec.rate_limited else backend


def rate_limited(agent: Agent, name: str, spec: ModelSpecBase, *, window_s: float = RATE_WINDOW_S) -> Agent:
    """``agent`` held to its model's ``rpm``/``tpm``; the agent itself for a model without limits."""
    return RateLimitedAgent(agent, name, spec, window_s=window_s) if spec.rate_limited else agent
