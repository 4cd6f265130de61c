"""The in-process worker pool (no Ray): WorkerPool's interface, the handler on one asyncio loop in a thread.

The Ray pool's own behaviour (actors, a failed start, routing across actors) is in test_eval_ray.py.
"""

from __future__ import annotations

import asyncio
import threading
import zlib

import pytest
from pydantic import BaseModel

from moa_ray.eval import runner
from moa_ray.eval.runner import InProcessPool, WorkerPool, make_pool, route_index


class Item(BaseModel):
    key: str
    fail: bool = False


class Done(BaseModel):
    key: str
    status: str = "ok"
    error: str | None = None
    thread: int = 0


class Handler:
    """Records concurrency and threads; an item with ``fail`` raises in ``handle``."""

    def __init__(self, hold_s: float = 0.05) -> None:
        self.hold_s = hold_s
        self.setups = 0
        self.now = 0
        self.most = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    async def setup(self) -> None:
        self.setups += 1
        self.loop = asyncio.get_running_loop()

    async def handle(self, item: Item) -> list[Done]:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(self.hold_s)
        finally:
            self.now -= 1
        if item.fail:
            raise RuntimeError(f"{item.key} failed on purpose")
        return [Done(key=item.key, thread=threading.get_ident())]

    def failed(self, item: Item, error: str) -> list[Done]:
        return [Done(key=item.key, status="error", error=error)]


def pool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "moa-ray-eval-worker"]


def test_items_run_concurrently_up_to_the_cap_on_one_worker_thread() -> None:
    handler = Handler()
    got: dict[str, Done] = {}
    driver_threads: set[int] = set()

    def on_rows(item: Item, rows: list[Done]) -> None:
        driver_threads.add(threading.get_ident())
        (got[item.key],) = rows

    with InProcessPool(handler, concurrency=3, workers=4) as pool:
        stats = pool.run((Item(key=f"k{i}") for i in range(10)), on_rows)
    assert (stats.items, stats.lost, stats.workers) == (10, 0, 1)
    assert set(got) == {f"k{i}" for i in range(10)} and all(r.status == "ok" for r in got.values())
    assert handler.setups == 1 and handler.most == 3  # never more than the cap in flight, and the cap is used
    assert driver_threads == {threading.get_ident()}  # bookkeeping stays in the caller's thread
    (worker,) = {r.thread for r in got.values()}
    assert worker != threading.get_ident()
    assert pool_threads() == []  # shut down with the context


def test_a_handler_that_raises_loses_the_item_as_error_rows() -> None:
    rows: list[Done] = []
    with InProcessPool(Handler(hold_s=0), concurrency=2) as pool:
        stats = pool.run([Item(key="a"), Item(key="b", fail=True)], lambda item, r: rows.extend(r))
    assert (stats.items, stats.lost) == (2, 1)
    by_key = {r.key: r for r in rows}
    assert by_key["a"].status == "ok"
    assert (by_key["b"].status, by_key["b"].error) == ("error", "RuntimeError: b failed on purpose")


def test_a_failed_setup_raises_in_the_caller_and_leaves_no_thread() -> None:
    class SetupFails(Handler):
        async def setup(self) -> None:
            raise RuntimeError("setup failed on purpose")

    pool = InProcessPool(SetupFails(), concurrency=2)
    with pytest.raises(RuntimeError, match="setup failed on purpose"):
        pool.start()
    assert pool_threads() == []
    with pytest.raises(RuntimeError, match="start the pool first"):
        pool.run([Item(key="a")], lambda item, rows: None)


def test_tick_runs_while_the_driver_waits_for_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """An item that finishes only after two ticks: ticks come while nothing arrives (at least every TICK_S)."""
    monkeypatch.setattr(runner, "TICK_S", 0.1)  # 0.5 s in use: the same waits, shorter
    release = None
    ticks = 0

    class Waits(Handler):
        async def handle(self, item: Item) -> list[Done]:
            nonlocal release
            release = asyncio.Event()
            await release.wait()
            return [Done(key=item.key)]

    handler = Waits()

    def tick() -> None:
        nonlocal ticks
        ticks += 1
        if ticks >= 2 and release is not None and handler.loop is not None:
            handler.loop.call_soon_threadsafe(release.set)

    with InProcessPool(handler, concurrency=1) as pool:
        stats = pool.run([Item(key="a")], lambda item, rows: None, tick=tick)
    assert stats.items == 1 and ticks >= 3  # two (or more) while waiting, one after the result
    assert stats.elapsed_s >= 2 * runner.TICK_S


def test_shutdown_finalises_what_the_handler_opened_in_its_loop() -> None:
    """InProcessAgent closes its HTTP client from an async generator finalised as its loop ends."""
    closed = []

    async def closer():
        try:
            yield
        finally:
            closed.append(True)

    class Opens(Handler):
        async def setup(self) -> None:
            self.gen = closer()
            await anext(self.gen)

    with InProcessPool(Opens(), concurrency=1) as pool:
        pool.run([], lambda item, rows: None)
        assert closed == []
    assert closed == [True]


def test_route_keys_are_asked_for_and_change_nothing_with_one_worker() -> None:
    seen: list[str] = []

    def route(item: Item) -> str:
        seen.append(item.key)
        return item.key

    with InProcessPool(Handler(hold_s=0), concurrency=2) as pool:
        stats = pool.run([Item(key="x"), Item(key="y")], lambda item, rows: None, route=route)
    assert stats.items == 2 and sorted(seen) == ["x", "y"]


def test_route_index_is_a_stable_hash_in_range() -> None:
    assert route_index("alpaca-17", 4) == zlib.crc32(b"alpaca-17") % 4  # the same in every process (not hash())
    assert all(route_index(f"p{i}", 3) in range(3) for i in range(50))
    assert len({route_index(f"p{i}", 3) for i in range(50)}) == 3  # keys spread over the workers
    assert route_index("anything", 1) == 0


def test_make_pool_picks_the_kind() -> None:
    assert isinstance(make_pool(Handler(), kind="ray", concurrency=4, workers=2), WorkerPool)  # not started: no Ray
    in_process = make_pool(Handler(), kind="in_process", concurrency=4, workers=2)
    assert isinstance(in_process, InProcessPool) and in_process.n_workers == 1
    with pytest.raises(ValueError, match="unknown pool 'threads'"):
        make_pool(Handler(), kind="threads", concurrency=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="concurrency must be at least 1"):
        InProcessPool(Handler(), concurrency=0)
