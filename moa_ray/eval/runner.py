"""Shard work items across a pool of Ray actors with bounded concurrency.

Each actor is async and hosts a *handler* (generation or judging) that calls the
Serve-deployed agents through their handles; the driver keeps at most
``concurrency`` items in flight, sends each new item to the least busy actor (or,
with a ``route``, to the actor its route key hashes to), and hands every result to a
callback as soon as it arrives, so rows reach Parquet while the run goes on. A lost
item (its actor died, or the handler raised) becomes error rows built by the handler,
which the next run retries.

:class:`InProcessPool` has the same interface and runs the handler on one asyncio loop
in a thread of this process: no Ray, for tests and debugging (``pool="in_process"``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import math
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

from pydantic import BaseModel

from moa_ray.eval.schema import _Row

I = TypeVar("I", bound=BaseModel, contravariant=True)  # noqa: E741 - the item type (only taken in)
R = TypeVar("R", bound=_Row)

#: Where a pool's workers run: Ray actors, or one asyncio loop in a thread of this process.
PoolKind = Literal["ray", "in_process"]
POOL_KINDS: tuple[str, ...] = ("ray", "in_process")
#: How often ``run`` calls ``tick`` when no result arrives.
TICK_S = 0.5


class Handler(Protocol[I, R]):
    """The work one actor does; pickled to every actor of the pool."""

    async def setup(self) -> None:
        """Runs once per actor before any item (build pipelines, resolve handles)."""

    async def handle(self, item: I) -> list[R]:
        """Rows for one item; failures are rows with status 'error', not exceptions."""

    def failed(self, item: I, error: str) -> list[R]:
        """Error rows for an item whose actor died or whose handler raised."""


class EvalWorker:
    """A Ray actor running a handler's items concurrently (one asyncio loop per actor)."""

    def __init__(self, handler: Any) -> None:
        self.handler = handler
        self._ready = False

    async def ready(self) -> str:
        """Set the handler up (once); the node this actor runs on, so the driver can say where its workers went."""
        import ray

        if not self._ready:
            await self.handler.setup()
            self._ready = True
        return str(ray.get_runtime_context().get_node_id())

    async def run(self, item: Any) -> list[Any]:
        if not self._ready:  # a restarted actor sets itself up again
            await self.ready()
        rows: list[Any] = await self.handler.handle(item)
        return rows


@dataclass
class PoolStats:
    items: int = 0
    lost: int = 0
    elapsed_s: float = 0.0
    workers: int = 0
    nodes: int = 1


def route_index(key: str, workers: int) -> int:
    """The worker a route key goes to: a stable hash (the same in every process and run, unlike ``hash``) mod ``workers``."""
    return zlib.crc32(key.encode()) % workers


def default_workers(concurrency: int) -> int:
    """One actor per 32 concurrent items (at least 1, at most 8): enough event loops, few processes."""
    return max(1, min(8, math.ceil(concurrency / 32)))


class WorkerPool(Generic[I, R]):
    """A pool of :class:`EvalWorker` actors for one handler; start once, :meth:`run` items, :meth:`shutdown`."""

    def __init__(self, handler: Handler[I, R], *, concurrency: int, workers: int | None = None, worker_cpus: float = 0.25) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.handler = handler
        self.concurrency = concurrency
        self.n_workers = min(workers or default_workers(concurrency), concurrency)
        self.worker_cpus = worker_cpus
        self.actors: list[Any] = []
        self.nodes: list[str] = []

    def start(self) -> WorkerPool[I, R]:
        import ray

        per_worker = math.ceil(self.concurrency / self.n_workers)
        # SPREAD: on a cluster the workers (and the in-process model clients they hold) go to different nodes
        cls = ray.remote(EvalWorker).options(
            num_cpus=self.worker_cpus, max_concurrency=per_worker, max_restarts=3, max_task_retries=0, scheduling_strategy="SPREAD"
        )
        self.actors = [cls.remote(self.handler) for _ in range(self.n_workers)]
        try:
            self.nodes = ray.get([a.ready.remote() for a in self.actors])
        except BaseException:  # a handler whose setup failed (or Ctrl+C): no actor outlives the failed start
            self.shutdown()
            raise
        return self

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> WorkerPool[I, R]:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def run(
        self,
        items: Iterable[I],
        on_rows: Callable[[I, list[R]], None],
        *,
        tick: Callable[[], None] | None = None,
        route: Callable[[I], str] | None = None,
    ) -> PoolStats:
        """Process ``items`` with at most ``concurrency`` in flight; ``on_rows`` gets each item's rows as it finishes.

        ``tick`` runs after each batch of results that arrived together, and at least every half
        second: the writers flush there, so rows reach storage before the driver waits again.
        ``route``: items with equal keys always go to the same actor (:func:`route_index`), so what an
        actor keeps between items (a cache) serves them all; without it each item goes to the least busy actor.
        """
        import ray

        if not self.actors:
            raise RuntimeError("start the pool first")
        stats = PoolStats(workers=len(self.actors), nodes=len(set(self.nodes)))
        load = [0] * len(self.actors)
        in_flight: dict[Any, tuple[I, int]] = {}
        pending = iter(items)
        exhausted = False
        start = time.perf_counter()

        def submit() -> None:
            nonlocal exhausted
            while not exhausted and len(in_flight) < self.concurrency:
                item = next(pending, None)
                if item is None:
                    exhausted = True
                    return
                idx = route_index(route(item), len(load)) if route is not None else min(range(len(load)), key=load.__getitem__)
                load[idx] += 1
                in_flight[self.actors[idx].run.remote(item)] = (item, idx)

        submit()
        while in_flight:
            refs = list(in_flight)
            ready, rest = ray.wait(refs, num_returns=1, timeout=TICK_S)
            if ready and rest:
                more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                ready += more
            for ref in ready:
                item, idx = in_flight.pop(ref)
                load[idx] -= 1
                _deliver(self.handler, item, functools.partial(ray.get, ref), stats, on_rows)
            submit()
            if tick is not None:
                tick()
        stats.elapsed_s = time.perf_counter() - start
        return stats


class InProcessPool(Generic[I, R]):
    """:class:`WorkerPool`'s interface without Ray: one worker, the handler's ``setup`` and ``handle`` on an
    asyncio loop in a background thread of this process.

    Up to ``concurrency`` items run concurrently on that loop, as on one actor; the caller's thread keeps
    the bookkeeping (``on_rows``, ``tick``), as the Ray pool's driver does. The handler is used as it is, not
    a pickled copy. Stopping the loop closes what the handler's agents opened in it (their HTTP clients).
    ``workers`` and ``worker_cpus`` are accepted for the same signature and ignored: there is one worker.
    """

    def __init__(self, handler: Handler[I, R], *, concurrency: int, workers: int | None = None, worker_cpus: float = 0.0) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.handler = handler
        self.concurrency = concurrency
        self.n_workers = 1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._closing = False

    def start(self) -> InProcessPool[I, R]:
        if self._thread is not None:
            raise RuntimeError("the pool is already started")
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._closing = False
        self._thread = threading.Thread(target=self._serve, args=(started,), name="moa-ray-eval-worker", daemon=True)
        self._thread.start()
        try:
            started.result()  # the handler's setup, run on the worker's loop
        except BaseException:  # a handler whose setup failed (or Ctrl+C): no thread outlives the failed start
            self.shutdown()
            raise
        return self

    def _serve(self, started: concurrent.futures.Future[None]) -> None:
        # asyncio.run, at its end, cancels what is left and finalises the loop's async generators (agents' clients)
        asyncio.run(self._live(started))

    async def _live(self, started: concurrent.futures.Future[None]) -> None:
        stop = self._stop = asyncio.Event()  # before the loop: shutdown() reads them the other way round
        self._loop = asyncio.get_running_loop()
        try:
            await self.handler.setup()
        except BaseException as err:  # noqa: BLE001 - handed to start(), which raises it in the caller's thread
            started.set_exception(err)
            return
        started.set_result(None)
        if not self._closing:  # a shutdown() that came before the loop was known
            await stop.wait()

    def shutdown(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._closing = True
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # the loop has already closed
                pass
        thread.join()
        self._thread = self._loop = self._stop = None

    def __enter__(self) -> InProcessPool[I, R]:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def run(
        self,
        items: Iterable[I],
        on_rows: Callable[[I, list[R]], None],
        *,
        tick: Callable[[], None] | None = None,
        route: Callable[[I], str] | None = None,
    ) -> PoolStats:
        """As :meth:`WorkerPool.run`; ``route`` changes nothing here (every item goes to the one worker)."""
        loop = self._loop
        if loop is None or self._thread is None:
            raise RuntimeError("start the pool first")
        stats = PoolStats(workers=self.n_workers)
        in_flight: dict[concurrent.futures.Future[list[R]], I] = {}
        pending = iter(items)
        exhausted = False
        start = time.perf_counter()

        def submit() -> None:
            nonlocal exhausted
            while not exhausted and len(in_flight) < self.concurrency:
                item = next(pending, None)
                if item is None:
                    exhausted = True
                    return
                if route is not None:
                    route(item)  # evaluated as the Ray pool does, so a bad route fails here too
                in_flight[asyncio.run_coroutine_threadsafe(self.handler.handle(item), loop)] = item

        try:
            submit()
            while in_flight:
                ready, _ = concurrent.futures.wait(in_flight, timeout=TICK_S, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in ready:
                    _deliver(self.handler, in_flight.pop(future), future.result, stats, on_rows)
                submit()
                if tick is not None:
                    tick()
        finally:
            for future in in_flight:  # interrupted (Ctrl+C, or on_rows raised): nothing keeps running behind the caller
                future.cancel()
        stats.elapsed_s = time.perf_counter() - start
        return stats


def make_pool(
    handler: Handler[I, R], *, kind: PoolKind = "ray", concurrency: int, workers: int | None = None, worker_cpus: float = 0.25
) -> WorkerPool[I, R] | InProcessPool[I, R]:
    """The pool of ``kind`` for ``handler`` (not started: use it as a context manager)."""
    if kind == "ray":
        return WorkerPool(handler, concurrency=concurrency, workers=workers, worker_cpus=worker_cpus)
    if kind == "in_process":
        return InProcessPool(handler, concurrency=concurrency, workers=workers, worker_cpus=worker_cpus)
    raise ValueError(f"unknown pool {kind!r} (pools: {', '.join(POOL_KINDS)})")


def _deliver(
    handler: Handler[I, R], item: I, result: Callable[[], list[R]], stats: PoolStats, on_rows: Callable[[I, list[R]], None]
) -> None:
    """Hand a finished item's rows to ``on_rows``; an item whose worker died or whose handler raised (``result``
    raises) becomes the handler's error rows, which the next run retries. Both pools finish items this way."""
    stats.items += 1
    try:
        rows = result()
    except Exception as err:  # noqa: BLE001 - a lost item becomes error rows, retried next run
        stats.lost += 1
        rows = handler.failed(item, f"{type(err).__name__}: {_last_line(err)}")
    on_rows(item, rows)


def _last_line(err: BaseException) -> str:
    """The last line of ``err``'s text (at most 500 characters): a Ray task error's text is the remote traceback,
    whose last line is the error itself (``ValueError: ...``); the row keeps that, not the traceback."""
    text = str(err).strip()
    return text.splitlines()[-1][:500] if text else ""


def count_rows(rows: Sequence[_Row]) -> tuple[int, int]:
    """(ok, failed) rows."""
    ok = sum(1 for r in rows if r.status == "ok")
    return ok, len(rows) - ok
