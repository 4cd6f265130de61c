"""The access log (issue 21 step 3), in process without Ray: one JSON line per API request with its request id (also
the ``x-request-id`` header), pipeline, status, latency, calls, tokens and cost, never a prompt, an answer or a key;
switched off by ``server.access_log: false``. The request metric is counted once per completion request."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pytest
from serve_support import ANSWER_MARK, FakeProvider, fake_api, fake_layers_config, sse_events

from bench.simulator import Behaviour, SimulatorConfig
from moa_ray.backends import create_backend
from moa_ray.backends.openai_http import OpenAIBackend
from moa_ray.pipeline import build_pipeline
from moa_ray.pipeline.agents import LocalAgent
from moa_ray.serve import access_log
from moa_ray.serve.auth import KeyVerifier, Redactor
from moa_ray.serve.ingress import create_api
from moa_ray.serve.service import ChatService

pytestmark = pytest.mark.anyio

PROMPT = "a prompt that must never reach the access log"
USER = [{"role": "user", "content": PROMPT}]
PRICING = {"input_per_mtok": 3.0, "output_per_mtok": 15.0}


@pytest.fixture
def lines(caplog):
    """The access log's records, parsed (listening on its own logger: Ray Serve stops "ray.serve" propagating)."""
    caplog.set_level(logging.INFO, logger=access_log.log.name)
    access_log.log.addHandler(caplog.handler)
    yield lambda: [json.loads(r.getMessage()) for r in caplog.records if r.name == access_log.log.name]
    access_log.log.removeHandler(caplog.handler)


@pytest.fixture
def counted(monkeypatch):
    """The request metrics the middleware records: (pipeline, status, latency_s, ttft_s) each."""
    seen: list[tuple[Any, ...]] = []
    monkeypatch.setattr(access_log, "record_request", lambda *args: seen.append(args))
    return seen


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://moa.test", timeout=30)


async def test_a_completion_gets_one_line_with_its_id_calls_tokens_and_cost_and_no_text(lines, counted):
    config = fake_layers_config(pricing=PRICING)
    async with client(fake_api(config, FakeProvider())) as c:
        response = await c.post("/v1/chat/completions", json={"model": "moa", "messages": USER, "moa": {"trace": True}})
    assert response.status_code == 200, response.text
    request_id = response.headers["x-request-id"]
    assert len(request_id) == 32 and int(request_id, 16) >= 0
    trace = response.json()["moa"]["trace"]
    (line,) = lines()
    assert line["request_id"] == request_id and (line["method"], line["path"]) == ("POST", "/v1/chat/completions")
    assert (line["pipeline"], line["status"], line["stream"], line["ttft_s"]) == ("moa", 200, False, None)
    assert line["calls"] == len(trace["calls"]) == 7
    assert line["prompt_tokens"] == trace["tokens"]["prompt_tokens"] == response.json()["usage"]["prompt_tokens"]
    assert line["completion_tokens"] == trace["tokens"]["completion_tokens"]
    assert line["cost_usd"] == trace["accounting"]["totals"]["cost_usd"] > 0
    assert 0 < line["latency_s"] < 30
    raw = json.dumps(line)
    assert PROMPT not in raw and ANSWER_MARK not in raw
    ((pipeline, status, latency_s, ttft_s),) = counted
    assert (pipeline, status, ttft_s) == ("moa", 200, None) and latency_s > 0


async def test_a_streamed_answer_logs_its_time_to_first_token(lines, counted):
    async with client(fake_api(fake_layers_config(), FakeProvider())) as c:
        response = await c.post("/v1/chat/completions", json={"model": "moa", "messages": USER, "stream": True})
    assert response.status_code == 200 and sse_events(response.text)[-1] == "[DONE]"
    (line,) = lines()
    assert line["stream"] is True and line["status"] == 200 and line["calls"] == 7
    assert 0 < line["ttft_s"] <= line["latency_s"]
    ((pipeline, status, _, ttft_s),) = counted
    assert (pipeline, status) == ("moa", 200) and ttft_s == pytest.approx(line["ttft_s"], abs=1e-3)


@pytest.mark.parametrize(
    ("sent", "kept"), [("req-2026.12.04:abc_1", True), ("has spaces", False), ("x" * 129, False), ('{"json":1}', False)]
)
async def test_a_plain_client_request_id_is_kept_and_any_other_replaced(lines, counted, sent, kept):
    async with client(fake_api(fake_layers_config(), FakeProvider())) as c:
        response = await c.get("/v1/models", headers={"x-request-id": sent})
    assert response.status_code == 200
    assert (response.headers["x-request-id"] == sent) is kept
    (line,) = lines()
    assert line["request_id"] == response.headers["x-request-id"] and line["path"] == "/v1/models"
    assert counted == []  # listing models is not a completion request


async def test_a_refused_request_is_logged_without_a_pipeline_the_client_named(lines, counted):
    async with client(fake_api(fake_layers_config(), FakeProvider())) as c:
        response = await c.post("/v1/chat/completions", json={"model": "no-such-pipeline", "messages": USER})
    assert response.status_code == 404 and response.headers["x-request-id"]
    (line,) = lines()
    assert (line["pipeline"], line["status"], line["calls"], line["cost_usd"]) == (None, 404, 0, None)
    assert "no-such-pipeline" not in json.dumps(line)
    assert [(p, s) for p, s, *_ in counted] == [(None, 404)]


async def test_an_error_inside_a_started_stream_is_logged_with_its_status(lines, counted, simulator):
    sim = simulator(SimulatorConfig(latency_ms=10, models={"agg": Behaviour(failure_rate=1.0, failure_status=500)}))
    config = fake_layers_config(base_url=sim.base_url)  # the proposers answer, the aggregator fails
    agents = {name: LocalAgent(create_backend(spec)) for name, spec in config.models.items()}
    pipelines = {name: build_pipeline(config, name, agents) for name in config.pipelines}
    app = create_api(ChatService(config, pipelines, Redactor.for_config(config)), KeyVerifier(()))
    body = {"model": "moa", "messages": USER, "stream": True, "moa": {"stream_layers": True}}
    async with client(app) as c:
        response = await c.post("/v1/chat/completions", json=body)
    assert response.status_code == 200  # the stream had started with the first call's event
    assert any(isinstance(e, dict) and "error" in e for e in sse_events(response.text))
    (line,) = lines()
    assert line["status"] == 502 and line["calls"] == 7
    assert [(p, s) for p, s, *_ in counted] == [("moa", 502)]


async def test_the_access_log_can_be_switched_off(lines, counted):
    config = fake_layers_config(server={"access_log": False})
    async with client(fake_api(config, FakeProvider())) as c:
        response = await c.post("/v1/chat/completions", json={"model": "moa", "messages": USER})
    assert response.status_code == 200 and response.headers["x-request-id"]
    assert lines() == []
    assert [(p, s) for p, s, *_ in counted] == [("moa", 200)]  # the metrics do not depend on the log


async def test_health_probes_are_not_logged(lines, counted):
    async with client(fake_api(fake_layers_config(), FakeProvider())) as c:
        response = await c.get("/health")
    assert response.status_code == 200 and "x-request-id" not in response.headers
    assert lines() == [] and counted == []


async def test_in_a_serve_replica_the_log_uses_serves_request_id_and_leaves_the_header_to_serve(lines, counted):
    """Ray Serve puts its request id (the client's x-request-id, else a fresh one) in the request's headers and
    returns it itself: the app adds no second header, and logs that id as it is."""
    config = fake_layers_config()
    provider = FakeProvider()
    agents = {name: LocalAgent(OpenAIBackend(spec, transport=provider.transport())) for name, spec in config.models.items()}
    pipelines = {name: build_pipeline(config, name, agents) for name in config.pipelines}
    app = create_api(ChatService(config, pipelines, Redactor.for_config(config)), KeyVerifier(()), serve_request_ids=True)
    async with client(app) as c:
        response = await c.post("/v1/chat/completions", json={"model": "moa", "messages": USER}, headers={"x-request-id": "serve id 7"})
    assert response.status_code == 200 and "x-request-id" not in response.headers
    (line,) = lines()
    assert line["request_id"] == "serve id 7"
