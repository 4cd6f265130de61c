"""The endpoint's metrics (issue 21 step 1): recorded through Ray's metrics API, nothing without Ray; and 20 requests
through ``moa-ray serve --metrics-port`` over the simulator, whose scrape gives counters equal to the sums of the
20 traces (calls, tokens, retries, cost, judge fallbacks, early stops) and request histograms counting 20."""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from typing import Any

import httpx
import pytest
import yaml
from metrics_support import Scrape, recorded_names
from serve_support import ServerProcess, sse_events

from bench.simulator import Behaviour, SimulatorConfig, free_port, run_simulator
from moa_ray import metrics
from moa_ray.pipeline.trace import CallRecord, Trace
from moa_ray.runtime import METRICS_PORT_ENV, metrics_port

#: Labels Ray's exporter adds to every series (the process, node, session), and a histogram's bucket bound.
RAY_LABELS = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "JobId", "le"}
PROMPT = "What do the metrics of a mixture of agents count?"
PRICING = {"input_per_mtok": 3.0, "output_per_mtok": 15.0}
#: The SMoA judge keeps 1 response where k is 2 (the fallback fills it) and ends the debate after layer 1.
JUDGE_REPLY = json.dumps({"reasoning": "the first is best", "chosen_responses": [1], "end_debate": True})


# --------------------------------------------------------------------------- without Ray


def test_recording_without_ray_does_nothing(monkeypatch):
    """The CLI's in-process run has no Ray: recording is a no-op that never creates a Ray metric."""
    monkeypatch.setattr(metrics, "_metrics", None)
    trace = Trace(pipeline="p", kind="moa", stopped_at_layer=1)
    record = CallRecord(layer=1, role="proposer", model="m", prompt_tokens=3, completion_tokens=4, retries=["UpstreamError 503"])
    if "ray" in sys.modules:
        monkeypatch.setattr(sys.modules["ray"], "is_initialized", lambda: False)
    metrics.record_call(record)
    metrics.record_trace(trace)
    metrics.record_request("p", 200, 1.0, 0.5)
    assert metrics._metrics is None


def test_scraped_names_carry_rays_namespace_and_histogram_series():
    assert "ray_moa_requests_total" in metrics.SCRAPED_NAMES
    assert {"ray_moa_request_latency_seconds_bucket", "ray_moa_request_latency_seconds_count"} <= metrics.SCRAPED_NAMES
    assert all(name.startswith("ray_moa_") for name in metrics.SCRAPED_NAMES)
    assert all(m.kind in ("counter", "histogram") and (m.kind == "counter") == m.name.endswith("_total") for m in metrics.ALL_METRICS)
    labels = {label for m in metrics.ALL_METRICS for label in m.labels}
    assert labels == {"pipeline", "status", "model", "role", "direction"}  # nothing a client writes


def test_the_metrics_port_comes_from_the_environment():
    assert metrics_port({}) is None and metrics_port({METRICS_PORT_ENV: " 9100 "}) == 9100
    for bad in ("http", "0", "70000"):
        with pytest.raises(Exception, match=METRICS_PORT_ENV):
            metrics_port({METRICS_PORT_ENV: bad})


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["run", "stream", "stream_layers"])
async def test_every_call_of_a_request_is_counted_once_when_it_ends(monkeypatch, mode):
    """The per-call metrics hook (Trace.call_ended) sees each call of the trace exactly once, the streamed
    aggregator's included, and the request's totals once at its end."""
    from serve_support import FakeProvider, fake_layers_config

    from moa_ray.backends.openai_http import OpenAIBackend
    from moa_ray.pipeline import build_pipeline
    from moa_ray.pipeline.agents import LocalAgent
    from moa_ray.pipeline.base import PipelineResult

    ended: list[CallRecord] = []
    finished: list[Trace] = []
    monkeypatch.setattr("moa_ray.pipeline.trace.record_call", ended.append)
    monkeypatch.setattr("moa_ray.pipeline.base.record_trace", finished.append)
    config = fake_layers_config()
    provider = FakeProvider()
    agents = {name: LocalAgent(OpenAIBackend(spec, transport=provider.transport())) for name, spec in config.models.items()}
    pipeline = build_pipeline(config, "moa", agents)
    if mode == "run":
        trace = (await pipeline.run(PROMPT)).trace
    else:
        items = [item async for item in pipeline.stream(PROMPT, call_events=mode == "stream_layers")]
        assert isinstance(items[-1], PipelineResult)
        trace = items[-1].trace
    assert len(trace.calls) == 7 and sorted(map(id, ended)) == sorted(map(id, trace.calls))  # each once
    assert finished == [trace]


# --------------------------------------------------------------------------- a real scrape


def expected_from(traces: list[tuple[str, dict[str, Any]]]) -> dict[str, dict[tuple[str, ...], float]]:
    """What the counters must read: the sums over the traces (pipeline, trace)."""
    out: dict[str, dict[tuple[str, ...], float]] = defaultdict(lambda: defaultdict(float))
    for pipeline, trace in traces:
        for call in trace["calls"]:
            model, role = call["model"], call["role"]
            out["ray_moa_calls_total"][(model, role, call["status"])] += 1
            out["ray_moa_call_latency_seconds_count"][(model, role)] += 1
            for direction in ("prompt", "completion"):
                if call[f"{direction}_tokens"]:
                    out["ray_moa_tokens_total"][(model, role, direction)] += call[f"{direction}_tokens"]
            if call["retries"]:
                out["ray_moa_retries_total"][(model,)] += len(call["retries"])
            if call["fallback_of"]:
                out["ray_moa_fallbacks_total"][(model, role)] += 1
        for model, bucket in trace["accounting"]["by_model"].items():
            if bucket["cost_usd"]:
                out["ray_moa_cost_usd_total"][(model,)] += bucket["cost_usd"]
        fallbacks = sum(1 for layer in trace["layers"] if layer["judge_fallback"])
        if fallbacks:
            out["ray_moa_judge_fallbacks_total"][(pipeline,)] += fallbacks
        if trace["stopped_at_layer"] is not None:
            out["ray_moa_early_stops_total"][(pipeline,)] += 1
    return {name: dict(sums) for name, sums in out.items()}


LABELS = {
    "ray_moa_calls_total": ("model", "role", "status"),
    "ray_moa_call_latency_seconds_count": ("model", "role"),
    "ray_moa_tokens_total": ("model", "role", "direction"),
    "ray_moa_retries_total": ("model",),
    "ray_moa_fallbacks_total": ("model", "role"),
    "ray_moa_cost_usd_total": ("model",),
    "ray_moa_judge_fallbacks_total": ("pipeline",),
    "ray_moa_early_stops_total": ("pipeline",),
}


def post(base_url: str, pipeline: str, stream: bool, request_id: str) -> dict[str, Any]:
    """One request with its trace and its own ``x-request-id``; returns the trace."""
    body: dict[str, Any] = {"model": pipeline, "messages": [{"role": "user", "content": PROMPT}], "moa": {"trace": True}}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120, headers={"x-request-id": request_id})
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == request_id
    if not stream:
        return response.json()["moa"]["trace"]
    (trace,) = [e["moa"]["trace"] for e in sse_events(response.text) if isinstance(e, dict) and (e.get("moa") or {}).get("trace")]
    return trace


@pytest.mark.ray
def test_twenty_requests_scrape_as_the_sums_of_their_traces(tmp_path):
    sim_config = SimulatorConfig(
        latency_ms=30,
        output_tokens=8,
        seed=21,
        models={
            "flaky": Behaviour(latency_ms=30, output_tokens=8, failure_rate=0.4, failure_status=503),
            "dead": Behaviour(latency_ms=5, failure_rate=1.0, failure_status=500),
            "judge": Behaviour(latency_ms=30, reply=JUDGE_REPLY),
        },
    )
    with run_simulator(sim_config) as sim:
        model = {"backend": "openai", "base_url": sim.base_url, "max_retries": 3, "backoff_s": 0.02, "pricing": PRICING}
        config = {
            "models": {
                **{name: {**model, "model": name} for name in ("p1", "p2", "flaky", "agg", "judge")},
                "dead": {**model, "model": "dead", "max_retries": 0, "fallbacks": ["p2"]},  # each call made again on p2
            },
            "pipelines": {
                "moa": {"kind": "moa", "layers": [["p1", "flaky", "dead"]], "aggregator": "agg"},
                "smoa": {"kind": "smoa", "layers": [["p1", "p2", "flaky"]] * 2, "aggregator": "agg", "judge": "judge", "k": 2},
            },
        }
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        port = free_port()
        server = ServerProcess(path, {}, extra_args=("--metrics-port", str(port)))
        try:
            server.start()
            assert f"metrics: http://127.0.0.1:{port}/metrics" in server.log()
            plan = [("moa" if i % 2 else "smoa", i % 3 == 0) for i in range(20)]
            traces = [(pipeline, post(server.base_url, pipeline, stream, f"metrics-test-{i}")) for i, (pipeline, stream) in enumerate(plan)]
            expected = expected_from(traces)
            scrape = _scrape_until(f"http://127.0.0.1:{port}/metrics", expected, deadline_s=120)
            access = _access_lines(server, len(plan))
        finally:
            server.stop()
            server.cleanup()

    # requests: all 20 counted as 200, in the latency histogram, and the streamed ones in time to first token
    assert scrape.sums("ray_moa_requests_total", "pipeline", "status") == {("moa", "200"): 10, ("smoa", "200"): 10}
    assert scrape.total("ray_moa_request_latency_seconds_count") == 20
    assert scrape.sums("ray_moa_request_latency_seconds_count", "pipeline") == {("moa",): 10, ("smoa",): 10}
    assert scrape.total("ray_moa_time_to_first_token_seconds_count") == sum(stream for _, stream in plan) == 7
    # calls, tokens, retries, cost, judge fallbacks and early stops: the traces' sums exactly (cost: float sums)
    for name, sums in expected.items():
        got = scrape.sums(name, *LABELS[name])
        if name == "ray_moa_cost_usd_total":
            assert got.keys() == sums.keys() and all(got[k] == pytest.approx(v, rel=1e-9) for k, v in sums.items())
        else:
            assert got == sums, name
    assert expected["ray_moa_retries_total"][("flaky",)] > 0  # the scrape did see retries
    assert expected["ray_moa_fallbacks_total"] == {("p2", "proposer"): 10}  # and fallbacks
    assert expected["ray_moa_judge_fallbacks_total"][("smoa",)] == 10 == expected["ray_moa_early_stops_total"][("smoa",)]
    assert sum(expected["ray_moa_calls_total"].values()) == sum(len(t["calls"]) for _, t in traces)
    # labels: the declared ones only (no prompt, key or request id), beside Ray's own
    declared = {m.scraped: set(m.labels) for m in metrics.ALL_METRICS}
    for sample in scrape.samples:
        base = next((n for n in declared if sample.name.startswith(n)), None)
        if base is not None:
            assert {k for k in sample.labels if not k.startswith("otel_")} - RAY_LABELS == declared[base], sample
    assert PROMPT not in json.dumps([s.labels for s in scrape.samples])
    # the access log: one line per request in the ingress replica's log, its numbers the trace's, no text
    assert sorted(access) == sorted(f"metrics-test-{i}" for i in range(len(plan))), sorted(access)
    for i, (pipeline, trace) in enumerate(traces):
        line = access[f"metrics-test-{i}"]
        assert (line["pipeline"], line["status"], line["stream"]) == (pipeline, 200, plan[i][1])
        assert (line["calls"], line["prompt_tokens"]) == (len(trace["calls"]), trace["tokens"]["prompt_tokens"])
        assert line["cost_usd"] == pytest.approx(trace["accounting"]["totals"]["cost_usd"], rel=1e-9)
    assert PROMPT not in json.dumps(access)
    # the dashboard may query only names a scrape showed: this one shows every moa-ray name recorded
    assert recorded_names("moa-ray") <= scrape.names, recorded_names("moa-ray") - scrape.names
    assert recorded_names("moa-ray") == metrics.SCRAPED_NAMES


def _access_lines(server: ServerProcess, count: int) -> dict[str, dict[str, Any]]:
    """The ingress replica's access-log lines by request id (from the Ray session's log files)."""
    lines: dict[str, dict[str, Any]] = {}
    for path in server.files_containing('"request_id":"metrics-test-'):
        for line in open(path, errors="replace"):
            start = line.find('{"request_id":"metrics-test-')
            if start >= 0:
                record = json.JSONDecoder().raw_decode(line[start:])[0]
                lines[record["request_id"]] = record
    return lines


def _scrape_until(url: str, expected: dict[str, dict[tuple[str, ...], float]], deadline_s: float) -> Scrape:
    """Scrape until the request count reaches 20 and every expected counter matches (Ray exports every few
    seconds), or the deadline passes; the last scrape either way."""
    until = time.monotonic() + deadline_s
    while True:
        scrape = Scrape.of(url)
        done = scrape.total("ray_moa_requests_total") >= 20 and all(
            scrape.sums(name, *LABELS[name]) == pytest.approx(sums, rel=1e-9) for name, sums in expected.items()
        )
        if done or time.monotonic() > until:
            return scrape
        time.sleep(1)
