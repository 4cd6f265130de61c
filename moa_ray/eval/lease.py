"""One writer per output: a lease file with its owner, host and heartbeat.

Two ``eval generate`` runs on the same ``--out`` would answer the same prompts twice (and pay
twice), and their compactions would delete each other's files. A run therefore holds
``<out>/_writer.json`` while it writes: a second run is refused with the holder's name. A
killed run stops its heartbeat, so after ``stale_after_s`` its lease may be taken over, with a
message saying so (at once when its process is gone from this machine).

Every write of the lease is atomic and conditional (:mod:`moa_ray.eval.conditional`): it is created only if
absent, and taken over, renewed by a heartbeat or removed only if it still holds the content its writer last
saw. Two runs that start at the same instant, or that take over the same stale lease, cannot both hold it, and a
run that lost its lease (paused past ``stale_after_s``, then taken over) never overwrites its successor's.
A filesystem without such writes (anything but a local disk, S3 and GCS) is refused.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any

from moa_ray.eval.conditional import conditional_object
from moa_ray.eval.store import StoreError, join, resolve

log = logging.getLogger(__name__)

LEASE_FILE = "_writer.json"  # "_": Parquet readers skip it
STALE_AFTER_S = 90.0
ACQUIRE_TRIES = 5


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _parse(data: bytes) -> dict[str, Any]:
    """A lease record; an unreadable one (no writer of ours leaves one) is an empty record, stale at once."""
    try:
        record = json.loads(data)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


class WriterLease:
    """Held for the duration of a ``with`` block; refuses a live holder, takes over a stale one."""

    def __init__(self, uri: str, owner: str, *, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float | None = None) -> None:
        self.uri = uri
        self.fs, root = resolve(uri)
        self.root = root
        self.path = join(root, LEASE_FILE)
        self.object = conditional_object(uri, self.fs, self.path)  # refuses a filesystem without atomic writes
        self.owner = owner
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else stale_after_s / 4
        self.took_over: dict[str, Any] | None = None
        #: Set when another run took the lease over while this one held it (its heartbeat stopped for too long).
        self.lost = threading.Event()
        self._version: str | None = None  # of the lease as this run last wrote it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        record = {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}
        return json.dumps(record).encode()

    def _ours(self, record: dict[str, Any]) -> bool:
        return record.get("owner") == self.owner and record.get("host") == socket.gethostname() and record.get("pid") == os.getpid()

    def read(self) -> dict[str, Any] | None:
        """The current lease, or None when nobody holds one."""
        current = self.object.read()
        return None if current is None else _parse(current[0])

    def _busy(self, holder: dict[str, Any], age: float) -> StoreError:
        return StoreError(
            f"{self.uri} is being written by run {holder.get('owner')} on {holder.get('host')} "
            f"(pid {holder.get('pid')}, last heartbeat {age:.0f} s ago); wait for it to finish or use another --out"
        )

    def _age(self, holder: dict[str, Any]) -> float:
        if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid") or 0)):
            return float("inf")  # its process is gone (killed on this machine): stale at once
        return time.time() - float(holder.get("heartbeat") or 0)

    def check_free(self) -> None:
        """Raise :class:`StoreError` naming the holder when another live run writes here (before any work starts)."""
        holder = self.read()
        if holder is not None and holder.get("owner") != self.owner:
            age = self._age(holder)
            if age < self.stale_after_s:
                raise self._busy(holder, age)

    def _take(self) -> str | None:
        """One attempt: create the lease, or take over a stale one (or this process's own); its version, or None
        when another run wrote it meanwhile."""
        current = self.object.read()
        if current is None:
            return self.object.create(self._record())
        holder, version = _parse(current[0]), current[1]
        if not self._ours(holder):  # another run's, or a killed run's of the same id
            age = self._age(holder)
            if age < self.stale_after_s:
                raise self._busy(holder, age)
            taken = self.object.replace(self._record(), version)  # only if it is still the stale lease we read
            if taken is not None:
                why = "its process is gone" if age == float("inf") else f"its last heartbeat was {age:.0f} s ago"
                log.warning("took over the writer lease of run %s on %s: %s (killed?)", holder.get("owner"), holder.get("host"), why)
                self.took_over = holder
            return taken
        return self.object.replace(self._record(), version)

    def acquire(self) -> WriterLease:
        self.fs.create_dir(self.root, recursive=True)
        for _ in range(ACQUIRE_TRIES):
            self._version = self._take()
            if self._version is not None:
                break
            time.sleep(0.05)  # another run wrote it a moment ago: look again (and name it, if it holds it now)
        else:
            raise StoreError(f"{self.uri}: another run took the writer lease at the same moment; try again")
        self._thread = threading.Thread(target=self._beat, name="writer-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        """One heartbeat, written only over this run's own last write: a lease taken over is never overwritten."""
        assert self._version is not None
        renewed = self.object.replace(self._record(), self._version)
        if renewed is None:
            current = self.object.read()
            holder = None if current is None else _parse(current[0])
            if holder is not None and self._ours(holder):  # our last write landed but its answer was lost
                self._version = current[1] if current is not None else None
                return
            log.error(
                "lost the writer lease of %s to run %s: this run's heartbeat stopped for over %.0f s",
                self.uri,
                None if holder is None else holder.get("owner"),
                self.stale_after_s,
            )
            self.lost.set()
            self._stop.set()
            return
        self._version = renewed

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._renew()
            except (OSError, StoreError) as err:  # a transient storage error: the next beat tries again
                log.warning("writer lease heartbeat failed: %s", err)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._version is None or self.lost.is_set():
            return
        try:
            if not self.object.delete(self._version):
                log.warning("the writer lease %s was no longer this run's: left to its holder", self.object.where)
        except (OSError, StoreError) as err:
            log.warning("could not remove the writer lease %s: %s", self.object.where, err)
        self._version = None

    def __enter__(self) -> WriterLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
