"""Shard work items across a pool of Ray actors with bounded concurrency.

Each actor is async and hosts a *handler* (generation or judging) that calls the
Serve-deployed agents through their handles; the driver keeps at most
``concurrency`` items in flight, sends each new item to the least busy actor, and
hands every result to a callback as soon as it arrives, so rows reach Parquet while
the run goes on. A lost item (its actor died, or the handler raised) becomes error
rows built by the handler, which the next run retries.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from pydantic import BaseModel

from moa_ray.eval.schema import _Row

I = TypeVar("I", bound=BaseModel, contravariant=True)  # noqa: E741 - the item type (only taken in)
R = TypeVar("R", bound=_Row)


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

    async def ready(self) -> bool:
        if not self._ready:
            await self.handler.setup()
            self._ready = True
        return True

    async def run(self, item: Any) -> list[Any]:
        if not self._ready:  # a restarted actor sets itself up again
            await self.ready()
        return await self.handler.handle(item)


@dataclass
class PoolStats:
    items: int = 0
    lost: int = 0
    elapsed_s: float = 0.0
    workers: int = 0


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

    def start(self) -> WorkerPool[I, R]:
        import ray

        per_worker = math.ceil(self.concurrency / self.n_workers)
        cls = ray.remote(EvalWorker).options(num_cpus=self.worker_cpus, max_concurrency=per_worker, max_restarts=3, max_task_retries=0)
        self.actors = [cls.remote(self.handler) for _ in range(self.n_workers)]
        try:
            ray.get([a.ready.remote() for a in self.actors])
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

    def run(self, items: Iterable[I], on_rows: Callable[[I, list[R]], None], *, tick: Callable[[], None] | None = None) -> PoolStats:
        """Process ``items`` with at most ``concurrency`` in flight; ``on_rows`` gets each item's rows as it finishes.

        ``tick`` runs after each batch of results that arrived together, and at least every half
        second: the writers flush there, so rows reach storage before the driver waits again.
        """
        import ray

        if not self.actors:
            raise RuntimeError("start the pool first")
        stats = PoolStats(workers=len(self.actors))
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
                idx = min(range(len(load)), key=load.__getitem__)
                load[idx] += 1
                in_flight[self.actors[idx].run.remote(item)] = (item, idx)

        submit()
        while in_flight:
            refs = list(in_flight)
            ready, rest = ray.wait(refs, num_returns=1, timeout=0.5)
            if ready and rest:
                more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                ready += more
            for ref in ready:
                item, idx = in_flight.pop(ref)
                load[idx] -= 1
                stats.items += 1
                try:
                    rows = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - a lost item becomes error rows, retried next run
                    stats.lost += 1
                    rows = self.handler.failed(item, f"{type(err).__name__}: {_first_line(err)}")
                on_rows(item, rows)
            submit()
            if tick is not None:
                tick()
        stats.elapsed_s = time.perf_counter() - start
        return stats


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[-1][:500] if text else ""


def count_rows(rows: Sequence[_Row]) -> tuple[int, int]:
    """(ok, failed) rows."""
    ok = sum(1 for r in rows if r.status == "ok")
    return ok, len(rows) - ok
