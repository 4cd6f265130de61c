"""Role-playing proposers: parsing, the on-disk cache, and one role call per (dataset, task, n, model)."""

from __future__ import annotations

import asyncio
import json

from pipeline_support import Recorder, local_agents

from bench.simulator import Behaviour, SimulatorConfig
from moa_ray.config import LayerSpec, parse_config
from moa_ray.pipeline.roles import (
    RoleCache,
    RoleSet,
    assign_roles,
    cache_root,
    parse_roles,
    roles_schema,
)
from moa_ray.pipeline.smoa import SMoAPipeline
from moa_ray.prompts import role_system

ROLES = [
    {"occupation": "chemist", "personality": "precise", "social_group": "academics"},
    {"occupation": "chef", "personality": "warm", "social_group": "restaurant workers"},
    {"occupation": "teacher", "personality": "patient", "social_group": "parents"},
]
DESCRIBED = [
    "occupation: chemist; personality: precise; social group: academics",
    "occupation: chef; personality: warm; social group: restaurant workers",
    "occupation: teacher; personality: patient; social group: parents",
]


def test_parse_roles_json_forms():
    assert parse_roles(json.dumps({"roles": ROLES})) == DESCRIBED
    assert parse_roles("Here you go:\n" + json.dumps(ROLES)) == DESCRIBED
    assert parse_roles(json.dumps({"roles": ["a doctor", "a doctor", "a poet"]})) == ["a doctor", "a poet"]
    assert parse_roles(json.dumps({"roles": [{"job": "pilot"}]})) == ["job: pilot"]


def test_parse_roles_from_truncated_json():
    text = json.dumps({"roles": ROLES})[:-40]  # cut inside the third role
    assert parse_roles(text) == DESCRIBED[:2]


def test_parse_roles_numbered_lines_and_garbage():
    text = "1. A nurse who is calm\n2) An engineer, blunt\n- A farmer from the countryside\nThanks!"
    assert parse_roles(text) == ["A nurse who is calm", "An engineer, blunt", "A farmer from the countryside"]
    assert parse_roles("no roles here") == []


def test_roles_schema_asks_for_exactly_n():
    roles = roles_schema(4)["properties"]["roles"]
    assert roles["minItems"] == roles["maxItems"] == 4
    assert roles["items"]["required"] == ["occupation", "personality", "social_group"]


def test_assign_roles_prepends_a_system_role():
    layer = LayerSpec(proposers=["a", {"model": "b", "system": "Be brief."}, "c"])
    out = assign_roles(layer, ["r1", "r2"])
    assert out.proposers[0].system == role_system("r1")
    assert out.proposers[1].system == role_system("r2") + "\n\nBe brief."
    assert out.proposers[2].system is None  # fewer roles than proposers: the rest keep theirs
    assert layer.proposers[0].system is None  # the spec itself is not mutated


def test_cache_round_trip_and_misses(tmp_path):
    cache = RoleCache(tmp_path)
    assert cache.get("d", "t", 3, "m") is None
    path = cache.put(RoleSet(dataset="d", task="t", n=3, model="m", roles=DESCRIBED))
    assert path.parent == tmp_path / "roles" and cache.get("d", "t", 3, "m") == DESCRIBED
    assert cache.get("d", "t", 4, "m") is None and cache.get("d", "t", 3, "other") is None
    path.write_text("{not json")
    assert cache.get("d", "t", 3, "m") is None  # a corrupt entry is a miss, not a crash


def test_cache_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("MOA_RAY_CACHE_DIR", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c" and RoleCache().directory == tmp_path / "c" / "roles"
    monkeypatch.delenv("MOA_RAY_CACHE_DIR")
    assert str(cache_root()).endswith(".cache/moa-ray")


def _pipeline(sim, cache_dir, recorder: Recorder | None = None):
    names = ["p1", "p2", "p3", "agg", "rolegen"]
    config = parse_config(
        {
            "models": {m: {"backend": "openai", "model": f"id-{m}", "base_url": sim.base_url, "max_retries": 0} for m in names},
            "pipelines": {
                "s": {
                    "kind": "smoa",
                    "layers": [["p1", "p2", "p3"]],
                    "aggregator": "agg",
                    "k": 2,
                    "roles": {"dataset": "kitchen questions", "task": "answer cooking questions", "model": "rolegen"},
                }
            },
        }
    )
    return SMoAPipeline(
        "s", config.pipeline("s"), local_agents(config, transport=recorder), models=config.models, role_cache=RoleCache(cache_dir)
    )


def _sim_config(role_reply: str) -> SimulatorConfig:
    return SimulatorConfig(
        latency_ms=5,
        models={
            "id-rolegen": Behaviour(latency_ms=5, reply=role_reply),
            "id-agg": Behaviour(latency_ms=5, reply=json.dumps({"chosen_responses": [1, 2]})),
        },
    )


def test_roles_are_generated_once_then_cached(simulator, tmp_path):
    sim = simulator(_sim_config(json.dumps({"roles": ROLES})))
    first = asyncio.run(_pipeline(sim, tmp_path).run("How do I caramelise onions?")).trace
    assert sim.stats.by_model["id-rolegen"] == 1
    assert first.roles == DESCRIBED and first.roles_source == "generated"
    (role_call,) = [c for c in first.calls if c.role == "roles"]
    assert first.accounting is not None
    assert role_call.layer == 0 and first.accounting.by_layer["0"].calls == 1
    # each proposer got its own role as a system message: its prompt = role + question
    proposers = [c for c in first.calls if c.role == "proposer"]
    for call, role in zip(proposers, DESCRIBED, strict=False):
        assert call.prompt_tokens == len(role_system(role).split()) + len("How do I caramelise onions?".split())
    # a fresh pipeline (a new process) finds the roles on disk: no second role call
    second = asyncio.run(_pipeline(sim, tmp_path).run("Why does bread rise?")).trace
    assert sim.stats.by_model["id-rolegen"] == 1
    assert second.roles == DESCRIBED and second.roles_source == "cache"
    assert not [c for c in second.calls if c.role == "roles"]


def test_same_pipeline_memoises_roles(simulator, tmp_path):
    sim = simulator(_sim_config(json.dumps({"roles": ROLES})))
    pipeline = _pipeline(sim, tmp_path)

    async def twice():
        return await asyncio.gather(pipeline.run("a?"), pipeline.run("b?"))

    asyncio.run(twice())
    assert sim.stats.by_model["id-rolegen"] == 1  # concurrent first requests share one role call


def test_partial_roles_are_retried_with_the_next_seed_and_not_cached(simulator, tmp_path):
    sim = simulator(_sim_config(json.dumps({"roles": [*ROLES[:2], ROLES[0]]})))  # a repeated role
    recorder = Recorder()
    pipeline = _pipeline(sim, tmp_path, recorder)

    async def twice():
        return [(await pipeline.run("q?")).trace for _ in range(2)]

    first, _second = asyncio.run(twice())
    assert first.roles == DESCRIBED[:2] and "only 2 of 3" in first.roles_source
    assert [c.index for c in first.calls if c.role == "roles"] == [0, 1]  # one retry within the request
    role_calls = [b for b in recorder.bodies if b["model"] == "id-rolegen"]
    assert [b["seed"] for b in role_calls] == [0, 1, 2, 3]  # the next request tried again, with new seeds
    assert all(b["response_format"] == {"type": "json_object"} and b["max_tokens"] == 288 for b in role_calls)
    assert not list(tmp_path.glob("roles/*.json"))


def test_failed_role_call_runs_without_roles(simulator, tmp_path):
    sim = simulator(SimulatorConfig(latency_ms=5, models={"id-rolegen": Behaviour(latency_ms=5, failure_rate=1.0)}))
    result = asyncio.run(_pipeline(sim, tmp_path).run("q?"))
    assert result.trace.roles == [] and "failed 2 times" in result.trace.roles_source
    assert result.answer  # the request still answers
