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


def contend(out: str, owners: list[str]) -> list[WriterLease]:
    """Each owner acquires the lease at the same instant; the leases held."""
    leases = [WriterLease(out, owner) for owner in owners]
    held: list[WriterLease] = []
    barrier = threading.Barrier(len(leases))

    def take(lease: WriterLease) -> None:
        barrier.wait()
        try:
            held.append(lease.acquire())
        except StoreError:
            pass

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return held


def test_concurrent_takers_of_a_stale_lease_race_and_exactly_one_wins(tmp_path: Path) -> None:
    for trial in range(5):
        out = tmp_path / f"stale-{trial}"
        out.mkdir()
        (out / LEASE_FILE).write_text(json.dumps({"owner": "dead", "host": "elsewhere", "pid": 1, "heartbeat": time.time() - 600}))
        held = contend(str(out), [f"run-{i}" for i in range(6)])
        assert len(held) == 1 and held[0].took_over is not None and held[0].took_over["owner"] == "dead"
        assert json.loads((out / LEASE_FILE).read_text())["owner"] == held[0].owner
        held[0].release()


def test_a_run_that_lost_its_lease_never_writes_over_its_successor(tmp_path: Path) -> None:
    paused = WriterLease(str(tmp_path), "paused", heartbeat_s=3600).acquire()  # its heartbeat comes too late
    successor = WriterLease(str(tmp_path), "successor", stale_after_s=0.0).acquire()
    assert successor.took_over is not None and successor.took_over["owner"] == "paused"
    paused._renew()  # the late heartbeat: refused, as the lease is no longer the one it wrote
    assert paused.lost.is_set() and json.loads((tmp_path / LEASE_FILE).read_text())["owner"] == "successor"
    paused.release()  # and its release leaves the successor's lease in place
    assert json.loads((tmp_path / LEASE_FILE).read_text())["owner"] == "successor"
    successor.release()
    assert not (tmp_path / LEASE_FILE).exists()


def test_a_filesystem_without_atomic_writes_is_refused_by_name() -> None:
    with pytest.raises(StoreError, match="the mock filesystem has no atomic create"):
        WriterLease("mock:///run", "run-a")
