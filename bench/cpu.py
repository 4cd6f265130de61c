"""CPU time of a benchmark and of every process it started (Ray's GCS, raylet, workers, Serve replicas).

``CpuMeter`` sums user + system seconds from ``/proc`` (via psutil) over this process and its
descendants, leaving out the ones named (the simulator: a remote provider's cost is not ours).
Divided by the agent calls the simulator counted, it is the machine's CPU cost per agent call.
"""

from __future__ import annotations

import os

import httpx
import psutil


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


class CpuMeter:
    """CPU seconds used between :meth:`start` and :meth:`stop` by this process tree (minus ``exclude``)."""

    def __init__(self, exclude: set[int] | None = None) -> None:
        self.exclude = set(exclude or ())
        self._start: dict[tuple[int, float], float] = {}

    def _snapshot(self) -> dict[tuple[int, float], float]:
        me = psutil.Process(os.getpid())
        out: dict[tuple[int, float], float] = {}
        for proc in [me, *me.children(recursive=True)]:
            if proc.pid in self.exclude:
                continue
            try:
                out[(proc.pid, proc.create_time())] = _cpu(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    def start(self) -> None:
        self._start = self._snapshot()

    def stop(self) -> float:
        """Seconds since :meth:`start`; a process that started since counts from zero (one that ended is lost)."""
        end = self._snapshot()
        return sum(cpu - self._start.get(key, 0.0) for key, cpu in end.items())


def simulator_calls(base_url: str) -> int:
    """Chat requests a simulator process has answered so far (its ``/stats``)."""
    root = base_url.rsplit("/v1", 1)[0]
    return int(httpx.get(f"{root}/stats", timeout=5).json()["requests"])
