"""Ray Serve integration: MoA pipelines on real agent deployments (openai backend -> the simulator).

One application for the module (serve.run of a small app takes ~12 s); every test
reads the simulator's counters as deltas, since the deployments are shared.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import time

import httpx
import pytest

from bench.simulator import Behaviour, SimulatorConfig, run_simulator
from moa_ray.chat import ChatMessage, ChatParams, ChatRequest
from moa_ray.config import parse_config
from moa_ray.errors import AggregatorFailed, BackendError, LayerFailed, UpstreamError
from moa_ray.pipeline import build_pipeline
from moa_ray.pipeline.base import PipelineResult
from moa_ray.serve.auth import KeyVerifier, Redactor
from moa_ray.serve.handle import HandleAgent, direct_payload_limit
from moa_ray.serve.ingress import create_api
from moa_ray.serve.service import ChatService

pytestmark = pytest.mark.ray

APP = "t-serve-moa"
LATENCY_MS = 100
OUTPUT_TOKENS = 12


def _config(base_url: str):
    def model(name: str, **extra):
        # each model its own deployment: these tests are about the deployed path (handles, replicas, options)
        return {"backend": "openai", "model": f"sim/{name}", "base_url": base_url, "max_retries": 0, "hosting": "deployment", **extra}

    return parse_config(
        {
            "models": {
                "a": model("a", num_replicas=2),
                "b": model("b"),
                "c": model("c"),
                "bad": model("bad"),
                "slow": model("slow"),
            },
            "pipelines": {
                "moa2": {"kind": "moa", "layers": [["a", "b", "bad"]], "aggregator": "c"},
                "moa3": {"kind": "moa", "layers": [["a", "b", "c"], ["a", "b", "c"]], "aggregator": "a"},
                "wide": {"kind": "moa", "layers": [["a", "b"]], "aggregator": "c"},
                "all-bad": {"kind": "moa", "layers": [["bad", "bad"]], "aggregator": "a"},
                "bad-agg": {"kind": "moa", "layers": [["a", "b"]], "aggregator": "bad"},
                "quorum": {
                    "kind": "moa",
                    "layers": [{"proposers": ["a", "b", "slow"], "min_responses": 2, "deadline_s": 0.5}],
                    "aggregator": "c",
                },
            },
        }
    )


@pytest.fixture(scope="module")
def deployed(ray_session):
    from ray import serve

    from moa_ray.serve.deploy import deploy_agents

    sim_config = SimulatorConfig(
        latency_ms=LATENCY_MS,
        output_tokens=OUTPUT_TOKENS,
        models={
            "sim/bad": Behaviour(latency_ms=20, failure_rate=1.0, failure_status=503),
            "sim/slow": Behaviour(latency_ms=30_000),
        },
    )
    with run_simulator(sim_config) as sim:
        config = _config(sim.base_url)
        agents = deploy_agents(config, list(config.pipelines), app_name=APP)
        try:
            yield config, agents, sim
        finally:
            serve.delete(APP)


def _run(config, agents, name: str, prompt: str = "Why is the sky blue?", params: ChatParams | None = None) -> PipelineResult:
    return asyncio.run(build_pipeline(config, name, agents).run(prompt, params))


def _requests(sim) -> dict[str, int]:
    return dict(sim.stats.by_model)


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}


def test_every_model_gets_its_own_deployment_with_its_options(deployed):
    from ray import serve

    config, agents, _ = deployed
    assert set(agents) == set(config.models)
    assert all(isinstance(agent, HandleAgent) for agent in agents.values())
    status = serve.status().applications[APP]
    assert {"agent-a", "agent-b", "agent-c", "agent-bad", "agent-slow"} <= set(status.deployments)
    assert status.deployments["agent-a"].replica_states.get("RUNNING") == 2  # num_replicas from the config
    info = serve.get_deployment_handle("agent-b", APP).info.remote().result()
    assert (info["name"], info["model"], info["backend"]) == ("b", "sim/b", "openai")
    assert info["niceness"] == os.nice(0)  # the driver's priority, not Ray's default worker niceness (+15)


def test_two_layer_moa_on_real_deployments(deployed):
    config, agents, sim = deployed
    before = _requests(sim)
    result = _run(config, agents, "moa2", params=ChatParams(max_tokens=8))
    trace = result.trace

    assert result.answer and len(result.answer.split()) == 8  # the final call's max_tokens reached the provider
    assert [(layer.layer, layer.role) for layer in trace.layers] == [(1, "proposer"), (2, "aggregator")]
    assert [(c.layer, c.model, c.status) for c in trace.calls] == [
        (1, "a", "ok"),
        (1, "b", "ok"),
        (1, "bad", "error"),
        (2, "c", "ok"),
    ]
    failed = trace.calls[2]
    assert failed.error.startswith("UpstreamError: sim/bad: HTTP 503")
    for call in (trace.calls[0], trace.calls[1]):
        assert call.prompt_tokens == 5 and call.completion_tokens == OUTPUT_TOKENS
        assert LATENCY_MS / 1000 <= call.latency_s < 1.0
    aggregator = trace.calls[3]
    assert aggregator.prompt_tokens > 2 * OUTPUT_TOKENS + 50  # the paper's prompt and both references reached it
    assert aggregator.completion_tokens == 8 and aggregator.finish_reason == "length"
    assert trace.wall_s >= 2 * LATENCY_MS / 1000
    assert _delta(before, _requests(sim)) == {"sim/a": 1, "sim/b": 1, "sim/bad": 1, "sim/c": 1}


def test_layers_run_in_parallel_through_serve(deployed):
    config, agents, sim = deployed
    _run(config, agents, "moa3")  # warm the handles' routers
    sim.stats.max_in_flight = 0
    result = _run(config, agents, "moa3")
    assert len(result.trace.calls) == 7 and all(c.status == "ok" for c in result.trace.calls)
    assert sim.stats.max_in_flight == 3
    # calls one after another would take at least the sum of their latencies; three parallel layers take ~3/7 of it
    assert result.trace.wall_s < 0.75 * result.trace.sum_latency_s


def test_backend_errors_cross_the_handle_as_their_own_class(deployed):
    _, agents, _ = deployed
    with pytest.raises(UpstreamError) as info:
        asyncio.run(agents["bad"].chat([ChatMessage(role="user", content="hi")], ChatParams()))
    err = info.value
    assert isinstance(err, BackendError) and err.retryable
    assert err.status_code == 503 and err.model == "sim/bad"
    assert "simulated failure" in str(err)


def test_every_proposer_failing_through_serve_raises_layer_failed(deployed):
    config, agents, sim = deployed
    before = _requests(sim)
    with pytest.raises(LayerFailed, match="layer 1: every proposer failed") as info:
        _run(config, agents, "all-bad")
    assert [c.status for c in info.value.trace.calls] == ["error", "error"]
    assert all("UpstreamError" in c.error for c in info.value.trace.calls)
    assert _delta(before, _requests(sim)) == {"sim/bad": 2}  # the aggregator was never called


def test_aggregator_failing_through_serve_raises_aggregator_failed(deployed):
    config, agents, _ = deployed
    with pytest.raises(AggregatorFailed, match=r"the aggregator \(bad\) failed: UpstreamError") as info:
        _run(config, agents, "bad-agg")
    calls = info.value.trace.calls
    assert [c.status for c in calls] == ["ok", "ok", "error"] and calls[-1].role == "aggregator"


def test_deadline_cuts_a_straggling_deployment(deployed):
    config, agents, _ = deployed
    start = time.perf_counter()
    result = _run(config, agents, "quorum")
    assert time.perf_counter() - start < 5  # the straggler answers after 30 s
    status = {c.model: c.status for c in result.trace.calls_in(1)}
    assert status == {"a": "ok", "b": "ok", "slow": "cut"}
    assert result.answer


def test_streaming_the_final_answer_through_serve(deployed):
    config, agents, _ = deployed

    async def consume():
        return [item async for item in build_pipeline(config, "moa2", agents).stream("Why?", ChatParams(max_tokens=6))]

    *chunks, result = asyncio.run(consume())
    assert isinstance(result, PipelineResult)
    assert len(chunks) == 6 and "".join(c.delta for c in chunks) == result.answer
    final = result.trace.calls[-1]
    assert (final.role, final.status, final.completion_tokens) == ("aggregator", "ok", 6)


def test_deploying_the_same_models_again_reuses_the_running_app(deployed):
    from ray import serve

    from moa_ray.serve.builder import agents_fingerprint
    from moa_ray.serve.deploy import deploy_agents, running_fingerprint

    config, _, _sim = deployed
    pids = {serve.get_deployment_handle("agent-b", APP).info.remote().result()["pid"] for _ in range(3)}
    agents = deploy_agents(config, list(config.pipelines), app_name=APP)
    assert {serve.get_deployment_handle("agent-b", APP).info.remote().result()["pid"] for _ in range(3)} == pids
    assert _run(config, agents, "moa3").answer  # the reused app serves

    changed = parse_config(config.model_dump(mode="json"))
    changed.models["b"] = changed.models["b"].model_copy(update={"temperature": 0.1})
    assert agents_fingerprint(changed, list(changed.models)) != agents_fingerprint(config, list(config.models))
    try:
        deploy_agents(changed, list(changed.pipelines), app_name=APP)  # a changed spec redeploys
        assert running_fingerprint(APP) == agents_fingerprint(changed, list(changed.models))
    finally:
        deploy_agents(config, list(config.pipelines), app_name=APP)
    assert running_fingerprint(APP) == agents_fingerprint(config, list(config.models))


def _body_of(size: int, model: str, max_chars: int) -> tuple[bytes, int]:
    """A chat request of exactly ``size`` bytes: as many messages of at most ``max_chars`` as it takes, in
    1000-character words (the simulator counts words as tokens); also the number of words sent."""

    def encode(contents: list[str]) -> bytes:
        messages = [{"role": "user", "content": c} for c in contents]
        return json.dumps({"model": model, "max_tokens": 8, "moa": {"trace": True}, "messages": messages}).encode()

    room = size - len(encode([]))
    count = -(-room // (max_chars + len(encode([""])) - len(encode([]))))  # each message costs its text and its JSON
    room -= len(encode([""] * count)) - len(encode([]))
    word = "w" * 999 + " "
    sizes = [room // count + (i < room % count) for i in range(count)]
    contents = [(word * (n // len(word) + 1))[:n] for n in sizes]
    body = encode(contents)
    assert len(body) == size and max(map(len, contents)) <= max_chars
    return body, sum(len(c.split()) for c in contents)


def test_a_request_at_the_body_limit_reaches_every_model(deployed):
    """Whatever the endpoint accepts must reach the models: a body of exactly ``max_request_bytes`` (~8 MiB,
    twice what Serve's direct gRPC transport carries) gets its answer; one byte more is refused with 413."""
    config, agents, sim = deployed
    limits = config.server
    service = ChatService(config, {"wide": build_pipeline(config, "wide", agents)}, Redactor([]))
    app = create_api(service, KeyVerifier([]))
    body, words = _body_of(limits.max_request_bytes, "wide", limits.max_message_chars)
    too_big, _ = _body_of(limits.max_request_bytes + 1, "wide", limits.max_message_chars)

    async def post(content: bytes) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://moa.test", timeout=120) as client:
            return await client.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})

    before = _requests(sim)
    reply = asyncio.run(post(body))
    assert reply.status_code == 200, reply.text[:2000]
    calls = reply.json()["moa"]["trace"]["calls"]
    assert [(c["model"], c["status"]) for c in calls] == [("a", "ok"), ("b", "ok"), ("c", "ok")]
    assert [c["prompt_tokens"] for c in calls[:2]] == [words, words]  # every message, whole, reached each proposer
    assert calls[2]["prompt_tokens"] > words  # the aggregator got them too, with the references
    assert _delta(before, _requests(sim)) == {"sim/a": 1, "sim/b": 1, "sim/c": 1}

    refused = asyncio.run(post(too_big))
    assert refused.status_code == 413 and refused.json()["error"]["code"] == "request_too_large"


def _pickling_to(size: int) -> list[ChatMessage]:
    """One message whose request pickles to exactly ``size`` bytes, as the direct transport measures it."""

    def pickled(chars: int) -> int:
        return len(
            pickle.dumps((ChatRequest(messages=message(chars), params=ChatParams()).model_dump(),), protocol=pickle.HIGHEST_PROTOCOL)
        )

    def message(chars: int) -> list[ChatMessage]:
        return [ChatMessage(role="user", content="w" * chars)]

    chars = size
    for _ in range(4):  # a byte per character, plus framing that grows in steps with the size
        chars += size - pickled(chars)
    assert pickled(chars) == size
    return message(chars)


def test_the_direct_transport_carries_requests_up_to_its_limit_and_larger_ones_go_by_reference(deployed):
    """The limit HandleAgent switches at is one the real gRPC transport carries, and the object store takes the rest."""
    _, agents, _ = deployed
    agent = agents["b"]
    limit = direct_payload_limit()
    for size, handle in ((limit, agent.handle), (limit + 1, agent.by_reference), (2 * limit, agent.by_reference)):
        messages = _pickling_to(size)
        assert agent.handle_for(ChatRequest(messages=messages, params=ChatParams()).model_dump()) is handle
        assert asyncio.run(agent.chat(messages, ChatParams(max_tokens=4))).usage.completion_tokens == 4

    async def streamed() -> str:
        return "".join([chunk.delta async for chunk in agent.stream(_pickling_to(2 * limit), ChatParams(max_tokens=4))])

    assert len(asyncio.run(streamed()).split()) == 4
