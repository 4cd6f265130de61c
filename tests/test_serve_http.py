"""``moa-ray serve`` for real: one server subprocess (its own Ray, Serve's HTTP proxy, the ingress and one
agent deployment per model) backed by the simulator, shared by every test of this module.

Order matters only at the end: the log scan runs after every request was made, and the replica-kill
check runs last.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from serve_support import ServerProcess

from bench.simulator import Behaviour, SimulatorConfig, run_simulator

pytestmark = pytest.mark.ray

CLIENT_KEY = "client-key-for-http-tests-42"
PROVIDER_SECRET = "sk-upstream-provider-secret-93b1d0"
USER = [{"role": "user", "content": "Name three uses of Ray Serve."}]
SIM_LATENCY_MS = 300


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    sim_config = SimulatorConfig(
        latency_ms=SIM_LATENCY_MS,
        output_tokens=16,
        # b is slow, so that a call to it is in flight whenever its replica gets killed
        models={
            "b": Behaviour(latency_ms=1000, output_tokens=16),
            "broken": Behaviour(failure_rate=1.0, failure_status=500, latency_ms=10),
        },
    )
    with run_simulator(sim_config) as sim:
        model = {
            "backend": "openai",
            "base_url": sim.base_url,
            "api_key_env": "SIM_PROVIDER_KEY",
            "max_retries": 0,
            "hosting": "deployment",  # the served path with agent deployments behind the ingress (replica kills)
            "num_cpus": 0.05,
            "max_ongoing_requests": 64,
        }
        config = {
            "models": {name: {**model, "model": name} for name in ("a", "b", "broken")},
            "pipelines": {
                "moa2": {"kind": "moa", "description": "two proposers, a aggregates", "layers": [["a", "b"]], "aggregator": "a"},
                "doomed": {"kind": "moa", "layers": [["broken"]], "aggregator": "a"},
            },
            # a short body timeout: the 408 test waits it out
            "server": {"max_tokens_limit": 256, "max_message_chars": 2000, "max_messages": 8, "body_timeout_s": 3},
        }
        path = tmp_path_factory.mktemp("serve-http") / "config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        proc = ServerProcess(path, {"MOA_RAY_API_KEYS": f"other-key,{CLIENT_KEY}", "SIM_PROVIDER_KEY": PROVIDER_SECRET})
        proc.start()
        proc.sim = sim
        try:
            yield proc
        finally:
            proc.stop()
            proc.cleanup()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=60)


def post(server, body, key: str | None = CLIENT_KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        return httpx.post(f"{server.base_url}/v1/chat/completions", content=body, headers=headers, timeout=60, **kwargs)
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=headers, timeout=60, **kwargs)


def test_openai_client_completion(client, server):
    reply = client.chat.completions.create(model="moa2", messages=USER, extra_body={"moa": {"trace": True}})
    assert reply.choices[0].message.content and reply.choices[0].finish_reason == "stop"
    calls = reply.model_extra["moa"]["trace"]["calls"]
    assert len(calls) == 3 and all(c["status"] == "ok" for c in calls)
    assert reply.usage.completion_tokens == 48 == sum(c["completion_tokens"] for c in calls)
    assert reply.usage.prompt_tokens == sum(c["prompt_tokens"] for c in calls)
    assert server.sim.stats.auth_headers[-1] == f"Bearer {PROVIDER_SECRET}"  # the agents did use the provider key


def test_openai_client_streaming(client):
    started = time.perf_counter()
    stream = client.chat.completions.create(model="moa2", messages=USER, stream=True, stream_options={"include_usage": True})
    arrivals, text, usage = [], [], None
    for chunk in stream:
        arrivals.append(time.perf_counter() - started)
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
        else:
            usage = chunk.usage
    assert len("".join(text).split()) == 16 and usage.completion_tokens == 48
    # tokens arrive as the aggregator produces them (the simulator spreads 16 tokens over its latency)
    assert arrivals[-1] - arrivals[1] > 0.5 * SIM_LATENCY_MS / 1000


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["moa2", "doomed"]
    assert httpx.get(f"{server.base_url}/health", timeout=10).json() == {"status": "ok", "pipelines": 2}


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        ({"model": "nope", "messages": USER}, 404, "model_not_found"),
        ({"model": "moa2", "messages": []}, 400, "invalid_request"),
        ({"model": "moa2", "messages": [{"role": "user", "content": "x" * 2001}]}, 400, "message_too_long"),
        ({"model": "moa2", "messages": USER * 9}, 400, "too_many_messages"),
        ({"model": "moa2", "messages": USER, "max_tokens": 257}, 400, "max_tokens_exceeded"),
        ({"model": "moa2", "messages": USER, "stream": True, "max_tokens": 100_000}, 400, "max_tokens_exceeded"),
    ],
    ids=[
        "malformed-json",
        "unknown-pipeline",
        "empty-messages",
        "oversized-message",
        "too-many-messages",
        "max-tokens",
        "stream-max-tokens",
    ],
)
def test_bad_input_through_the_proxy_is_4xx_openai_error(server, body, status, code):
    response = post(server, body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_auth_is_enforced(server):
    assert post(server, {"model": "moa2", "messages": USER}, key=None).status_code == 401
    response = post(server, {"model": "moa2", "messages": USER}, key="guess")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="guess", max_retries=0).models.list()


def test_upstream_failure_is_502_without_the_provider_key(server):
    for stream in (False, True):
        response = post(server, {"model": "doomed", "messages": USER, "stream": stream, "moa": {"trace": True}})
        assert response.status_code == 502, response.text
        assert response.json()["error"]["type"] == "upstream_error"
        assert PROVIDER_SECRET not in response.text


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b'Content-Length: 100\r\n\r\n{"model":', 408),  # a Content-Length larger than the body sent
        (b"Content-Length: 100000000\r\n\r\n{", 413),  # a body declared too large, never sent
    ],
    ids=["408", "413"],
)
def test_a_refused_body_closes_the_connection_within_seconds(server, head, status):
    """Both were held open by HAProxy waiting for the rest of the body (past 60 s): the replica answers with
    ``Connection: close`` and closes its side, and HAProxy closes the client's within its client timeout."""
    from moa_ray.serve.proxy import CLIENT_TIMEOUT_S

    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: moa.test\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {CLIENT_KEY}\r\n".encode()
            + head
        )
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
        answered = time.monotonic()
        assert received.startswith(f"HTTP/1.1 {status}".encode()), received
        while chunk := sock.recv(65536):  # b"": closed; still open after 60 s: socket.timeout
            received += chunk
        closed_after_s = time.monotonic() - answered
    assert closed_after_s < CLIENT_TIMEOUT_S + 5
    assert b'"code":"request_timeout"' in received if status == 408 else b'"code":"request_too_large"' in received


def _listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses with a LISTEN socket on ``port``, from /proc/net/tcp (Linux)."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        ip_hex, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            out.add(socket.inet_ntoa(bytes.fromhex(ip_hex)[::-1]))
    return out


def test_binds_loopback_only(server):
    if not Path("/proc/net/tcp").exists():
        pytest.skip("needs Linux /proc/net/tcp")
    assert _listening_addresses(server.port) == {"127.0.0.1"}
    from ray._private.services import get_node_ip_address

    address = get_node_ip_address()
    if address != "127.0.0.1":
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex((address, server.port)) != 0, f"the endpoint answers on {address}"


def test_no_key_in_any_log(server):
    """After successes, 4xx, 401 and upstream failures: neither the provider key nor a client key is in any log."""
    before = server.occurrences(b"HTTP 500")
    post(server, {"model": "doomed", "messages": USER})  # one more failure right before the scan
    wait_for(lambda: server.occurrences(b"HTTP 500") > before, "the failure reached the replica's log")  # logs flushed
    assert server.files_containing("moa2"), "the scan must see the logs (sanity check)"
    assert server.files_containing(PROVIDER_SECRET) == []
    assert server.files_containing(CLIENT_KEY) == []


KILL_REPLICA = """
import ray
ray.init(logging_level="ERROR", log_to_driver=False)
replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "#agent-b#" in a["name"]]
assert len(replicas) == 1, replicas
ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
print(replicas[0]["name"])
"""


def wait_for(condition, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.2)


async def until(condition, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def _traffic(server, concurrency: int, stop: asyncio.Event, results: list) -> None:
    """``concurrency`` clients sending requests back to back until ``stop`` is set."""
    async with httpx.AsyncClient(base_url=f"{server.base_url}/v1", headers={"Authorization": f"Bearer {CLIENT_KEY}"}, timeout=90) as http:

        async def client(c: int) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                started = time.perf_counter()
                body = {"model": "moa2", "messages": [{"role": "user", "content": f"q{c}-{i}"}], "moa": {"trace": True}}
                try:
                    r = await http.post("/chat/completions", json=body)
                    results.append((r.status_code, time.perf_counter() - started, r.json()))
                except httpx.TimeoutException:
                    results.append(("timeout", time.perf_counter() - started, None))

        await asyncio.gather(*(client(c) for c in range(concurrency)))


def test_killing_a_replica_under_traffic_never_hangs_or_500s_and_serve_restarts_it(server):
    results: list = []

    async def scenario() -> str:
        stop = asyncio.Event()
        traffic = asyncio.create_task(_traffic(server, 8, stop, results))
        await until(lambda: len(results) >= 8)  # traffic is flowing
        killed = await asyncio.to_thread(server.attach, KILL_REPLICA)
        after_kill = len(results)
        await until(lambda: len(results) >= after_kill + 16)  # traffic goes on while Serve notices and replaces it
        stop.set()
        await traffic
        return killed.strip()

    killed = asyncio.run(scenario())
    statuses = [r[0] for r in results]
    assert "timeout" not in statuses, "a request hung"
    assert set(statuses) <= {200, 502}, statuses  # never a 500: an upstream replica death is an upstream failure
    dropped = [
        r
        for r in results
        if r[0] == 200
        and any(c["status"] == "error" and c["model"] == "b" and "ActorDied" in (c["error"] or "") for c in r[2]["moa"]["trace"]["calls"])
    ]
    # A call in flight on the killed replica is retried once on a live replica (HandleAgent); when the retry
    # fails too, the request still answers with that proposer dropped and traced. Either way: an answer.
    assert statuses.count(200) > 0
    assert all(r[2]["choices"][0]["message"]["content"] for r in results if r[0] == 200)
    # Serve restarts the replica: soon a request again gets answers from both proposers
    deadline, recovered = time.monotonic() + 90, None
    while time.monotonic() < deadline and recovered is None:
        body = post(server, {"model": "moa2", "messages": USER, "moa": {"trace": True}}).json()
        if all(c["status"] == "ok" for c in body["moa"]["trace"]["calls"]):
            recovered = time.monotonic()
        else:
            time.sleep(1)
    assert recovered is not None, "the killed replica was not replaced"
    print(
        json.dumps(
            {
                "killed": killed,
                "requests": len(results),
                "ok": statuses.count(200),
                "502": statuses.count(502),
                "ok_with_proposer_dropped": len(dropped),
                "max_latency_s": round(max(r[1] for r in results), 2),
            }
        )
    )
