"""The writer lease on S3, against a real S3 API server (moto's) on loopback: two runs that take it at the same
instant never both hold it, a stale lease is taken over by one run only, and the run that lost it never writes
over its successor. GCS's steps against a test double of its JSON API (no GCS emulator here implements
generation preconditions)."""

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


@pytest.fixture(scope="module", autouse=True)
def botocore_models_parsed_once() -> Iterator[None]:
    """Every WriterLease builds its own boto3 session and client (as separate runs do); each session would parse
    botocore's S3 model and endpoint rules again (~0.1-0.2 s of JSON each, 30 leases here). The tests share one
    loader of those read-only files: the clients, their connections and their requests stay separate."""
    import functools

    import botocore.session

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(botocore.session, "create_loader", functools.cache(botocore.session.create_loader))
        yield


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
    # 10 trials: the write-then-read-back lease let both hold it in 13 of 20, so 10 clean trials would pass it by
    # chance with p = 0.35 ** 10 < 1e-4
    holders = []
    for trial in range(10):
        held = race(f"s3://{BUCKET}/race-{trial}", ["run-a", "run-b"])
        holders.append(len(held))
        for lease in held:
            lease.release()
    assert holders == [1] * 10


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


# --------------------------------------------------------------------------- GCS: the same steps over its JSON API


class FakeGCS:
    """A test double of GCS's JSON API for one kind of object: media uploads, reads and deletes with
    ``ifGenerationMatch`` preconditions (0: must not exist), as Google documents them; generations count up."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, int]] = {}
        self.generation = 0
        self.lock = threading.Lock()

    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        def unmet(request: Request, name: str) -> bool:
            wanted = request.query_params.get("ifGenerationMatch")
            current = self.objects.get(name, (b"", 0))[1]
            return wanted is not None and int(wanted) != current

        async def upload(request: Request) -> Response:
            name, data = request.query_params["name"], await request.body()
            with self.lock:
                if unmet(request, name):
                    return JSONResponse({"error": {"code": 412}}, status_code=412)
                self.generation += 1
                self.objects[name] = (data, self.generation)
                return JSONResponse({"name": name, "generation": str(self.generation)})

        async def one(request: Request) -> Response:
            name = request.path_params["name"]
            with self.lock:
                if name not in self.objects:
                    return JSONResponse({"error": {"code": 404}}, status_code=404)
                if request.method == "GET":
                    data, generation = self.objects[name]
                    return Response(data, headers={"x-goog-generation": str(generation)})
                if unmet(request, name):
                    return JSONResponse({"error": {"code": 412}}, status_code=412)
                del self.objects[name]
                return Response(status_code=204)

        return Starlette(
            routes=[
                Route("/upload/storage/v1/b/{bucket}/o", upload, methods=["POST"]),
                Route("/storage/v1/b/{bucket}/o/{name:path}", one, methods=["GET", "DELETE"]),
            ]
        )


def test_gcs_objects_are_created_once_and_replaced_only_at_the_generation_read() -> None:
    from serve_support import serve_app

    from moa_ray.eval.conditional import GCSObject

    gcs = FakeGCS()
    with serve_app(gcs.app()) as url:
        uri = f"gs://runs/x?endpoint_override={url.removeprefix('http://')}&scheme=http"
        takers = [GCSObject(uri, f"runs/x/{LEASE_FILE}") for _ in range(2)]
        created: list[str | None] = []
        barrier = threading.Barrier(2)

        def create(taker: GCSObject, data: bytes) -> None:
            barrier.wait()
            created.append(taker.create(data))

        threads = [threading.Thread(target=create, args=(t, f"run-{i}".encode())) for i, t in enumerate(takers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(created, key=str) == ["1", None]  # one created it, the other was refused
        data, generation = takers[1].read()  # type: ignore[misc]
        assert generation == "1" and gcs.objects[f"x/{LEASE_FILE}"][0] == data
        assert takers[0].replace(b"beat", generation) == "2"
        assert takers[1].replace(b"late", generation) is None  # at the generation it read, no longer current
        assert not takers[1].delete(generation) and takers[0].delete("2")
        assert takers[0].read() is None and f"x/{LEASE_FILE}" not in gcs.objects
