"""The MoA driver with in-process test-double agents: parallel layers, quorum and deadline, failures, prompts, trace.

The agents here are test doubles of the Agent protocol (no model, no Ray): they sleep,
fail or record what they were sent, so the driver's own behaviour is what is measured.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from pipeline_support import ended_s, waves

from moa_ray.chat import ChatMessage, ChatParams, Completion, StreamChunk, Usage
from moa_ray.config import LayerSpec, ProposerSpec, parse_config
from moa_ray.errors import AggregatorFailed, LayerFailed, UpstreamError
from moa_ray.pipeline import build_pipeline
from moa_ray.pipeline.base import PipelineResult
from moa_ray.pipeline.moa import MoAPipeline
from moa_ray.pipeline.trace import Trace
from moa_ray.prompts import AGGREGATE_AND_SYNTHESIZE

#: A call's delay: the wave tests compare starts with ends (the trace's own timings), so a short one holds as well
DELAY = 0.1
#: A straggler's delay: far past any deadline here, so a test that waited for one would take this long.
SLOW_S = 30.0


class SleepyAgent:
    """A test double that answers after ``delay`` seconds, or raises ``error``; records every call."""

    def __init__(self, name: str, delay: float = DELAY, *, error: Exception | None = None, text: str | None = None) -> None:
        self.name = name
        self.delay = delay
        self.error = error
        self.text = text
        self.calls: list[tuple[list[ChatMessage], ChatParams]] = []
        self.cancelled = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.shared: dict[str, int] | None = None  # concurrency across agents, when given

    def _enter(self) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if self.shared is not None:
            self.shared["now"] += 1
            self.shared["max"] = max(self.shared["max"], self.shared["now"])

    def _leave(self) -> None:
        self.in_flight -= 1
        if self.shared is not None:
            self.shared["now"] -= 1

    async def chat(self, messages: list[ChatMessage], params: ChatParams) -> Completion:
        self.calls.append((messages, params))
        self._enter()
        start = time.perf_counter()
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self._leave()
        if self.error is not None:
            raise self.error
        n = len(self.calls)
        text = self.text or f"{self.name} answer {n}"
        return Completion(
            text=text,
            usage=Usage(prompt_tokens=10 * len(messages), completion_tokens=len(text.split())),
            latency_s=time.perf_counter() - start,
            finish_reason="stop",
            model=self.name,
        )

    async def stream(self, messages: list[ChatMessage], params: ChatParams):
        completion = await self.chat(messages, params)
        for word in completion.text.split(" "):
            yield StreamChunk(delta=word + " ")
        yield StreamChunk(completion=completion)


def moa_config(layers: list[list[Any]], aggregator: Any = "agg", **pipeline: Any):
    names = {p if isinstance(p, str) else p["model"] for layer in layers for p in layer} | {
        aggregator if isinstance(aggregator, str) else aggregator["model"]
    }
    models = {n: {"backend": "openai", "model": n, "base_url": "http://127.0.0.1:9/v1"} for n in sorted(names)}
    return parse_config({"models": models, "pipelines": {"p": {"kind": "moa", "layers": layers, "aggregator": aggregator, **pipeline}}})


def run(coro):
    return asyncio.run(coro)


# --------------------------------------------------------------------------- parallelism


@pytest.mark.parametrize("n", [3, 6])
def test_a_layer_takes_one_agents_time_not_n(n):
    names = [f"m{i}" for i in range(n)]
    cfg = moa_config([names], aggregator="m0")
    shared = {"now": 0, "max": 0}
    agents = {name: SleepyAgent(name) for name in names}
    for agent in agents.values():
        agent.shared = shared
    pipe = build_pipeline(cfg, "p", agents)

    result = run(pipe.run("hello"))
    trace = result.trace

    assert shared["max"] == n  # every proposer of the layer was in flight at once
    # the trace's own timings: the n proposers ran as one wave (each started before any ended), then the aggregator
    # (started after the last proposer ended); sequential calls would be n + 1 waves of DELAY each
    proposers, final = waves(trace)
    assert [c.model for c in final] == ["m0"] and sorted(c.model for c in proposers) == names
    assert final[0].start_s >= max(ended_s(c) for c in proposers)
    layer1, _final = trace.layers
    assert layer1.wall_s >= DELAY and trace.wall_s >= 2 * DELAY
    assert trace.sum_latency_s >= (n + 1) * DELAY * 0.95
    assert trace.critical_path_s == pytest.approx(max(c.latency_s for c in proposers) + final[0].latency_s)  # one latency per wave


def test_three_layer_moa_wall_is_three_agent_latencies():
    names = [f"m{i}" for i in range(6)]
    cfg = moa_config([names, names], aggregator="m0")
    agents = {name: SleepyAgent(name) for name in names}
    result = run(build_pipeline(cfg, "p", agents).run("hello"))
    assert len(result.trace.calls) == 13
    assert [len(wave) for wave in waves(result.trace)] == [6, 6, 1]  # three waves of calls; sequential: 13
    assert result.trace.wall_s >= 3 * DELAY


# --------------------------------------------------------------------------- quorum and deadline


def _layer_with_stragglers(min_responses: int | None, deadline_s: float | None):
    cfg = moa_config([["fast1", "fast2", "slow1", "slow2"]], aggregator="fast1")
    layer = cfg.pipeline("p").layers[0].model_copy(update={"min_responses": min_responses, "deadline_s": deadline_s})
    agents = {
        "fast1": SleepyAgent("fast1", 0.05),
        "fast2": SleepyAgent("fast2", 0.1),
        "slow1": SleepyAgent("slow1", SLOW_S),
        "slow2": SleepyAgent("slow2", SLOW_S),
    }
    return MoAPipeline("p", cfg.pipeline("p"), agents), layer, agents


def test_deadline_with_quorum_cuts_stragglers_and_goes_on():
    pipe, layer, agents = _layer_with_stragglers(min_responses=2, deadline_s=0.4)
    trace = Trace(pipeline="p", kind="moa")
    t0 = time.perf_counter()
    responses = run(pipe.run_layer(1, layer, [ChatMessage(role="user", content="q")], trace, t0))
    elapsed = time.perf_counter() - t0

    assert [r.spec.model for r in responses] == ["fast1", "fast2"]
    assert 0.4 <= elapsed < SLOW_S  # waited for the deadline, not for the stragglers
    status = {c.model: c.status for c in trace.calls}
    assert status == {"fast1": "ok", "fast2": "ok", "slow1": "cut", "slow2": "cut"}
    assert all(c.latency_s >= 0.4 * 0.9 for c in trace.calls if c.status == "cut")  # cut at the deadline (timers may fire a hair early)
    assert all(c.error == "cut by the layer deadline" for c in trace.calls if c.status == "cut")
    assert agents["slow1"].cancelled == agents["slow2"].cancelled == 1  # the stragglers' calls were cancelled


def test_quorum_without_deadline_returns_as_soon_as_enough_answered():
    pipe, layer, _ = _layer_with_stragglers(min_responses=2, deadline_s=None)
    trace = Trace(pipeline="p", kind="moa")
    t0 = time.perf_counter()
    responses = run(pipe.run_layer(1, layer, [ChatMessage(role="user", content="q")], trace, t0))
    assert len(responses) == 2 and time.perf_counter() - t0 < SLOW_S
    assert sorted(c.status for c in trace.calls) == ["cut", "cut", "ok", "ok"]
    # cut as soon as the second answer came: no straggler was cut before it, none waited for
    second = max(ended_s(c) for c in trace.calls if c.status == "ok")
    assert all(second <= ended_s(c) < SLOW_S for c in trace.calls if c.status == "cut")


def test_deadline_waits_past_itself_until_the_quorum_is_met():
    cfg = moa_config([["a", "b", "c"]], aggregator="a")
    agents = {"a": SleepyAgent("a", 0.05), "b": SleepyAgent("b", 0.5), "c": SleepyAgent("c", SLOW_S)}
    layer = LayerSpec(proposers=[ProposerSpec(model=m) for m in "abc"], min_responses=2, deadline_s=0.1)
    pipe = MoAPipeline("p", cfg.pipeline("p"), agents)
    trace = Trace(pipeline="p", kind="moa")
    t0 = time.perf_counter()
    responses = run(pipe.run_layer(1, layer, [ChatMessage(role="user", content="q")], trace, t0))
    assert [r.spec.model for r in responses] == ["a", "b"]
    assert 0.5 <= time.perf_counter() - t0 < SLOW_S
    assert {c.model: c.status for c in trace.calls} == {"a": "ok", "b": "ok", "c": "cut"}
    b, c = (next(call for call in trace.calls if call.model == m) for m in "bc")
    assert ended_s(b) <= ended_s(c) and c.latency_s >= 0.5 * 0.9  # c was cut once b answered, well past the 0.1 s deadline


def test_pipeline_level_deadline_applies_through_run():
    cfg = moa_config([["fast1", "fast2", "slow1"]], aggregator="fast1", min_responses=2, layer_deadline_s=0.3)
    agents = {"fast1": SleepyAgent("fast1", 0.05), "fast2": SleepyAgent("fast2", 0.05), "slow1": SleepyAgent("slow1", SLOW_S)}
    result = run(build_pipeline(cfg, "p", agents).run("q"))
    assert result.trace.wall_s < SLOW_S
    cut = next(c for c in result.trace.calls_in(1) if c.status == "cut")
    assert cut.latency_s >= 0.3 * 0.9  # held until the pipeline's layer deadline
    assert [c.status for c in result.trace.calls_in(1)].count("cut") == 1
    aggregator_messages = agents["fast1"].calls[-1][0]
    assert "\n1. " in aggregator_messages[0].content and "\n3. " not in aggregator_messages[0].content


# --------------------------------------------------------------------------- failures


def test_failed_proposer_is_dropped_from_references_and_traced():
    cfg = moa_config([["good1", "bad", "good2"]], aggregator="agg")
    boom = UpstreamError("bad: HTTP 503: overloaded", model="bad", status_code=503)
    agents = {
        "good1": SleepyAgent("good1", 0.01, text="alpha"),
        "bad": SleepyAgent("bad", 0.01, error=boom),
        "good2": SleepyAgent("good2", 0.01, text="gamma"),
        "agg": SleepyAgent("agg", 0.01, text="final"),
    }
    result = run(build_pipeline(cfg, "p", agents).run("q"))

    assert result.answer == "final"
    system = agents["agg"].calls[0][0][0]
    assert system.content == AGGREGATE_AND_SYNTHESIZE + "\n1. alpha\n2. gamma"  # renumbered without the failure
    bad = next(c for c in result.trace.calls if c.model == "bad")
    assert bad.status == "error" and bad.error == "UpstreamError: bad: HTTP 503: overloaded"
    assert bad.completion_tokens == 0
    assert [c.status for c in result.trace.calls].count("ok") == 3


@pytest.mark.unexpected_call_errors  # bad2 fails with a plain RuntimeError on purpose
def test_every_proposer_failing_raises_layer_failed_with_the_trace():
    cfg = moa_config([["ok1"], ["bad1", "bad2"]], aggregator="agg")
    agents = {
        "ok1": SleepyAgent("ok1", 0.01),
        "bad1": SleepyAgent("bad1", 0.01, error=UpstreamError("bad1: HTTP 500: down")),
        "bad2": SleepyAgent("bad2", 0.01, error=RuntimeError("replica died")),
        "agg": SleepyAgent("agg", 0.01),
    }
    with pytest.raises(LayerFailed) as info:
        run(build_pipeline(cfg, "p", agents).run("q"))
    err = info.value
    assert "layer 2" in str(err) and "bad1: HTTP 500: down" in str(err) and "replica died" in str(err)
    assert [(c.layer, c.model, c.status) for c in err.trace.calls] == [
        (1, "ok1", "ok"),
        (2, "bad1", "error"),
        (2, "bad2", "error"),
    ]
    assert err.trace.wall_s > 0
    assert agents["agg"].calls == []  # the aggregator is never called


def test_aggregator_failing_raises_aggregator_failed_with_the_trace():
    cfg = moa_config([["a", "b"]], aggregator="agg")
    agents = {
        "a": SleepyAgent("a", 0.01),
        "b": SleepyAgent("b", 0.01),
        "agg": SleepyAgent("agg", 0.01, error=UpstreamError("agg: HTTP 502: bad gateway")),
    }
    with pytest.raises(AggregatorFailed, match="agg: HTTP 502") as info:
        run(build_pipeline(cfg, "p", agents).run("q"))
    final = info.value.trace.calls[-1]
    assert (final.role, final.status, final.layer) == ("aggregator", "error", 2)
    assert [layer.role for layer in info.value.trace.layers] == ["proposer", "aggregator"]


def test_aggregator_failing_while_streaming_raises_aggregator_failed():
    cfg = moa_config([["a"]], aggregator="agg")
    agents = {"a": SleepyAgent("a", 0.01), "agg": SleepyAgent("agg", 0.01, error=UpstreamError("agg: down"))}

    async def consume():
        return [item async for item in build_pipeline(cfg, "p", agents).stream("q")]

    with pytest.raises(AggregatorFailed, match="agg: down") as info:
        run(consume())
    assert info.value.trace.calls[-1].status == "error"


def test_every_proposer_failing_while_streaming_raises_layer_failed_with_timing():
    cfg = moa_config([["bad"]], aggregator="agg")
    agents = {"bad": SleepyAgent("bad", 0.05, error=UpstreamError("bad: down")), "agg": SleepyAgent("agg", 0.01)}

    async def consume():
        return [item async for item in build_pipeline(cfg, "p", agents).stream("q")]

    with pytest.raises(LayerFailed) as info:
        run(consume())
    assert info.value.trace.wall_s >= 0.05
    assert agents["agg"].calls == []


# --------------------------------------------------------------------------- prompts, params, streaming, trace


def test_each_layer_sees_the_previous_layers_answers_with_the_papers_prompt():
    role = "You are a careful fact checker."
    cfg = moa_config(
        [["a", {"model": "b", "system": role, "temperature": 1.0}], ["a", "b"]],
        aggregator={"model": "agg", "temperature": 0.2},
    )
    agents = {"a": SleepyAgent("a", 0.01), "b": SleepyAgent("b", 0.01), "agg": SleepyAgent("agg", 0.01, text="done")}
    convo = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Why is the sky blue?")]
    result = run(build_pipeline(cfg, "p", agents).run(convo))
    user = convo[1]

    a1, a2 = agents["a"].calls
    b1, b2 = agents["b"].calls
    assert a1[0] == convo
    assert b1[0] == [ChatMessage(role="system", content=role + "\n\nBe brief."), user]
    assert (b1[1].temperature, a1[1].temperature) == (1.0, None)

    layer1 = AGGREGATE_AND_SYNTHESIZE + "\n1. a answer 1\n2. b answer 1"
    assert a2[0] == [ChatMessage(role="system", content="Be brief.\n\n" + layer1), user]
    assert b2[0] == a2[0]  # layer 2's b has no role
    ((agg_messages, agg_params),) = agents["agg"].calls
    layer2 = AGGREGATE_AND_SYNTHESIZE + "\n1. a answer 2\n2. b answer 2"
    assert agg_messages == [ChatMessage(role="system", content="Be brief.\n\n" + layer2), user]
    assert agg_params.temperature == 0.2
    assert result.answer == "done"


def test_request_params_apply_to_the_final_call_only():
    cfg = moa_config([["a", {"model": "b", "max_tokens": 99}]], aggregator="agg")
    agents = {n: SleepyAgent(n, 0.01) for n in ("a", "b", "agg")}
    run(build_pipeline(cfg, "p", agents).run("q", ChatParams(max_tokens=16, temperature=0.0)))
    assert agents["a"].calls[0][1].max_tokens is None
    assert agents["b"].calls[0][1].max_tokens == 99
    final = agents["agg"].calls[0][1]
    assert (final.max_tokens, final.temperature) == (16, 0.0)


def test_stream_yields_the_final_calls_deltas_then_the_result():
    cfg = moa_config([["a", "b"]], aggregator="agg")
    agents = {"a": SleepyAgent("a", 0.01), "b": SleepyAgent("b", 0.01), "agg": SleepyAgent("agg", 0.01, text="one two three")}

    async def consume():
        return [item async for item in build_pipeline(cfg, "p", agents).stream("q")]

    items = run(consume())
    *chunks, result = items
    assert isinstance(result, PipelineResult) and result.answer == "one two three"
    assert "".join(c.delta for c in chunks).strip() == "one two three"
    assert [layer.role for layer in result.trace.layers] == ["proposer", "aggregator"]
    assert result.trace.calls[-1].completion_tokens == 3


def test_trace_records_every_call_and_derives_totals():
    cfg = moa_config([["a", "b"], ["a", "b"]], aggregator="agg")
    agents = {n: SleepyAgent(n, 0.02) for n in ("a", "b", "agg")}
    result = run(build_pipeline(cfg, "p", agents).run("q"))
    trace = result.trace

    assert [(c.layer, c.index, c.role, c.model) for c in trace.calls] == [
        (1, 0, "proposer", "a"),
        (1, 1, "proposer", "b"),
        (2, 0, "proposer", "a"),
        (2, 1, "proposer", "b"),
        (3, 0, "aggregator", "agg"),
    ]
    assert all(c.prompt_tokens > 0 and c.completion_tokens > 0 and c.latency_s >= 0.02 for c in trace.calls)
    assert [layer.layer for layer in trace.layers] == [1, 2, 3]
    assert all(layer.wall_s >= 0.02 for layer in trace.layers)
    assert trace.wall_s >= sum(layer.wall_s for layer in trace.layers)
    by_role = trace.tokens_by_role()
    assert by_role["proposer"].calls == 4 and by_role["aggregator"].calls == 1
    assert trace.totals().total_tokens == sum(c.prompt_tokens + c.completion_tokens for c in trace.calls)
    data = trace.to_json_dict()
    assert {"wall_s", "layers", "calls", "tokens", "critical_path_s"} <= set(data)
    assert data["tokens"]["calls"] == 5


def test_pipeline_refuses_to_start_without_an_agent_for_every_model():
    cfg = moa_config([["a", "b"]], aggregator="agg")
    with pytest.raises(Exception, match=r"needs agents for models \['b'\]"):
        build_pipeline(cfg, "p", {"a": SleepyAgent("a"), "agg": SleepyAgent("agg")})


def test_a_call_failing_with_a_bug_is_logged_with_its_traceback_and_the_layer_goes_on(caplog):
    cfg = moa_config([["ok1", "buggy"]], aggregator="agg")
    agents = {"ok1": SleepyAgent("ok1", 0.01), "buggy": SleepyAgent("buggy", 0.01, error=KeyError("oops")), "agg": SleepyAgent("agg", 0.01)}
    result = run(build_pipeline(cfg, "p", agents).run("q"))
    failed = [c for c in result.trace.calls if c.status == "error"]
    assert [c.error_type for c in failed] == ["KeyError"]
    bugs = [r for r in caplog.records if r.name == "moa_ray.pipeline.base" and r.levelname == "ERROR"]
    assert len(bugs) == 1 and bugs[0].exc_info is not None and "buggy" in bugs[0].getMessage()
    caplog.clear()  # expected here; anywhere else the conftest guard fails the test
