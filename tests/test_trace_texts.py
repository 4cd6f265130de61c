"""Every call's text in the trace (issue 24, step 1): kept by the pipeline, shown only in a ``full`` trace, through
``Trace.to_json_dict``, the endpoint's ``"moa": {"trace": "full"}`` and ``moa-ray run --trace full``; redacted of
provider keys; never in a summary trace, an unasked response, or a log. No Ray: in-process agents over a fake
provider (tests/serve_support.py) or the LLM simulator."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import httpx
import openai
import pytest
from click.testing import CliRunner
from serve_support import CLI_REPLIES, FakeProvider, cli_sim_config, fake_api, fake_layers_config, fake_text, sse_events

from moa_ray.backends.openai_http import OpenAIBackend
from moa_ray.cli import main
from moa_ray.pipeline import build_pipeline
from moa_ray.pipeline.agents import LocalAgent
from moa_ray.redaction import REDACTED

USER = [{"role": "user", "content": "What is a mixture of agents?"}]
PROPOSERS = ("m1", "m2", "m3")
#: (layer, index, role) -> text of the 2-layer x 3 MoA over FakeProvider: layer 1 sees no answer, later calls three.
EXPECTED = {
    **{(1, i, "proposer"): fake_text(m, 0) for i, m in enumerate(PROPOSERS)},
    **{(2, i, "proposer"): fake_text(m, 3) for i, m in enumerate(PROPOSERS)},
    (3, 0, "aggregator"): fake_text("agg", 3),
}


def texts_by_call(trace: dict) -> dict[tuple[int, int, str], str]:
    return {(c["layer"], c["index"], c["role"]): c["text"] for c in trace["calls"]}


def fake_pipeline(config, provider: FakeProvider):
    agents = {name: LocalAgent(OpenAIBackend(spec, transport=provider.transport())) for name, spec in config.models.items()}
    return build_pipeline(config, "moa", agents)


def asgi_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://moa.test", timeout=30)


# --------------------------------------------------------------------------- the trace


def test_full_trace_holds_all_seven_texts_in_their_layer_and_index_and_the_summary_none():
    result = asyncio.run(fake_pipeline(fake_layers_config(), FakeProvider()).run(USER))
    assert len(set(EXPECTED.values())) == 7  # the fake provider answered every call with a text of its own
    full = result.trace.to_json_dict("full")
    assert texts_by_call(full) == EXPECTED
    assert full["calls"][-1]["text"] == result.answer
    summary = result.trace.to_json_dict()
    assert summary == result.trace.to_json_dict("summary")
    assert len(summary["calls"]) == 7 and all("text" not in c for c in summary["calls"])
    assert not any(text in json.dumps(summary) for text in EXPECTED.values())
    assert {k: v for k, v in full.items() if k != "calls"} == {k: v for k, v in summary.items() if k != "calls"}


# --------------------------------------------------------------------------- the endpoint


@pytest.mark.anyio
async def test_endpoint_full_trace_has_every_text_summary_and_true_none_and_unasked_no_trace():
    provider = FakeProvider()
    app = fake_api(fake_layers_config(), provider)
    async with openai.AsyncOpenAI(base_url="http://moa.test/v1", api_key="unused", http_client=asgi_client(app), max_retries=0) as client:
        full = await client.chat.completions.create(model="moa", messages=USER, extra_body={"moa": {"trace": "full"}})
        summary = await client.chat.completions.create(model="moa", messages=USER, extra_body={"moa": {"trace": "summary"}})
        legacy = await client.chat.completions.create(model="moa", messages=USER, extra_body={"moa": {"trace": True}})
        unasked = await client.chat.completions.create(model="moa", messages=USER)
        stream = await client.chat.completions.create(model="moa", messages=USER, stream=True, extra_body={"moa": {"trace": "full"}})
        chunks = [c async for c in stream]
    assert texts_by_call(full.model_extra["moa"]["trace"]) == EXPECTED
    assert full.choices[0].message.content == EXPECTED[(3, 0, "aggregator")]
    for reply in (summary, legacy):
        trace = reply.model_extra["moa"]["trace"]
        assert len(trace["calls"]) == 7 and all("text" not in c for c in trace["calls"])
    assert summary.model_extra["moa"]["trace"].keys() == legacy.model_extra["moa"]["trace"].keys()
    assert "moa" not in (unasked.model_extra or {})
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and texts_by_call(final[0].model_extra["moa"]["trace"]) == EXPECTED
    assert not any((c.model_extra or {}).get("moa", {}).get("event") for c in chunks)  # no layer events unless asked


@pytest.mark.anyio
@pytest.mark.parametrize("value", ["verbose", 1, "true", ["full"]])
async def test_a_bad_trace_level_is_a_400_naming_the_field(value):
    provider = FakeProvider()
    async with asgi_client(fake_api(fake_layers_config(), provider)) as client:
        response = await client.post("/v1/chat/completions", json={"model": "moa", "messages": USER, "moa": {"trace": value}})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "moa.trace" and '"full"' in error["message"]
    assert provider.calls == []


@pytest.mark.anyio
async def test_texts_never_reach_the_log(caplog):
    caplog.set_level(logging.DEBUG)
    # the service logs under "ray.serve", which Ray Serve stops from propagating once any test has imported it:
    # listen on that logger itself, at its own level (a quiet init_ray sets "ray.serve" to WARNING), so the check does
    # not depend on which tests ran before
    service_log = logging.getLogger("ray.serve.moa_ray.ingress")
    service_log.addHandler(caplog.handler)
    level = service_log.level
    service_log.setLevel(logging.DEBUG)
    try:
        async with asgi_client(fake_api(fake_layers_config(), FakeProvider())) as client:
            for stream in (False, True):
                body = {"model": "moa", "messages": USER, "stream": stream, "moa": {"trace": "full", "stream_layers": stream}}
                assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    finally:
        service_log.removeHandler(caplog.handler)
        service_log.setLevel(level)
    assert caplog.records  # the service did log its requests
    assert not any(text in caplog.text for text in EXPECTED.values())


# --------------------------------------------------------------------------- provider keys


SECRET = "sk-test-secret-123\n"  # as read from a secret file: a trailing newline


@pytest.mark.anyio
async def test_a_provider_key_echoed_by_the_provider_never_appears_in_texts_nor_layer_events(monkeypatch):
    monkeypatch.setenv("FAKE_PROVIDER_KEY", SECRET)
    config = fake_layers_config(api_key_env="FAKE_PROVIDER_KEY")
    provider = FakeProvider(echo_key=True)

    result = await fake_pipeline(config, provider).run(USER)
    full = result.trace.to_json_dict("full")
    assert all(REDACTED in c["text"] for c in full["calls"])  # the echo was there, and was redacted

    async with asgi_client(fake_api(config, provider)) as client:
        plain = await client.post("/v1/chat/completions", json={"model": "moa", "messages": USER, "moa": {"trace": "full"}})
        streamed = await client.post(
            "/v1/chat/completions",
            json={"model": "moa", "messages": USER, "stream": True, "moa": {"trace": "full", "stream_layers": True}},
        )
    events = [e for e in sse_events(streamed.text) if isinstance(e, dict) and e.get("moa", {}).get("event") == "call"]
    assert len(events) == 6 and all(REDACTED in e["moa"]["call"]["text"] for e in events)
    assert all(REDACTED in c["text"] for c in plain.json()["moa"]["trace"]["calls"][:-1])
    final = next(e for e in sse_events(streamed.text) if isinstance(e, dict) and e.get("choices") and e["choices"][0]["finish_reason"])
    # the texts: the trace's and the layer events' (the answer itself is the model's, sent as it came)
    for shown in (json.dumps(full), json.dumps(plain.json()["moa"]), json.dumps(events), json.dumps(final["moa"])):
        for form in (SECRET, SECRET.strip(), repr(SECRET)[1:-1]):
            assert form not in shown


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def sim_file(simulator, tmp_path, monkeypatch) -> Path:
    return cli_sim_config(simulator, tmp_path, monkeypatch)


def invoke(*args: str):
    return CliRunner(env={"COLUMNS": "200"}).invoke(main, list(args))


def test_run_trace_full_json_prints_every_calls_text(sim_file):
    result = invoke("run", "Why is the sky blue?", "--config", str(sim_file), "--pipeline", "tiny", "--trace", "full", "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert [(c["layer"], c["index"], c["role"], c["model"], c["text"]) for c in out["trace"]["calls"]] == [
        (1, 0, "proposer", "p1", CLI_REPLIES["sim/p1"]),
        (1, 1, "proposer", "p2", CLI_REPLIES["sim/p2"]),
        (1, 2, "proposer", "p3", CLI_REPLIES["sim/p3"]),
        (2, 0, "aggregator", "agg", CLI_REPLIES["sim/agg"]),
    ]
    assert out["answer"] == CLI_REPLIES["sim/agg"]


def test_run_json_alone_and_trace_summary_carry_no_text(sim_file):
    for extra in ((), ("--trace", "summary")):
        result = invoke("run", "Why is the sky blue?", "--config", str(sim_file), "--pipeline", "tiny", "--json", *extra)
        assert result.exit_code == 0, result.stderr
        out = json.loads(result.stdout)
        assert set(out) == {"answer", "pipeline", "trace"}
        assert len(out["trace"]["calls"]) == 4 and all("text" not in c for c in out["trace"]["calls"])
        assert CLI_REPLIES["sim/p1"] not in result.stdout


def test_run_trace_full_without_json_shows_each_earlier_call_after_the_answer(sim_file):
    result = invoke("run", "Why is the sky blue?", "--config", str(sim_file), "--pipeline", "sparse", "--trace", "full")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == CLI_REPLIES["sim/agg"]  # only the answer on stdout
    for i, model in enumerate(("p1", "p2", "p3"), start=1):
        assert f"layer 1 · proposer {i} · {model}" in result.stderr and CLI_REPLIES[f"sim/{model}"] in result.stderr
    assert "layer 1 · judge · judge" in result.stderr and CLI_REPLIES["sim/judge"] in result.stderr  # the raw verdict
    assert "kept by the judge" in result.stderr and "dropped by the judge" in result.stderr
    assert "aggregator · agg" not in result.stderr  # the answer is not repeated
    assert result.stderr.index(CLI_REPLIES["sim/judge"]) < result.stderr.index("sparse (smoa)")  # then the usual tables
