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

        self._names: dict[tuple[int, float], str] = {}
        self.last_by_process: dict[str, float] = {}

    def _snapshot(self) -> dict[tuple[int, float], float]:
        me = psutil.Process(os.getpid())
        out: dict[tuple[int, float], float] = {}
        for proc in [me, *me.children(recursive=True)]:
            if proc.pid in self.exclude:
                continue
            try:
                key = (proc.pid, proc.create_time())
                out[key] = _cpu(proc)
                if key not in self._names:
                    self._names[key] = "benchmark" if proc.pid == me.pid else _label(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    def start(self) -> None:
        self._start = self._snapshot()

    def stop(self) -> float:
        """Seconds since :meth:`start`; a process that started since counts from zero (one that ended is lost).

        :attr:`last_by_process` keeps the same seconds by process (Ray's process titles: ``ServeReplica:app:name``,
        ``ProxyActor``, ``raylet``...), to say which hop spends them."""
        end = self._snapshot()
        by: dict[str, float] = {}
        for key, cpu in end.items():
            name = self._names.get(key, "?")
            by[name] = by.get(name, 0.0) + cpu - self._start.get(key, 0.0)
        self.last_by_process = dict(sorted(by.items(), key=lambda kv: -kv[1]))
        return sum(by.values())


def _label(proc: psutil.Process) -> str:
    """A process's role: Ray sets its workers' titles to ``ray::<actor class or task>``."""
    cmdline = proc.cmdline()
    first = cmdline[0] if cmdline else proc.name()
    if first.startswith("ray::"):
        return first.split()[0][5:]
    return first.rsplit("/", 1)[-1]


def breakdown(by_process: dict[str, float], calls: int, top: int = 6) -> str:
    """``name ms/call`` of the processes that spent the most, for one line of a benchmark's output."""
    if not calls:
        return ""
    return ", ".join(f"{name} {1000 * cpu / calls:.1f}" for name, cpu in list(by_process.items())[:top] if cpu > 0)


def simulator_calls(base_url: str) -> int:
    """Chat requests a simulator process has answered so far (its ``/stats``)."""
    root = base_url.rsplit("/v1", 1)[0]
    return int(httpx.get(f"{root}/stats", timeout=5).json()["requests"])
