"""Fallbacks: a call that fails is made again on its model's fallbacks, in order, and the trace keeps both calls.

Covers the aggregator (plain and streamed, through the endpoint), proposers, SMoA's judge and moderator, what
does not fall back (a passed deadline), the accounting and call keys of a fallback call, and the config's checks."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from bench.simulator import Behaviour, SimulatorConfig, free_port
from moa_ray.config import parse_config
from moa_ray.errors import AggregatorFailed, ConfigError
from moa_ray.pipeline import build_pipeline
from moa_ray.pipeline.agents import in_process_agents
from moa_ray.pipeline.reuse import CallReuse
from moa_ray.serve.auth import KeyVerifier, Redactor
from moa_ray.serve.ingress import create_api
from moa_ray.serve.service import ChatService

pytestmark = pytest.mark.anyio

USER = [{"role": "user", "content": "What is a mixture of agents?"}]
JUDGE_REPLY = '{"reasoning": "the first is best", "chosen_responses": [1], "end_debate": false}'


def remote(base_url: str, model_id: str, **extra: Any) -> dict[str, Any]:
    return {"backend": "openai", "model": model_id, "base_url": base_url, "max_retries": 0, "max_tokens": 32, **extra}


def closed_url() -> str:
    """A loopback port nobody listens on: every call to it fails at once (connection refused)."""
    return f"http://127.0.0.1:{free_port()}/v1"


def config_with(sim_url: str, models: dict[str, dict[str, Any]], pipelines: dict[str, Any]) -> Any:
    base = {"b": remote(sim_url, "sim-b"), "c": remote(sim_url, "sim-c"), "j": remote(sim_url, "sim-judge")}
    return parse_config({"models": {**base, **models}, "pipelines": pipelines})


def api_for(config: Any) -> Any:
    agents = in_process_agents(config, list(config.models))
    pipelines = {name: build_pipeline(config, name, agents) for name in config.pipelines}
    return create_api(ChatService(config, pipelines, Redactor.for_config(config)), KeyVerifier(()))


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://moa.test", timeout=30)


@pytest.fixture
def sim(simulator):
    return simulator(SimulatorConfig(latency_ms=10, output_tokens=8, models={"sim-judge": Behaviour(latency_ms=10, reply=JUDGE_REPLY)}))


def calls_of(trace: dict[str, Any], role: str) -> list[dict[str, Any]]:
    return [c for c in trace["calls"] if c["role"] == role]


# --------------------------------------------------------------------------- the aggregator, through the endpoint


@pytest.mark.parametrize("stream", [False, True])
async def test_an_aggregator_on_a_closed_port_is_answered_by_its_fallback_and_both_calls_are_traced(sim, stream):
    config = config_with(
        sim.base_url,
        {"dead": remote(closed_url(), "dead", fallbacks=["b"])},
        {"moa": {"kind": "moa", "layers": [["b", "c"]], "aggregator": "dead"}},
    )
    body = {"model": "moa", "messages": USER, "moa": {"trace": True}, "stream": stream}
    async with client_for(api_for(config)) as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    if stream:
        events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: {")]
        import json

        chunks = [json.loads(e) for e in events]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]).strip()
        trace = next(c["moa"]["trace"] for c in chunks if c.get("moa"))
    else:
        assert response.json()["choices"][0]["message"]["content"].strip()
        trace = response.json()["moa"]["trace"]
    failed, answered = calls_of(trace, "aggregator")
    assert (failed["model"], failed["status"], failed["error_type"], failed["fallback_of"]) == ("dead", "error", "UpstreamError", None)
    assert (answered["model"], answered["status"], answered["fallback_of"]) == ("b", "ok", "dead")
    assert answered["layer"] == failed["layer"] and answered["index"] == failed["index"]
    assert answered["completion_tokens"] > 0 and failed["completion_tokens"] == 0
    assert sim.stats.by_model == {"sim-b": 2, "sim-c": 1}  # the proposers and the fallback; the dead port got nothing


@pytest.mark.parametrize("stream", [False, True])
async def test_without_a_fallback_a_dead_aggregator_is_the_same_clear_502(sim, stream):
    config = config_with(
        sim.base_url, {"dead": remote(closed_url(), "dead")}, {"moa": {"kind": "moa", "layers": [["b"]], "aggregator": "dead"}}
    )
    async with client_for(api_for(config)) as client:
        response = await client.post("/v1/chat/completions", json={"model": "moa", "messages": USER, "stream": stream})
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["code"] == "upstream_error"
    assert error["message"].startswith(
        "the pipeline's model services failed: the aggregator (dead) failed: UpstreamError: dead: connection failed"
    )
    assert "fallback" not in error["message"]


async def test_when_the_fallback_fails_too_the_502_names_both_calls(sim):
    config = config_with(
        sim.base_url,
        {"dead": remote(closed_url(), "dead", fallbacks=["dead2"]), "dead2": remote(closed_url(), "dead2")},
        {"moa": {"kind": "moa", "layers": [["b"]], "aggregator": "dead"}},
    )
    async with client_for(api_for(config)) as client:
        response = await client.post("/v1/chat/completions", json={"model": "moa", "messages": USER})
    assert response.status_code == 502
    assert "its fallback dead2 failed: UpstreamError" in response.json()["error"]["message"]


# --------------------------------------------------------------------------- the pipeline's other calls


async def test_a_failed_proposer_falls_back_and_its_layer_keeps_every_response(sim):
    config = config_with(
        sim.base_url,
        {"dead": remote(closed_url(), "dead", fallbacks=["c"])},
        {"moa": {"kind": "moa", "layers": [["dead", "b"]], "aggregator": "b"}},
    )
    pipeline = build_pipeline(config, "moa", in_process_agents(config, list(config.models)))
    result = await pipeline.run("hello")
    proposers = [c for c in result.trace.calls if c.role == "proposer"]
    assert [(c.model, c.index, c.status, c.fallback_of) for c in proposers] == [
        ("dead", 0, "error", None),
        ("b", 1, "ok", None),
        ("c", 0, "ok", "dead"),
    ]
    aggregator_prompt_refs = sim.stats.by_model
    assert aggregator_prompt_refs == {"sim-b": 2, "sim-c": 1}
    accounting = result.trace.accounting
    assert accounting is not None
    assert accounting.by_model["dead"].total_tokens == 0 and accounting.by_model["c"].total_tokens > 0
    assert accounting.totals.calls == 4  # the failed call counts as a call, with no tokens


async def test_the_judge_and_the_moderator_fall_back(sim):
    config = config_with(
        sim.base_url,
        {"deadj": remote(closed_url(), "deadj", fallbacks=["j"]), "deadm": remote(closed_url(), "deadm", fallbacks=["j"])},
        {
            "smoa": {
                "kind": "smoa",
                "layers": [["b", "c", "b"], ["b", "c", "b"]],
                "aggregator": "b",
                "judge": "deadj",
                "moderator": "deadm",
                "k": 1,
            }
        },
    )
    pipeline = build_pipeline(config, "smoa", in_process_agents(config, list(config.models)))
    result = await pipeline.run("hello")
    first_layer = [c for c in result.trace.calls if c.layer == 1 and c.role in ("judge", "moderator")]
    assert sorted((c.role, c.model, c.status, c.fallback_of) for c in first_layer) == [
        ("judge", "deadj", "error", None),
        ("judge", "j", "ok", "deadj"),
        ("moderator", "deadm", "error", None),
        ("moderator", "j", "ok", "deadm"),
    ]
    layer = result.trace.layers[0]
    assert layer.selected == [0]  # the fallback judge's choice (response 1), not the failed judge's first-k repair
    assert layer.judge_fallback is None


async def test_fallbacks_are_followed_in_order_then_their_own(sim):
    config = config_with(
        sim.base_url,
        {
            "dead": remote(closed_url(), "dead", fallbacks=["dead2", "c"]),
            "dead2": remote(closed_url(), "dead2", fallbacks=["dead3"]),
            "dead3": remote(closed_url(), "dead3"),
        },
        {"one": {"kind": "single", "model": "dead"}},
    )
    pipeline = build_pipeline(config, "one", in_process_agents(config, list(config.models)))
    result = await pipeline.run("hello")
    assert [(c.model, c.status, c.fallback_of) for c in result.trace.calls] == [
        ("dead", "error", None),
        ("dead2", "error", "dead"),
        ("dead3", "error", "dead"),
        ("c", "ok", "dead"),
    ]


async def test_a_call_that_outlived_the_deadline_does_not_fall_back(simulator):
    sim = simulator(SimulatorConfig(latency_ms=10, models={"slow": Behaviour(latency_ms=5000)}))
    config = config_with(
        sim.base_url, {"slow": remote(sim.base_url, "slow", fallbacks=["b"])}, {"one": {"kind": "single", "model": "slow"}}
    )
    pipeline = build_pipeline(config, "one", in_process_agents(config, list(config.models)))
    with pytest.raises(AggregatorFailed) as failed:
        await pipeline.run("hello", timeout_s=0.3)
    assert [(c.model, c.error_type) for c in failed.value.trace.calls] == [("slow", "BackendTimeout")]
    assert "sim-b" not in sim.stats.by_model


async def test_a_cut_proposer_does_not_fall_back(simulator):
    sim = simulator(SimulatorConfig(latency_ms=10, models={"slow": Behaviour(latency_ms=5000)}))
    config = config_with(
        sim.base_url,
        {"slow": remote(sim.base_url, "slow", fallbacks=["c"])},
        {"moa": {"kind": "moa", "layers": [{"proposers": ["slow", "b"], "min_responses": 1, "deadline_s": 0.2}], "aggregator": "b"}},
    )
    pipeline = build_pipeline(config, "moa", in_process_agents(config, list(config.models)))
    result = await pipeline.run("hello")
    proposers = [(c.model, c.status) for c in result.trace.calls if c.role == "proposer"]
    assert proposers == [("slow", "cut"), ("b", "ok")]
    await asyncio.sleep(0.05)
    assert "sim-c" not in sim.stats.by_model


async def test_a_fallback_call_has_its_own_call_key(sim):
    config = config_with(
        sim.base_url,
        {"dead": remote(closed_url(), "dead", fallbacks=["b"], temperature=0), "b": remote(sim.base_url, "sim-b", temperature=0)},
        {"one": {"kind": "single", "model": "dead"}},
    )
    agents = in_process_agents(config, list(config.models))
    pipeline = build_pipeline(config, "one", agents, reuse=CallReuse(config.models))
    first = await pipeline.run("hello")
    again = await build_pipeline(config, "one", agents, reuse=pipeline.reuse).run("hello")
    failed, answered = first.trace.calls
    assert failed.key and answered.key and failed.key != answered.key
    assert [(c.model, c.reused) for c in again.trace.calls] == [("dead", False), ("b", True)]  # the failure is never stored


# --------------------------------------------------------------------------- the config


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ({"a": {"fallbacks": ["a"]}}, "models.a.fallbacks[0]: a model cannot fall back on itself"),
        ({"a": {"fallbacks": ["nope"]}}, "models.a.fallbacks[0]: unknown model 'nope' (known models: a, b)"),
        ({"a": {"fallbacks": ["b", "b"]}}, "models.a.fallbacks[1]: 'b' is listed twice"),
        ({"a": {"fallbacks": ["b"]}, "b": {"fallbacks": ["a"]}}, "models.a.fallbacks: the fallbacks form a cycle (a -> b -> a)"),
    ],
)
def test_bad_fallbacks_are_config_errors(models, message):
    raw = {name: remote("http://127.0.0.1:1/v1", name) for name in ("a", "b")}
    for name, extra in models.items():
        raw[name].update(extra)
    with pytest.raises(ConfigError) as err:
        parse_config({"models": raw, "pipelines": {"p": {"kind": "single", "model": "a"}}})
    assert message in str(err.value)


def test_a_pipelines_models_include_its_fallbacks_so_they_are_deployed_and_assembled():
    raw = {name: remote("http://127.0.0.1:1/v1", name) for name in ("a", "b", "c", "d")}
    raw["a"]["fallbacks"] = ["b"]
    raw["b"]["fallbacks"] = ["c"]
    config = parse_config({"models": raw, "pipelines": {"p": {"kind": "single", "model": "a"}}})
    assert list(config.models_for(["p"])) == ["a", "b", "c"]
    assert "fallbacks" not in config.models["a"].answer_settings()  # where a call may go next is not its answer
