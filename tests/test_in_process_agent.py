"""Remote models called from the pipeline's own process (``hosting: in_process``, the default for remote models).

The in-process agent must keep what the model's deployment kept: the concurrency cap, the provider key
out of every error, the backend's retries, and traced calls; it pickles as its spec, so Ray workers build
their own client, and a config with only such models deploys nothing.
"""

from __future__ import annotations

import asyncio
import pickle

import pytest

from bench.simulator import Behaviour, SimulatorConfig
from moa_ray.chat import ChatMessage, ChatParams
from moa_ray.config import OpenAIModelSpec, parse_config
from moa_ray.errors import BadRequest, ConfigError
from moa_ray.pipeline import build_pipeline
from moa_ray.pipeline.agents import InProcessAgent, in_process_agents
from moa_ray.serve.app import build_app, deployment_options
from moa_ray.serve.auth import REDACTED

MESSAGES = [ChatMessage(role="user", content="hi")]


def remote(base_url: str, **extra) -> dict:
    return {"backend": "openai", "model": "m", "base_url": base_url, "backoff_s": 0.01, "backoff_max_s": 0.02, **extra}


def test_the_cap_holds_calls_in_flight_at_max_ongoing_requests_times_replicas(simulator):
    sim = simulator(SimulatorConfig(latency_ms=100))
    agent = InProcessAgent("m", OpenAIModelSpec.model_validate(remote(sim.base_url, max_ongoing_requests=2, num_replicas=2)))

    async def burst():
        await asyncio.gather(*(agent.chat(MESSAGES, ChatParams(max_tokens=4)) for _ in range(12)))
        await agent.aclose()

    asyncio.run(burst())
    assert sim.stats.requests == 12
    assert sim.stats.max_in_flight == 4


def test_errors_leave_without_the_provider_key(simulator, monkeypatch):
    secret = "sk-in-process-secret-0123456789"
    monkeypatch.setenv("INPROC_KEY", secret)
    sim = simulator(SimulatorConfig(failure_rate=1.0, failure_status=400))
    agent = InProcessAgent("m", OpenAIModelSpec.model_validate(remote(sim.base_url, api_key_env="INPROC_KEY")))

    def leaky(err: BadRequest) -> BadRequest:
        return BadRequest(f"provider said: bad key {secret}", model="m", status_code=400)

    async def call():
        backend, _ = agent._ready()
        original = backend.chat

        async def echoing(messages, params):
            try:
                return await original(messages, params)
            except BadRequest as err:
                raise leaky(err) from None

        backend.chat = echoing  # type: ignore[method-assign]  # a provider that echoes the key it was sent
        return await agent.chat(MESSAGES, ChatParams())

    with pytest.raises(BadRequest) as info:
        asyncio.run(call())
    assert secret not in str(info.value) and REDACTED in str(info.value)


def test_retries_happen_and_show_on_the_trace(simulator):
    sim = simulator(SimulatorConfig(models={"flaky": Behaviour(latency_ms=5, failure_rate=0.5, failure_status=503)}, seed=3))
    config = parse_config(
        {
            "models": {"flaky": {**remote(sim.base_url, max_retries=8), "model": "flaky"}},
            "pipelines": {"p": {"kind": "moa", "layers": [["flaky", "flaky", "flaky"]], "aggregator": "flaky"}},
        }
    )
    agents = in_process_agents(config, ["flaky"])
    assert isinstance(agents["flaky"], InProcessAgent)
    result = asyncio.run(build_pipeline(config, "p", agents).run("hi"))
    assert all(c.status == "ok" for c in result.trace.calls)
    assert sim.stats.failures > 0 and result.trace.retries == sim.stats.failures
    assert {r for c in result.trace.calls for r in c.retries} == {"UpstreamError (HTTP 503)"}


def test_the_agent_pickles_as_its_spec_and_builds_its_own_client(simulator):
    sim = simulator(SimulatorConfig(latency_ms=5))
    agent = InProcessAgent("m", OpenAIModelSpec.model_validate(remote(sim.base_url)))
    asyncio.run(agent.chat(MESSAGES, ChatParams(max_tokens=4)))  # a client bound to that (closed) loop
    copy = pickle.loads(pickle.dumps(agent))
    assert copy.spec == agent.spec and copy._backend is None
    completion = asyncio.run(copy.chat(MESSAGES, ChatParams(max_tokens=4)))  # a new loop, a new client
    assert completion.text and sim.stats.requests == 2


def test_a_new_event_loop_gets_a_new_client(simulator):
    sim = simulator(SimulatorConfig(latency_ms=5))
    agent = InProcessAgent("m", OpenAIModelSpec.model_validate(remote(sim.base_url)))
    for _ in range(3):  # each asyncio.run is a new loop; a client of a closed loop would fail
        assert asyncio.run(agent.chat(MESSAGES, ChatParams(max_tokens=4))).text
    assert sim.stats.requests == 3


def test_placement_asks_for_a_deployment():
    with pytest.raises(ConfigError, match=r"pool place a deployment: set hosting: deployment"):
        parse_config(
            {
                "models": {"r": remote("http://127.0.0.1:9/v1", pool="pool_r")},
                "pipelines": {"p": {"kind": "moa", "layers": [["r"]], "aggregator": "r"}},
            }
        )


def test_only_models_with_weights_or_hosting_deployment_get_deployments():
    config = parse_config(
        {
            "models": {
                "near": remote("http://127.0.0.1:9/v1"),
                "own": remote("http://127.0.0.1:9/v1", hosting="deployment", num_replicas=2),
            },
            "pipelines": {"p": {"kind": "moa", "layers": [["near", "own"]], "aggregator": "near"}},
        }
    )
    assert config.deployed_models(["near", "own"]) == ["own"]
    assert [d["name"] for d in deployment_options(config, ["p"])] == ["moa-ingress", "agent-own"]
    app = build_app(config, ["p"])
    assert set(app._bound_deployment.init_kwargs) == {"own"}  # the ingress calls "near" itself
    assert list(in_process_agents(config, ["near", "own"])) == ["near"]


@pytest.mark.anyio
async def test_the_ingress_calls_in_process_models_itself(simulator, monkeypatch):
    """The served app's ingress builds in-process agents from the config: no deployment, the same answers."""
    import httpx

    from moa_ray.serve.ingress import build_service, create_api

    monkeypatch.delenv("MOA_RAY_API_KEYS", raising=False)
    sim = simulator(SimulatorConfig(latency_ms=5, output_tokens=6))
    config = parse_config(
        {"models": {"near": remote(sim.base_url)}, "pipelines": {"p": {"kind": "moa", "layers": [["near", "near"]], "aggregator": "near"}}}
    )
    service, verifier = build_service(config.model_dump(mode="json"), ["p"], {})  # no handles: nothing is deployed
    app = create_api(service, verifier)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://moa.test") as client:
        response = await client.post("/v1/chat/completions", json={"model": "p", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200, response.text
    assert sim.stats.requests == 3
    assert isinstance(service.pipelines["p"].agents["near"], InProcessAgent)


def test_prepare_builds_the_loops_client_before_the_first_call(simulator):
    """Eval workers ready their agents in setup, so the first burst of calls does not wait on the client's build."""
    from moa_ray.pipeline.agents import LocalAgent, prepare_agents

    sim = simulator(SimulatorConfig(latency_ms=1))
    agent = InProcessAgent("m", OpenAIModelSpec.model_validate(remote(sim.base_url)))

    async def prepared_then_called():
        assert agent._backend is None
        prepare_agents([agent, LocalAgent(object())])  # other agents are left as they are
        built = agent._backend
        assert built is not None and sim.stats.requests == 0  # ready, and nothing sent
        await agent.chat(MESSAGES, ChatParams(max_tokens=4))
        assert agent._backend is built  # the first call used it
        await agent.aclose()

    asyncio.run(prepared_then_called())


def test_the_client_closes_with_the_loop_that_opened_it(simulator):
    """Each ``asyncio.run`` (the CLI, the benchmarks) ends its loop without telling the agent: the pool closes there."""
    sim = simulator(SimulatorConfig(latency_ms=1))
    agent = InProcessAgent("m", OpenAIModelSpec.model_validate(remote(sim.base_url)))
    asyncio.run(agent.chat(MESSAGES, ChatParams(max_tokens=4)))
    first = agent._backend
    assert first is not None and first._client.is_closed
    asyncio.run(agent.chat(MESSAGES, ChatParams(max_tokens=4)))  # a new loop gets a new client, closed in its turn
    assert agent._backend is not first and agent._backend._client.is_closed
