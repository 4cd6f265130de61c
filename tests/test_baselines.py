"""Baseline pipeline kinds (single, ranker, self-moa) against the LLM simulator, and their presets."""

from __future__ import annotations

import asyncio
from typing import Any

from pipeline_support import Recorder, ended_s, local_agents, sim_models

from bench.simulator import Behaviour, SimulatorConfig
from moa_ray.config import load_presets, parse_config
from moa_ray.pipeline import build_pipeline
from moa_ray.prompts import aggregate_system_prompt

REPLIES = {"p1": "first answer text", "p2": "second answer, longer text here", "p3": "third answer"}


def run(sim, pipeline: dict[str, Any], recorder: Recorder | None = None, stream: bool = False):
    names = [*REPLIES, "agg"]
    config = parse_config(
        {
            "models": sim_models(sim.base_url, names, temperature=0.8),
            "pipelines": {"b": pipeline},
        }
    )
    agents = local_agents(config, transport=recorder)
    pipe = build_pipeline(config, "b", agents)

    async def go():
        try:
            if not stream:
                return await pipe.run("Which answer is best?")
            return [item async for item in pipe.stream("Which answer is best?")]
        finally:  # the connection pools belong to this asyncio.run's loop
            for agent in agents.values():
                await agent.backend.aclose()

    return asyncio.run(go())


def sim_config(agg: Behaviour | None = None, **extra: Behaviour) -> SimulatorConfig:
    models = {name: Behaviour(latency_ms=5, reply=text) for name, text in REPLIES.items()}
    models["agg"] = agg or Behaviour(latency_ms=5, output_tokens=6)
    models.update(extra)
    return SimulatorConfig(latency_ms=5, models=models)


RANKER = {"kind": "ranker", "layers": [list(REPLIES)], "aggregator": "agg"}


def test_single_is_one_call(simulator):
    sim = simulator(sim_config())
    result = run(sim, {"kind": "single", "model": "p2"})
    assert result.answer == REPLIES["p2"]
    assert [(c.role, c.layer) for c in result.trace.calls] == [("proposer", 1)]
    assert sim.stats.requests == 1


def test_ranker_returns_one_proposer_text_verbatim(simulator):
    sim = simulator(sim_config(agg=Behaviour(latency_ms=5, reply='{"reasoning": "most complete", "best_response": 2}')))
    rec = Recorder()
    result = run(sim, RANKER, rec)
    assert result.answer == REPLIES["p2"]
    trace = result.trace
    assert [(layer.layer, layer.role, layer.selected) for layer in trace.layers] == [(1, "proposer", None), (2, "aggregator", [1])]
    assert [c.selected for c in trace.calls_in(1)] == [False, True, False]
    (ranker_body,) = [b for b in rec.bodies if b["model"] == "agg"]
    assert ranker_body["response_format"] == {"type": "json_object"}
    assert "Response 2:\n" + REPLIES["p2"] in ranker_body["messages"][0]["content"]
    assert trace.tokens_by_role()["ranker"].calls == 1 and "aggregator" not in trace.tokens_by_role()


def test_ranker_unreadable_choice_falls_back_to_a_seeded_draw(simulator):
    sim = simulator(sim_config())  # the ranker answers filler words
    answers = {run(sim, RANKER).answer for _ in range(2)}
    assert len(answers) == 1 and answers <= set(REPLIES.values())


def test_ranker_out_of_range_and_failure(simulator):
    sim = simulator(sim_config(agg=Behaviour(latency_ms=5, reply='{"best_response": 9}')))
    result = run(sim, RANKER)
    assert result.answer in REPLIES.values() and "out-of-range 9" in result.trace.layers[-1].judge_fallback
    sim = simulator(sim_config(agg=Behaviour(latency_ms=5, failure_rate=1.0)))
    result = run(sim, RANKER)
    assert result.answer == REPLIES["p1"] and "ranker call failed" in result.trace.layers[-1].judge_fallback


def test_ranker_streams_the_chosen_text(simulator):
    sim = simulator(sim_config(agg=Behaviour(latency_ms=5, reply='{"best_response": 3}')))
    chunks = run(sim, RANKER, stream=True)
    assert chunks[0].delta == REPLIES["p3"] and chunks[-1].answer == REPLIES["p3"]


def test_ranker_with_quorum_leaves_a_straggler(simulator):
    sim = simulator(sim_config(agg=Behaviour(latency_ms=5, reply='{"best_response": 2}'), p2=Behaviour(latency_ms=1500, reply="slow")))
    result = run(sim, {**RANKER, "min_responses": 2, "layer_deadline_s": 0.2})
    assert [c.status for c in result.trace.calls_in(1)] == ["ok", "cut", "ok"]
    assert result.answer == REPLIES["p3"]  # "2" is the second response shown: proposer 3
    # the trace's own timings: the ranker started once the straggler was cut, not after it answered
    (cut,) = [c for c in result.trace.calls if c.status == "cut"]
    (ranker,) = [c for c in result.trace.calls if c.role == "ranker"]
    assert ranker.start_s >= ended_s(cut)


def test_self_moa_samples_one_model_n_times_with_distinct_seeds(simulator):
    sim = simulator(sim_config())
    rec = Recorder()
    result = run(sim, {"kind": "self-moa", "model": "p1", "n": 4, "aggregator": "agg"}, rec)
    samples = [b for b in rec.bodies if b["model"] == "p1"]
    assert len(samples) == 4 and len({b["seed"] for b in samples}) == 4
    assert all(b["temperature"] == 0.8 for b in samples)  # the model's own temperature
    (agg,) = [b for b in rec.bodies if b["model"] == "agg"]
    assert agg["messages"][0]["content"] == aggregate_system_prompt([REPLIES["p1"]] * 4)
    assert [layer.role for layer in result.trace.layers] == ["proposer", "aggregator"]
    # reproducible: the same prompt and run seed give the same samples' seeds; another run seed, others
    again = Recorder()
    run(sim, {"kind": "self-moa", "model": "p1", "n": 4, "aggregator": "agg"}, again)
    assert [b["seed"] for b in again.bodies if b["model"] == "p1"] == [b["seed"] for b in samples]
    other = Recorder()
    run(sim, {"kind": "self-moa", "model": "p1", "n": 4, "aggregator": "agg", "seed": 1}, other)
    assert {b["seed"] for b in other.bodies if b["model"] == "p1"}.isdisjoint({b["seed"] for b in samples})


def test_a_proposers_own_seed_reaches_its_calls(simulator):
    sim = simulator(sim_config())
    rec = Recorder()
    run(sim, {"kind": "moa", "layers": [[{"model": "p1", "seed": 42}, "p2"]], "aggregator": "agg"}, rec)
    seeds = {b["model"]: b.get("seed") for b in rec.bodies}
    assert seeds == {"p1": 42, "p2": None, "agg": None}


def test_self_moa_quorum(simulator):
    sim = simulator(SimulatorConfig(latency_ms=5, jitter_ms=0, models={"p1": Behaviour(latency_ms=5, reply="x")}))
    result = run(sim, {"kind": "self-moa", "model": "p1", "n": 3, "aggregator": "agg", "min_responses": 2})
    assert result.answer and len([c for c in result.trace.calls if c.role == "proposer"]) == 3


def test_presets_ship_smoa_and_embedded_baselines():
    cfg = load_presets()
    kinds = {
        name: cfg.pipelines[name].kind for name in ("smoa", "embedded-smoa", "embedded-single", "embedded-ranker", "embedded-self-moa")
    }
    assert kinds == {
        "smoa": "smoa",
        "embedded-smoa": "smoa",
        "embedded-single": "single",
        "embedded-ranker": "ranker",
        "embedded-self-moa": "self-moa",
    }
    smoa = cfg.pipelines["smoa"]
    assert all(len(layer.proposers) == 4 for layer in smoa.layers) and smoa.k == 2
    assert smoa.judge_spec.model == smoa.aggregator.model and smoa.moderation_enabled
    assert cfg.models_for(["embedded-smoa", "embedded-ranker", "embedded-self-moa", "embedded-single"]).keys() == {"smollm2"}
