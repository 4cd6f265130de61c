"""The writer lease on S3, against a real S3 API server (moto's) on loopback: two runs that take it at the same
instant never both hold it, a stale lease is taken over by one run only, and the run that lost it never writes
over its successor."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from bench.simulator import free_port
from moa_ray.eval.lease import LEASE_FILE, WriterLease
from moa_ray.eval.store import StoreError, resolve

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

BUCKET = "moa-runs"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as env:
        # dummy credentials for moto; boto3 and pyarrow both take the endpoint from AWS_ENDPOINT_URL
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }.items():
            env.setenv(name, value)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield endpoint
    server.stop()


def lease_record(uri: str) -> dict[str, Any]:
    key = f"{uri.removeprefix(f's3://{BUCKET}/')}/{LEASE_FILE}"
    return json.loads(boto3.client("s3").get_object(Bucket=BUCKET, Key=key)["Body"].read())


def race(uri: str, owners: list[str]) -> list[WriterLease]:
    """Each owner acquires the lease at the same instant (each with its own S3 client); the leases held."""
    leases = [WriterLease(uri, owner) for owner in owners]
    held: list[WriterLease] = []
    barrier = threading.Barrier(len(leases))

    def take(lease: WriterLease) -> None:
        barrier.wait()
        try:
            lease.acquire()
            held.append(lease)
        except StoreError:
            pass

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return held


def test_two_runs_taking_the_lease_at_the_same_instant_never_both_hold_it(s3_endpoint: str) -> None:
    holders = []
    for trial in range(20):
        held = race(f"s3://{BUCKET}/race-{trial}", ["run-a", "run-b"])
        holders.append(len(held))
        for lease in held:
            lease.release()
    assert holders == [1] * 20


def test_a_stale_lease_is_taken_over_by_one_run_only(s3_endpoint: str) -> None:
    for trial in range(5):
        uri = f"s3://{BUCKET}/stale-{trial}"
        key = f"stale-{trial}/{LEASE_FILE}"
        dead = {"owner": "killed", "host": "elsewhere", "pid": 1, "heartbeat": time.time() - 600}
        boto3.client("s3").put_object(Bucket=BUCKET, Key=key, Body=json.dumps(dead).encode())
        held = race(uri, ["run-a", "run-b"])
        assert len(held) == 1 and held[0].took_over is not None and held[0].took_over["owner"] == "killed"
        assert lease_record(uri)["owner"] == held[0].owner
        held[0].release()


def test_a_run_that_lost_its_lease_never_writes_over_its_successor(s3_endpoint: str) -> None:
    uri = f"s3://{BUCKET}/paused"
    paused = WriterLease(uri, "paused", heartbeat_s=3600).acquire()  # its heartbeat comes too late
    successor = WriterLease(uri, "successor", stale_after_s=0.0).acquire()
    assert successor.took_over is not None and successor.took_over["owner"] == "paused"
    paused._renew()  # the late heartbeat: refused, as the lease is no longer the one it wrote
    assert paused.lost.is_set() and lease_record(uri)["owner"] == "successor"
    paused.release()  # and its release leaves the successor's lease alone
    assert lease_record(uri)["owner"] == "successor"
    with pytest.raises(StoreError, match="being written by run successor"):
        WriterLease(uri, "third").acquire()
    successor.release()
    WriterLease(uri, "third").acquire().release()


def test_the_endpoint_may_also_come_from_the_uri(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    host = s3_endpoint.removeprefix("http://")
    uri = f"s3://{BUCKET}/by-uri?endpoint_override={host}&scheme=http&region=us-east-1"
    with WriterLease(uri, "run-a"):
        with pytest.raises(StoreError, match="run-a"):
            WriterLease(uri, "run-b").check_free()
    assert resolve(uri)[0].get_file_info(f"{BUCKET}/by-uri/{LEASE_FILE}").type.name == "NotFound"  # released
