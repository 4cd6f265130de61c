"""Progress of a long evaluation: a rich bar with rate and ETA on a terminal, periodic log lines otherwise.

Ray job logs are not terminals, and a redrawn bar would be unreadable there, so the
same numbers are printed as one line every ``log_every_s`` seconds instead.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _RateColumn(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed")


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class EvalProgress:
    """Counts finished rows and failures; use as a context manager around the run."""

    def __init__(self, total: int, description: str, *, unit: str = "rows", log_every_s: float = 10.0, enabled: bool = True) -> None:
        self.total = total
        self.description = description
        self.unit = unit
        self.log_every_s = log_every_s
        self.enabled = enabled
        self.done = 0
        self.failed = 0
        self.console = Console(stderr=True)
        self._interactive = enabled and sys.stderr.isatty()
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._start = time.monotonic()
        self._last_log = self._start

    def __enter__(self) -> EvalProgress:
        self._start = self._last_log = time.monotonic()
        if self._interactive:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                _RateColumn(self.unit),
                TextColumn("failed {task.fields[failed]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total, failed=0)
        elif self.enabled:
            self.console.print(f"{self.description}: {self.total} {self.unit} to do", highlight=False)
        return self

    def advance(self, ok: int, failed: int = 0) -> None:
        self.done += ok + failed
        self.failed += failed
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=ok + failed, failed=self.failed)
        elif self.enabled and time.monotonic() - self._last_log >= self.log_every_s:
            self._log_line()

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._start

    def _log_line(self) -> None:
        self._last_log = time.monotonic()
        rate = self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else None
        self.console.print(
            f"{self.description}: {self.done}/{self.total} {self.unit}, {self.failed} failed, "
            f"{rate:.2f} {self.unit}/s, elapsed {_fmt_eta(self.elapsed_s)}, ETA {_fmt_eta(eta)}",
            highlight=False,
        )

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()
        elif self.enabled:
            self._log_line()
