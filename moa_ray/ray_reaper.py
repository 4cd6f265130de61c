"""A watchdog that kills what is left of a local Ray once the process that started it is gone, even by SIGKILL.

Ray ties the head processes a driver starts (GCS, raylet, dashboard, monitors) to the driver with
``PR_SET_PDEATHSIG`` (``ray/_private/services.py``, ``start_ray_process``: ``fate_share`` ->
``set_kill_on_parent_death_linux``), but the raylet's own children only notice its death by polling,
then try to report it to the GCS that died with it (``ray/_private/process_watcher.py``,
``report_raylet_error_logs`` -> ``publish_error_to_driver``, a 60 s timeout): after a ``kill -9`` of
the CLI, the DashboardAgent and the RuntimeEnvAgent can live on for a minute.

The session's processes are the parent's children whose environment carries its token (:data:`TOKEN_VAR`,
which the parent sets only while ``ray.init`` starts the head, so Ray's head processes inherit it and nothing
else does) and every process they start. Descendants are recorded while the parent lives, because
Ray's agents and workers rewrite their process title (which can clobber ``/proc/PID/environ``) and are
reparented once the raylet dies. When the parent is gone (its stdin, a pipe only the parent writes,
closes; or this process is reparented), every recorded process still alive is SIGKILLed.

It is run as a file (``python ray_reaper.py TOKEN``) and needs only the standard library, so it
starts in milliseconds and never imports Ray or moa_ray. Linux only: it reads ``/proc``.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

#: The environment variable whose value names one local Ray session of one CLI process.
TOKEN_VAR = "MOA_RAY_LOCAL_SESSION"
PROC = "/proc"

#: A process as /proc shows it: (pid, start time in clock ticks since boot), unique even when pids are reused.
Proc = tuple[int, int]


def supported() -> bool:
    """Whether this system exposes processes' parents and environments (Linux /proc) for :class:`Tracker`."""
    return sys.platform.startswith("linux") and os.path.exists(f"{PROC}/self/environ")


def processes() -> dict[Proc, int]:
    """Every live (not zombie) process: its identity -> its parent's pid."""
    table = {}
    for name in os.listdir(PROC):
        if not name.isdigit():
            continue
        try:
            with open(f"{PROC}/{name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()  # after "pid (comm)": state ppid ... starttime is 22nd
        except OSError:  # gone meanwhile
            continue
        if fields[0] != b"Z":
            table[(int(name), int(fields[19]))] = int(fields[1])
    return table


def has_token(pid: int, token: str) -> bool:
    """Whether the process's environment has ``TOKEN_VAR=token`` (False when unreadable or gone)."""
    try:
        with open(f"{PROC}/{pid}/environ", "rb") as env:
            return f"{TOKEN_VAR}={token}".encode() in env.read().split(b"\0")
    except OSError:
        return False


class Tracker:
    """The processes of one session, as seen at each :meth:`scan`: the children of ``parent`` whose environment has
    the token (Ray's head processes), and all their descendants.

    Only ``parent``'s children are asked for the token, and again at every scan until they have it: a child seen
    between its fork and its exec still shows the parent's environment, and the parent's ``os.environ`` changes
    are not in /proc either, so one early look could miss it for good.
    """

    def __init__(self, token: str, parent: int) -> None:
        self.token = token
        self.parent = parent
        self.members: set[Proc] = set()

    def scan(self) -> dict[Proc, int]:
        """Add the session's new processes to :attr:`members`; returns the process table it looked at."""
        table = processes()
        me = os.getpid()
        for proc, ppid in table.items():
            if ppid == self.parent and proc[0] != me and proc not in self.members and has_token(proc[0], self.token):
                self.members.add(proc)
        added = True
        while added:  # descendants of members, however deep
            member_pids = {pid for pid, start in self.members if (pid, start) in table}
            new = {proc for proc, ppid in table.items() if ppid in member_pids and proc not in self.members and proc[0] != me}
            self.members |= new
            added = bool(new)
        return table

    def alive(self) -> list[int]:
        """Pids of the members still running (as of a fresh :meth:`scan`)."""
        table = self.scan()
        return [pid for pid, start in self.members if (pid, start) in table]

    def kill(self, *, timeout_s: float = 10.0) -> int:
        """SIGKILL the members until none is left (a dying raylet may still start one); returns how many were killed."""
        killed: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pids = self.alive()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
                except OSError:
                    pass
            time.sleep(0.1)
        return len(killed)


def watch(parent: int, tracker: Tracker, *, poll_s: float = 0.2) -> None:
    """Scan for the session's processes until stdin reaches EOF (the parent closed it or died) or this process is
    reparented (which covers a parent whose pipe was inherited by a child it forked, keeping the pipe open).
    """
    fd = sys.stdin.fileno()
    while os.getppid() == parent:
        tracker.scan()
        ready, _, _ = select.select([fd], [], [], poll_s)
        if ready and not os.read(fd, 4096):
            return


def spawn(token: str) -> subprocess.Popen[bytes]:
    """Start the reaper of session ``token`` as a child of this process; closing its stdin ends the session.

    It runs in its own session (a terminal's Ctrl+C or hangup for the CLI's process group must not stop the
    cleanup) and in isolated mode (``-I -S``: no site-packages, no PYTHON* variables, nothing to import but the stdlib).
    """
    return subprocess.Popen(
        [sys.executable, "-I", "-S", os.path.abspath(__file__), token],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def main(argv: list[str]) -> int:
    """``ray_reaper.py TOKEN``: wait for the parent, then kill the session's processes."""
    if len(argv) != 2 or not argv[1]:
        print("usage: ray_reaper.py TOKEN", file=sys.stderr)
        return 2
    parent = os.getppid()
    for sig in (signal.SIGINT, signal.SIGHUP):  # the terminal's Ctrl+C or hangup is for the CLI, not for its cleanup
        signal.signal(sig, signal.SIG_IGN)
    tracker = Tracker(argv[1], parent)
    watch(parent, tracker)
    tracker.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
