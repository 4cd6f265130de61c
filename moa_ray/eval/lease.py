"""One writer per output: a lease file with its owner, host and heartbeat.

Two ``eval generate`` runs on the same ``--out`` would answer the same prompts twice (and pay
twice), and their compactions would delete each other's files. A run therefore holds
``<out>/_writer.json`` while it writes: a second run is refused with the holder's name. A
killed run stops its heartbeat, so after ``stale_after_s`` its lease may be taken over, with a
message saying so (at once when its process is gone from this machine). On a local disk the lease is created atomically (``O_EXCL``); on object
stores, which have no such primitive, the file is written and read back to detect a race.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any

import pyarrow.fs as pafs

from moa_ray.eval.store import StoreError, join, resolve

log = logging.getLogger(__name__)

LEASE_FILE = "_writer.json"  # "_": Parquet readers skip it
STALE_AFTER_S = 90.0


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


class WriterLease:
    """Held for the duration of a ``with`` block; refuses a live holder, takes over a stale one."""

    def __init__(self, uri: str, owner: str, *, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float | None = None) -> None:
        self.uri = uri
        self.fs, root = resolve(uri)
        self.root = root
        self.path = join(root, LEASE_FILE)
        self.owner = owner
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else stale_after_s / 4
        self.took_over: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}

    def read(self) -> dict[str, Any] | None:
        """The current lease, or None when nobody holds one (an unreadable file counts as none)."""
        try:
            with self.fs.open_input_stream(self.path) as f:
                data: dict[str, Any] = json.loads(f.read())
                return data
        except (FileNotFoundError, OSError, ValueError):
            return None

    def _write(self, exclusive: bool) -> bool:
        payload = json.dumps(self._record()).encode()
        if exclusive and isinstance(self.fs, pafs.LocalFileSystem):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
            return True
        with self.fs.open_output_stream(self.path) as f:
            f.write(payload)
        current = self.read()
        return current is not None and current.get("owner") == self.owner

    def _busy(self, holder: dict[str, Any], age: float) -> StoreError:
        return StoreError(
            f"{self.uri} is being written by run {holder.get('owner')} on {holder.get('host')} "
            f"(pid {holder.get('pid')}, last heartbeat {age:.0f} s ago); wait for it to finish or use another --out"
        )

    def _other_holder(self) -> tuple[dict[str, Any], float] | None:
        holder = self.read()
        if holder is None or holder.get("owner") == self.owner:
            return None
        if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid") or 0)):
            return holder, float("inf")  # its process is gone (killed on this machine): stale at once
        return holder, time.time() - float(holder.get("heartbeat", 0))

    def check_free(self) -> None:
        """Raise :class:`StoreError` naming the holder when another live run writes here (before any work starts)."""
        other = self._other_holder()
        if other is not None and other[1] < self.stale_after_s:
            raise self._busy(*other)

    def acquire(self) -> WriterLease:
        self.fs.create_dir(self.root, recursive=True)
        for _ in range(5):
            other = self._other_holder()
            if other is not None:
                holder, age = other
                if age < self.stale_after_s:
                    raise self._busy(holder, age)
                why = "its process is gone" if age == float("inf") else f"its last heartbeat was {age:.0f} s ago"
                log.warning("taking over the writer lease of run %s on %s: %s (killed?)", holder.get("owner"), holder.get("host"), why)
                self.took_over = holder
                self.fs.delete_file(self.path)
            if self._write(exclusive=True):
                break
            time.sleep(0.05)  # created a moment ago by another run (maybe half-written): look again
        else:
            raise StoreError(f"{self.uri}: another run took the writer lease at the same moment; try again")
        self._thread = threading.Thread(target=self._beat, name="writer-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._write(exclusive=False)
            except OSError as err:  # a transient storage error: the next beat tries again
                log.warning("writer lease heartbeat failed: %s", err)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        holder = self.read()
        if holder is not None and holder.get("owner") == self.owner:
            try:
                self.fs.delete_file(self.path)
            except OSError as err:
                log.warning("could not remove the writer lease %s: %s", self.path, err)

    def __enter__(self) -> WriterLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
