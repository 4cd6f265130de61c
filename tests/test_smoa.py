"""SMoA pipelines end to end against the LLM simulator (the test double of a remote model service).

Proposers answer with fixed, distinct texts and the judge/moderator with scripted
verdicts, so every assertion checks exactly which responses travelled where. A
recording HTTP transport keeps each request body the pipeline sent.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from pipeline_support import Recorder, local_agents, sim_models

from bench.simulator import Behaviour, SimulatorConfig
from moa_ray.config import parse_config
from moa_ray.pipeline import build_pipeline
from moa_ray.prompts import aggregate_system_prompt

QUESTION = "Name three primary colours."
REPLIES = {
    "p1": "red green blue are the primary colours of light",
    "p2": "red yellow blue in painting",
    "p3": "cyan magenta yellow for printing inks and toners",
    "p4": "it depends on the colour model you use",
}


def verdict(chosen: list[int] | None = None, end: bool | None = None, reasoning: str = "r") -> str:
    data: dict[str, Any] = {"reasoning": reasoning}
    if chosen is not None:
        data["chosen_responses"] = chosen
    if end is not None:
        data["end_debate"] = end
    return json.dumps(data)


def sim_config(judge: str | Behaviour | None = None, moderator: str | None = None, **extra: Behaviour) -> SimulatorConfig:
    """Proposers reply REPLIES; the judge replies ``judge`` (a text, a Behaviour, or filler words when None)."""
    models = {name: Behaviour(latency_ms=5, reply=text) for name, text in REPLIES.items()}
    models["agg"] = Behaviour(latency_ms=5, output_tokens=8)
    if isinstance(judge, Behaviour):
        models["judge"] = judge
    else:
        models["judge"] = Behaviour(latency_ms=5, reply=judge) if judge is not None else Behaviour(latency_ms=5, output_tokens=12)
    if moderator is not None:
        models["mod"] = Behaviour(latency_ms=5, reply=moderator)
    models.update(extra)
    return SimulatorConfig(latency_ms=5, models=models)


def build(sim, pipeline: dict[str, Any], recorder: Recorder, name: str = "p"):
    names = [*REPLIES, "agg", "judge", "mod"]
    config = parse_config(
        {
            "models": sim_models(sim.base_url, names, parameters_b=1.0),
            "pipelines": {name: pipeline},
        }
    )
    return build_pipeline(config, name, local_agents(config, transport=recorder))


def smoa(layers: int = 2, **kw: Any) -> dict[str, Any]:
    return {"kind": "smoa", "layers": [list(REPLIES)] * layers, "aggregator": "agg", "judge": "judge", "k": 2, **kw}


def words(*texts: str) -> int:
    return sum(len(t.split()) for t in texts)


def test_judge_keeps_k_and_only_those_reach_the_aggregator(simulator):
    sim = simulator(sim_config(judge=verdict([3, 1], end=False)))
    rec = Recorder()
    result = asyncio.run(build(sim, smoa(), rec).run(QUESTION))
    trace = result.trace
    assert [layer.selected for layer in trace.layers if layer.role == "proposer"] == [[2, 0], [2, 0]]
    assert trace.stopped_at_layer is None and all(layer.judge_fallback is None for layer in trace.layers)
    kept = [REPLIES["p3"], REPLIES["p1"]]
    # the aggregator (and layer 2) saw exactly the two kept responses, in the judge's order
    (agg_body,) = rec.to("agg")
    assert agg_body["messages"][0] == {"role": "system", "content": aggregate_system_prompt(kept)}
    assert rec.to("p2")[1]["messages"][0] == {"role": "system", "content": aggregate_system_prompt(kept)}
    agg_call = next(c for c in trace.calls if c.role == "aggregator")
    assert agg_call.layer == 3 and agg_call.prompt_tokens == words(aggregate_system_prompt(kept), QUESTION)
    # per-call flags
    layer1 = [c for c in trace.calls_in(1) if c.role == "proposer"]
    assert [c.selected for c in layer1] == [True, False, True, False]
    # the judge asked for JSON, saw 1-based numbered responses, and moderated layer 1 only (not the last)
    judge_bodies = rec.to("judge")
    assert len(judge_bodies) == 2 and all(b["response_format"] == {"type": "json_object"} for b in judge_bodies)
    first, last = (b["messages"][0]["content"] for b in judge_bodies)
    assert "Response 1:\n" + REPLIES["p1"] in first and "Response 4:\n" + REPLIES["p4"] in first
    assert "end_debate" in first and "end_debate" not in last


def test_k_selection_shrinks_the_aggregator_input(simulator):
    sim = simulator(sim_config(judge=verdict([2, 4], end=False)))
    moa = {"kind": "moa", "layers": [list(REPLIES)], "aggregator": "agg"}
    moa_trace = asyncio.run(build(sim, moa, Recorder(), "moa").run(QUESTION)).trace
    smoa_trace = asyncio.run(build(sim, smoa(layers=1), Recorder()).run(QUESTION)).trace

    def agg_prompt(trace):
        return next(c.prompt_tokens for c in trace.calls if c.role == "aggregator")

    assert agg_prompt(moa_trace) == words(aggregate_system_prompt(list(REPLIES.values())), QUESTION)
    assert agg_prompt(smoa_trace) == words(aggregate_system_prompt([REPLIES["p2"], REPLIES["p4"]]), QUESTION)
    assert agg_prompt(smoa_trace) < agg_prompt(moa_trace)


def test_moderator_stop_ends_the_loop_and_is_traced(simulator):
    sim = simulator(sim_config(judge=verdict([1, 2], end=True, reasoning="all four agree on the answer")))
    rec = Recorder()
    trace = asyncio.run(build(sim, smoa(layers=3), rec).run(QUESTION)).trace
    assert trace.stopped_at_layer == 1
    assert [(layer.layer, layer.role, layer.stopped) for layer in trace.layers] == [
        (1, "proposer", True),
        (2, "aggregator", False),
    ]
    assert trace.layers[0].stop_reason == "all four agree on the answer"
    assert all(len(rec.to(p)) == 1 for p in REPLIES)  # no second proposer layer
    assert trace.accounting is not None
    assert trace.accounting.proposer_layers_run == 1 and trace.accounting.stopped_at_layer == 1


def test_moderator_off_never_stops(simulator):
    sim = simulator(sim_config(judge=verdict([1, 2], end=True)))
    rec = Recorder()
    trace = asyncio.run(build(sim, smoa(layers=3, moderator=False), rec).run(QUESTION)).trace
    assert trace.stopped_at_layer is None
    assert [layer.role for layer in trace.layers] == ["proposer"] * 3 + ["aggregator"]
    assert all("end_debate" not in b["messages"][0]["content"] for b in rec.to("judge"))


def test_max_layers_bounds_the_loop(simulator):
    sim = simulator(sim_config(judge=verdict([1, 2], end=False)))
    trace = asyncio.run(build(sim, smoa(layers=3, max_layers=2), Recorder()).run(QUESTION)).trace
    assert [layer.role for layer in trace.layers] == ["proposer", "proposer", "aggregator"]


def test_separate_moderator_model(simulator):
    sim = simulator(sim_config(judge=verdict([4, 3]), moderator=verdict(end=True, reasoning="consistent")))
    rec = Recorder()
    trace = asyncio.run(build(sim, smoa(layers=2, moderator="mod"), rec).run(QUESTION)).trace
    assert {c.role for c in trace.calls_in(1)} == {"proposer", "judge", "moderator"}
    assert trace.stopped_at_layer == 1 and trace.layers[0].selected == [3, 2]
    assert "end_debate" not in rec.to("judge")[0]["messages"][0]["content"]
    assert trace.tokens_by_role()["moderator"].calls == 1


def test_failed_separate_moderator_continues(simulator):
    sim = simulator(sim_config(judge=verdict([1, 2], end=True), mod=Behaviour(latency_ms=5, failure_rate=1.0)))
    trace = asyncio.run(build(sim, smoa(layers=2, moderator="mod"), Recorder()).run(QUESTION)).trace
    assert trace.stopped_at_layer is None and len(trace.layers) == 3  # the judge's stray end_debate is not a stop
    assert "moderator call failed" in trace.layers[0].judge_fallback


def test_silent_moderator_continues(simulator):
    sim = simulator(sim_config(judge=verdict([1, 2])))  # no end_debate key
    trace = asyncio.run(build(sim, smoa(layers=2), Recorder()).run(QUESTION)).trace
    assert trace.stopped_at_layer is None and len(trace.layers) == 3
    assert "no end_debate decision" in trace.layers[0].judge_fallback


def test_failed_judge_keeps_the_first_k(simulator):
    sim = simulator(sim_config(judge=Behaviour(latency_ms=5, failure_rate=1.0)))
    result = asyncio.run(build(sim, smoa(layers=2), Recorder()).run(QUESTION))
    first = result.trace.layers[0]
    assert first.selected == [0, 1] and "judge call failed" in first.judge_fallback
    assert result.trace.stopped_at_layer is None  # a failed moderator never stops the debate
    assert [c.status for c in result.trace.calls if c.role == "judge"] == ["error", "error"]


def test_unreadable_judge_uses_the_seeded_fallback(simulator):
    sim = simulator(sim_config())  # the judge answers filler words
    runs = [asyncio.run(build(sim, smoa(layers=1), Recorder()).run(QUESTION)).trace.layers[0] for _ in range(2)]
    assert runs[0].selected == runs[1].selected  # deterministic
    assert len(set(runs[0].selected)) == 2 and set(runs[0].selected) <= {0, 1, 2, 3}
    assert "no selection" in runs[0].judge_fallback and "seeded shuffle" in runs[0].judge_fallback


def test_quorum_leaves_a_straggler_behind(simulator):
    sim = simulator(sim_config(judge=verdict([1, 3], end=False), p4=Behaviour(latency_ms=1500, reply="late")))
    pipeline = smoa(layers=1, min_responses=3, layer_deadline_s=0.2)
    result = asyncio.run(build(sim, pipeline, Recorder()).run(QUESTION))
    trace = result.trace
    assert [c.status for c in trace.calls_in(1) if c.role == "proposer"] == ["ok", "ok", "ok", "cut"]
    assert trace.layers[0].selected == [0, 2] and trace.wall_s < 2.0
    cut = next(c for c in trace.calls if c.status == "cut")
    assert cut.selected is None


def test_fewer_than_k_responses_skip_the_judge(simulator):
    broken = Behaviour(latency_ms=5, failure_rate=1.0)
    sim = simulator(sim_config(judge=verdict([1, 2]), p2=broken, p3=broken))
    trace = asyncio.run(build(sim, smoa(layers=1), Recorder()).run(QUESTION)).trace
    assert not [c for c in trace.calls if c.role == "judge"]
    assert trace.layers[0].selected == [0, 3] and "without a judge call" in trace.layers[0].judge_fallback


def test_stream_runs_the_same_plan(simulator):
    sim = simulator(sim_config(judge=verdict([2, 1], end=True)))

    async def collect():
        items = [item async for item in build(sim, smoa(layers=2), Recorder()).stream(QUESTION)]
        return items[-1]

    result = asyncio.run(collect())
    assert result.trace.stopped_at_layer == 1 and result.trace.accounting is not None


def test_shuffled_responses_map_the_judges_numbers_back_to_the_right_proposers(simulator):
    sim = simulator(sim_config(judge=verdict([1, 2], end=False)))
    rec = Recorder()
    trace = asyncio.run(build(sim, smoa(layers=1, shuffle_responses=True, seed=3), rec).run(QUESTION)).trace
    (judge_body,) = rec.to("judge")
    prompt = judge_body["messages"][0]["content"]
    shown = sorted(REPLIES, key=lambda p: prompt.index(REPLIES[p]))  # proposers in the order the judge saw them
    assert shown != list(REPLIES)  # this seed does shuffle
    kept = [REPLIES[shown[0]], REPLIES[shown[1]]]  # "Response 1" and "Response 2" as shown
    assert "Response 1:\n" + kept[0] in prompt and "Response 2:\n" + kept[1] in prompt
    assert trace.layers[0].selected == [list(REPLIES).index(shown[0]), list(REPLIES).index(shown[1])]
    (agg_body,) = rec.to("agg")
    assert agg_body["messages"][0] == {"role": "system", "content": aggregate_system_prompt(kept)}
