"""One writer per evaluation output: a second run is refused, a killed run's stale lease is taken over."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from moa_ray.config import parse_config
from moa_ray.eval.benchmarks.registry import load_dataset
from moa_ray.eval.generate import GenerateOptions, run_generation
from moa_ray.eval.lease import LEASE_FILE, WriterLease
from moa_ray.eval.store import StoreError


def wait_until(condition, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_second_writer_is_refused_with_the_holders_name(tmp_path: Path) -> None:
    out = str(tmp_path / "run")
    with WriterLease(out, "run-a"):
        with pytest.raises(StoreError, match=r"being written by run run-a on .* \(pid \d+"):
            WriterLease(out, "run-b").acquire()
        with pytest.raises(StoreError, match="run-a"):
            WriterLease(out, "run-b").check_free()
    assert not (tmp_path / "run" / LEASE_FILE).exists()  # released
    with WriterLease(out, "run-b"):  # free again
        pass


def test_a_killed_runs_stale_lease_is_taken_over(tmp_path: Path) -> None:
    (tmp_path / LEASE_FILE).write_text(json.dumps({"owner": "dead", "host": "h", "pid": 1, "heartbeat": time.time() - 600}))
    lease = WriterLease(str(tmp_path), "alive", stale_after_s=90)
    WriterLease(str(tmp_path), "other").check_free()  # a stale lease does not block
    with lease:
        assert lease.took_over is not None and lease.took_over["owner"] == "dead"
        assert json.loads((tmp_path / LEASE_FILE).read_text())["owner"] == "alive"


def test_a_lease_whose_process_is_gone_from_this_machine_is_taken_over_at_once(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(done.stdout)  # a process that has exited
    record = {"owner": "killed", "host": socket.gethostname(), "pid": dead_pid, "heartbeat": time.time()}
    (tmp_path / LEASE_FILE).write_text(json.dumps(record))
    with WriterLease(str(tmp_path), "resumed") as lease:  # a fresh heartbeat, but nobody behind it
        assert lease.took_over is not None and lease.took_over["owner"] == "killed"


def test_the_heartbeat_keeps_a_long_run_live(tmp_path: Path) -> None:
    with WriterLease(str(tmp_path), "long", stale_after_s=0.4, heartbeat_s=0.05):
        first = json.loads((tmp_path / LEASE_FILE).read_text())["heartbeat"]
        wait_until(lambda: json.loads((tmp_path / LEASE_FILE).read_text())["heartbeat"] > first)
        time.sleep(0.5)  # longer than stale_after_s: only the heartbeat keeps the lease live
        with pytest.raises(StoreError):
            WriterLease(str(tmp_path), "late", stale_after_s=0.4).acquire()


def test_concurrent_writers_race_and_exactly_one_wins(tmp_path: Path) -> None:
    out = str(tmp_path / "race")
    won: list[str] = []
    refused: list[str] = []
    leases: list[WriterLease] = []
    barrier = threading.Barrier(8)

    def contend(i: int) -> None:
        lease = WriterLease(out, f"run-{i}")
        barrier.wait()
        try:
            lease.acquire()
            won.append(lease.owner)
            leases.append(lease)
        except StoreError:
            refused.append(lease.owner)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for lease in leases:
        lease.release()
    assert len(won) == 1 and len(refused) == 7


def test_generate_on_an_output_another_run_writes_is_refused_before_any_call(tmp_path: Path) -> None:
    config = parse_config(
        {
            "models": {"a": {"backend": "openai", "model": "a", "base_url": "http://127.0.0.1:9/v1"}},
            "pipelines": {"p": {"kind": "single", "model": "a"}},
        }
    )
    out = str(tmp_path / "gen")
    options = GenerateOptions(pipelines=["p"], out=out, progress=False)
    with WriterLease(out, "someone-else"):
        with pytest.raises(StoreError, match="someone-else"):
            run_generation(config, load_dataset("alpaca_eval", limit=1), {}, options)
    assert not list((tmp_path / "gen").glob("*.parquet"))
