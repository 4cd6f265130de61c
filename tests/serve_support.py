"""Test support: run ``moa-ray serve`` as a real subprocess with its own Ray (the pytest process may already
hold the session's Ray with Serve's HTTP off), and attach short helper processes to that Ray."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.simulator import free_port

ROOT = Path(__file__).resolve().parent.parent


class ServerProcess:
    """``moa-ray serve --config CONFIG --port <free>`` with ``env`` added; logs and Ray temp files in one dir."""

    def __init__(self, config_path: Path, env: dict[str, str], *, extra_args: tuple[str, ...] = (), startup_timeout_s: float = 240) -> None:
        self.config_path = config_path
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="mr-serve-"))  # short: Ray's unix socket paths live under it
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "RAY_TMPDIR": str(self.dir),
            "RAY_USAGE_STATS_ENABLED": "0",
            **env,
        }
        self.env.pop("RAY_ADDRESS", None)
        self.extra_args = extra_args
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self.log_path = self.dir / "server.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> ServerProcess:
        cmd = [sys.executable, "-m", "moa_ray.cli", "serve", "--config", str(self.config_path), "--port", str(self.port), *self.extra_args]
        with open(self.log_path, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moa-ray serve exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200 and "serving" in self.log():
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"moa-ray serve did not become healthy in {self.startup_timeout_s} s:\n{self.log()[-4000:]}")

    @property
    def ray_address(self) -> str:
        match = re.search(r"^ray: (\S+);", self.log(), re.M)
        assert match, self.log()
        return match.group(1)

    def attach(self, code: str, timeout_s: float = 120) -> str:
        """Run ``code`` in a fresh Python connected to this server's Ray; returns its stdout."""
        # The server's Ray listens on loopback only: keep Ray from swapping 127.0.0.1 for this machine's routable IP.
        env = {**self.env, "RAY_ADDRESS": self.ray_address, "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"attached helper failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return done.stdout

    def stop(self, timeout_s: float = 90) -> int | None:
        """Ctrl+C (the documented way to stop it), then make sure nothing of its process group survives."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # Ray daemons it started, if any outlived it
        except ProcessLookupError:
            pass
        return self.proc.returncode

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def occurrences(self, needle: bytes) -> int:
        """How often ``needle`` appears in the server's dir (its log and every Ray session log)."""
        total = 0
        for path in self.dir.rglob("*"):
            if path.is_file() and not path.is_symlink() and "sockets" not in path.parts:
                try:
                    total += path.read_bytes().count(needle)
                except OSError:
                    continue
        return total

    def files_containing(self, needle: str) -> list[str]:
        """Every file under the server's dir (its log and all Ray session logs) that contains ``needle``."""
        hits = []
        data = needle.encode()
        for path in self.dir.rglob("*"):
            if path.is_file() and not path.is_symlink() and "sockets" not in path.parts:
                try:
                    if data in path.read_bytes():
                        hits.append(str(path))
                except OSError:
                    continue
        return hits
