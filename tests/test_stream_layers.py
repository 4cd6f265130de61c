"""Layers live on the stream (issue 24, step 2): ``"moa": {"stream_layers": true}`` sends each call before the final
one as an event the moment it ends, before the aggregator's deltas, in a form the official ``openai`` client parses;
a client that does not ask gets the stream it always got; ``moa-ray run --show-layers`` shows the same live.
No Ray: the endpoint's app over in-process agents calling a fake provider, through httpx's ASGI transport, or
served by uvicorn on loopback where the events' arrival times matter."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
import pytest
from click.testing import CliRunner
from serve_support import CLI_REPLIES, FakeProvider, cli_sim_config, fake_api, fake_layers_config, fake_text, serve_app, sse_events

from moa_ray.cli import main
from moa_ray.serve.service import CALL_EVENT_FIELDS

USER = [{"role": "user", "content": "What is a mixture of agents?"}]
LAYERED = {"model": "moa", "messages": USER, "stream": True, "moa": {"stream_layers": True}}


def is_call_event(event: object) -> bool:
    return isinstance(event, dict) and isinstance(event.get("moa"), dict) and event["moa"].get("event") == "call"


def content_of(event: object) -> str:
    if not isinstance(event, dict) or not event.get("choices"):
        return ""
    return event["choices"][0]["delta"].get("content") or ""


def asgi_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://moa.test", timeout=30)


# --------------------------------------------------------------------------- the events


@pytest.mark.anyio
@pytest.mark.parametrize("coalesce_ms", [0, 20])
async def test_one_event_per_proposer_before_the_first_aggregator_delta(coalesce_ms):
    app = fake_api(fake_layers_config(server={"stream_coalesce_ms": coalesce_ms}), FakeProvider())
    async with asgi_client(app) as client:
        response = await client.post("/v1/chat/completions", json=LAYERED)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    calls = [e for e in chunks if is_call_event(e)]
    first_delta = next(i for i, e in enumerate(chunks) if content_of(e))
    assert len(calls) == 6 and all(chunks.index(e) < first_delta for e in calls)
    assert sorted((e["moa"]["call"]["layer"], e["moa"]["call"]["index"]) for e in calls) == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    for event in calls:
        call = event["moa"]["call"]
        assert set(call) == set(CALL_EVENT_FIELDS)
        assert call["role"] == "proposer" and call["status"] == "ok" and call["error"] is None and call["reused"] is False
        assert call["text"] == fake_text(call["model"], 0 if call["layer"] == 1 else 3)
        assert call["model"] == f"m{call['index'] + 1}" and call["completion_tokens"] > 0 and call["latency_s"] > 0
        assert event["object"] == "chat.completion.chunk" and event["choices"] == []
    layers = [e["moa"]["call"]["layer"] for e in calls]
    assert layers == sorted(layers)  # every layer-1 call ended before layer 2 began
    assert {e["id"] for e in chunks} == {chunks[0]["id"]} and {e["model"] for e in chunks} == {"moa"}
    assert {e["created"] for e in chunks} == {chunks[0]["created"]}
    assert "".join(content_of(e) for e in chunks) == fake_text("agg", 3)
    assert sum(1 for e in chunks if e.get("choices") and e["choices"][0].get("finish_reason") == "stop") == 1


@pytest.mark.anyio
async def test_the_openai_client_parses_a_stream_with_layer_events():
    provider = FakeProvider()
    app = fake_api(fake_layers_config(), provider)
    http = asgi_client(app)
    async with openai.AsyncOpenAI(base_url="http://moa.test/v1", api_key="unused", http_client=http, max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="moa", messages=USER, stream=True, stream_options={"include_usage": True}, extra_body={"moa": {"stream_layers": True}}
        )
        chunks = [c async for c in stream]
        # the SDK's accumulating helper too (what most apps use): events with no choices are no trouble to it
        async with client.chat.completions.stream(model="moa", messages=USER, extra_body={"moa": {"stream_layers": True}}) as helper:
            async for _ in helper:
                pass
            final = await helper.get_final_completion()
    events = [c for c in chunks if (c.model_extra or {}).get("moa", {}).get("event") == "call"]
    assert len(events) == 6 and all(c.choices == [] for c in events)
    assert {c.model_extra["moa"]["call"]["text"] for c in events[:3]} == {fake_text(m, 0) for m in ("m1", "m2", "m3")}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == fake_text("agg", 3)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert final.choices[0].message.content == fake_text("agg", 3)


@pytest.mark.anyio
async def test_a_client_that_does_not_ask_gets_the_stream_it_always_got(monkeypatch):
    """No event without choices but the usage one, nothing but deltas before the finish; the pipeline is not even
    asked for call events."""
    from moa_ray.pipeline.base import Pipeline

    asked: list[bool] = []
    original = Pipeline.stream

    def spy(self, *args, **kwargs):
        asked.append(kwargs.get("call_events", False))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "stream", spy)
    async with asgi_client(fake_api(fake_layers_config(), FakeProvider())) as client:
        plain = await client.post("/v1/chat/completions", json={**LAYERED, "moa": {}, "stream_options": {"include_usage": True}})
        layered = await client.post("/v1/chat/completions", json=LAYERED)
    assert asked == [False, True]
    chunks = sse_events(plain.text)[:-1]
    assert not any("moa" in e for e in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["choices"] for e in chunks[:-1]) and chunks[-1]["choices"] == [] and "usage" in chunks[-1]
    assert "".join(content_of(e) for e in chunks) == "".join(content_of(e) for e in sse_events(layered.text)[:-1])


@pytest.mark.anyio
async def test_stream_layers_on_a_plain_request_is_a_clear_400_before_any_call():
    provider = FakeProvider()
    async with asgi_client(fake_api(fake_layers_config(), provider)) as client:
        response = await client.post("/v1/chat/completions", json={**LAYERED, "stream": False})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "moa.stream_layers" and error["code"] == "invalid_request"
    assert "stream: true" in error["message"] and '"trace": "full"' in error["message"]
    assert provider.calls == []


@pytest.mark.anyio
async def test_a_failure_after_the_first_event_is_an_error_event_in_the_200_stream():
    """An opted-in stream starts at its first call event; the aggregator failing afterwards is reported in-stream."""
    config = fake_layers_config(layers=1)
    provider = FakeProvider()
    original = provider.handle

    async def agg_fails(request: httpx.Request) -> httpx.Response:
        if b'"agg"' in request.content:
            return httpx.Response(500, json={"error": {"message": "down"}})
        return await original(request)

    provider.handle = agg_fails  # type: ignore[method-assign]
    async with asgi_client(fake_api(config, provider)) as client:
        response = await client.post("/v1/chat/completions", json=LAYERED)
    assert response.status_code == 200
    events = sse_events(response.text)
    assert sum(1 for e in events if is_call_event(e)) == 3
    assert events[-1] == "[DONE]" and "aggregator" in events[-2]["error"]["message"]


# --------------------------------------------------------------------------- timing, over a real server

DELAY_S = 0.5  # each call of the slow provider


def test_layer_one_events_arrive_after_one_layers_latency_not_two():
    """Each event is sent the moment its call ends: the layer-1 events arrive while layer 2 is still running.

    Times are the client's, from before it sent the request, so they can only overstate the server's; they are
    compared with the trace's own call timings (from the pipeline's start), with a layer's worth of slack."""
    provider = FakeProvider(delay_s=DELAY_S)
    app = fake_api(fake_layers_config(server={"stream_coalesce_ms": 0}), provider)
    arrivals: list[tuple[float, dict | str]] = []
    with serve_app(app) as base_url, httpx.Client(base_url=base_url, timeout=30) as client:
        start = time.perf_counter()
        body = {**LAYERED, "moa": {"stream_layers": True, "trace": "summary"}}
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    arrivals.append((time.perf_counter() - start, sse_events(line + "\n\n")[0]))
    calls = [(t, e["moa"]["call"]) for t, e in arrivals if is_call_event(e)]
    final = next(e for _, e in arrivals if isinstance(e, dict) and e.get("choices") and e["choices"][0].get("finish_reason"))
    trace = final["moa"]["trace"]
    ends = {(c["layer"], c["index"]): c["start_s"] + c["latency_s"] for c in trace["calls"] if c["role"] == "proposer"}
    layer2_first_end = min(end for (layer, _), end in ends.items() if layer == 2)
    first_delta_at = next(t for t, e in arrivals if content_of(e))
    assert len(calls) == 6
    layer1 = [t for t, c in calls if c["layer"] == 1]
    assert len(layer1) == 3
    assert max(layer1) < layer2_first_end  # after one layer's latency, not two
    assert min(layer1) >= DELAY_S * 0.9  # and not before its calls could have ended
    assert all(t < first_delta_at for t, _ in calls)
    assert max(t for t, c in calls if c["layer"] == 2) < first_delta_at


# --------------------------------------------------------------------------- the CLI, live


@pytest.fixture
def sim_file(simulator, tmp_path, monkeypatch) -> Path:
    return cli_sim_config(simulator, tmp_path, monkeypatch)


def test_run_show_layers_prints_each_proposers_answer_then_the_answer(sim_file: Path):
    result = CliRunner(env={"COLUMNS": "200"}).invoke(
        main, ["run", "Why is the sky blue?", "--config", str(sim_file), "--pipeline", "sparse", "--show-layers"]
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == CLI_REPLIES["sim/agg"]
    err = result.stderr
    for i, model in enumerate(("p1", "p2", "p3"), start=1):
        assert f"layer 1 · proposer {i} · {model}" in err and CLI_REPLIES[f"sim/{model}"] in err
    assert "layer 1 · judge · judge" in err and CLI_REPLIES["sim/judge"] in err  # the judge's raw verdict, live too
    assert err.count("layer 1 · proposer") == 3  # shown once each, not again after the answer
    assert err.index(CLI_REPLIES["sim/judge"]) < err.index("sparse (smoa)")  # then the usual tables
    assert "ok · " in err and " tok · " in err


def test_run_show_layers_with_json_keeps_stdout_one_object(sim_file: Path):
    result = CliRunner(env={"COLUMNS": "200"}).invoke(
        main, ["run", "Why?", "--config", str(sim_file), "--pipeline", "tiny", "--show-layers", "--json", "--trace", "full"]
    )
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert [c["text"] for c in out["trace"]["calls"]][:3] == [CLI_REPLIES[f"sim/p{i}"] for i in (1, 2, 3)]
    assert CLI_REPLIES["sim/p2"] in result.stderr  # the live view went to stderr


def test_show_layers_prints_while_the_pipeline_runs(monkeypatch):
    """The CLI's live view prints each call as its event comes, not after the run: printed before the stream ends."""
    from moa_ray.cli.main import _run_live
    from moa_ray.cli.render import err_console
    from moa_ray.pipeline.base import CallEvent, PipelineResult
    from moa_ray.pipeline.trace import CallRecord, Trace

    printed: list[str] = []
    monkeypatch.setattr(err_console, "print", lambda view, *a, **k: printed.append(str(getattr(view, "title", view))))

    class Scripted:
        name = "scripted"

        async def stream(self, *args, **kwargs):
            assert kwargs["call_events"] is True
            yield CallEvent(CallRecord(layer=1, index=0, role="proposer", model="m1", text="first"))
            await asyncio.sleep(0)
            assert printed == ["layer 1 · proposer 1 · m1"]  # shown before the next item was even asked for
            yield PipelineResult(answer="done", trace=Trace(pipeline="scripted", kind="moa"))

    result = asyncio.run(_run_live(Scripted(), "hi", None, 5.0))  # type: ignore[arg-type]
    assert result.answer == "done" and printed == ["layer 1 · proposer 1 · m1"]
