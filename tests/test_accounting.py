"""Cost accounting: exact estimates, unknown facts stay unknown, and every breakdown sums to the totals."""

from __future__ import annotations

import asyncio
import json

import pytest
from pipeline_support import local_agents

from bench.simulator import Behaviour, SimulatorConfig
from moa_ray.config import parse_config
from moa_ray.pipeline import build_pipeline
from moa_ray.pipeline.accounting import account
from moa_ray.pipeline.roles import RoleCache
from moa_ray.pipeline.smoa import SMoAPipeline
from moa_ray.pipeline.trace import CallRecord, LayerRecord, Trace


def _models(**extra):
    return parse_config(
        {
            "models": {
                "big": {
                    "backend": "openai",
                    "model": "big",
                    "parameters_b": 70,
                    "pricing": {"input_per_mtok": 0.9, "output_per_mtok": 1.8},
                },
                "small": {
                    "backend": "openai",
                    "model": "small",
                    "parameters_b": 7,
                    "pricing": {"input_per_mtok": 0.2, "output_per_mtok": 0.2},
                },
                "mystery": {"backend": "openai", "model": "mystery"},
                **extra,
            }
        }
    ).models


def _trace() -> Trace:
    trace = Trace(pipeline="p", kind="smoa", wall_s=9.0, stopped_at_layer=1)
    trace.layers = [LayerRecord(layer=1, role="proposer", stopped=True), LayerRecord(layer=2, role="aggregator")]
    trace.calls = [
        CallRecord(layer=0, role="roles", model="big", prompt_tokens=100, completion_tokens=50, latency_s=0.3),
        CallRecord(layer=1, index=0, role="proposer", model="small", prompt_tokens=10, completion_tokens=90, latency_s=1.0),
        CallRecord(layer=1, index=1, role="proposer", model="big", prompt_tokens=10, completion_tokens=40, latency_s=2.0),
        CallRecord(layer=1, index=2, role="proposer", model="small", status="error", latency_s=0.1),
        CallRecord(layer=1, index=0, role="judge", model="big", prompt_tokens=300, completion_tokens=20, latency_s=0.5),
        CallRecord(layer=2, role="aggregator", model="big", prompt_tokens=200, completion_tokens=100, latency_s=1.0),
    ]
    return trace


def test_exact_tflops_cost_and_latency():
    acc = account(_trace(), _models())
    assert acc.totals.prompt_tokens == 620 and acc.totals.completion_tokens == 300 and acc.totals.calls == 6
    # TFLOPs = 2 x parameters x tokens: big 820 tokens x 70e9, small 100 tokens x 7e9
    assert acc.totals.tflops == pytest.approx(2 * 70e9 * 820 / 1e12 + 2 * 7e9 * 100 / 1e12)
    assert acc.by_role["judge"].tflops == pytest.approx(2 * 70e9 * 320 / 1e12)
    assert acc.by_role["judge"].cost_usd == pytest.approx((300 * 0.9 + 20 * 1.8) / 1e6)
    assert acc.by_model["small"].cost_usd == pytest.approx(100 * 0.2 / 1e6)
    assert acc.by_layer["0"].calls == 1 and acc.by_layer["1"].calls == 4
    # critical path: roles 0.3, then the slowest proposer 2.0, then the judge 0.5, then the aggregator 1.0
    assert acc.critical_path_s == pytest.approx(3.8)
    assert acc.sum_latency_s == pytest.approx(4.9)
    assert (acc.layers_run, acc.proposer_layers_run, acc.stopped_at_layer, acc.wall_s) == (2, 1, 1, 9.0)
    assert acc.unknown_parameters == [] and acc.unknown_pricing == []


def test_unknown_parameters_and_prices_are_unknown_not_zero():
    trace = _trace()
    trace.calls[1].model = "mystery"  # a proposer of a model without parameters_b or pricing
    acc = account(trace, _models())
    assert acc.totals.tflops is None and acc.totals.cost_usd is None
    assert acc.by_role["proposer"].tflops is None and acc.by_layer["1"].cost_usd is None
    assert acc.by_role["aggregator"].tflops is not None and acc.by_role["judge"].cost_usd is not None
    assert acc.by_model["mystery"].tflops is None and acc.by_model["mystery"].prompt_tokens == 10
    assert acc.unknown_parameters == ["mystery"] and acc.unknown_pricing == ["mystery"]
    dumped = json.loads(acc.model_dump_json())
    assert dumped["totals"]["tflops"] is None and dumped["totals"]["total_tokens"] == 920


def test_calls_without_tokens_cost_zero_even_when_unknown():
    trace = _trace()
    trace.calls[3].model = "mystery"  # the failed call: no tokens
    acc = account(trace, _models())
    assert acc.totals.tflops is not None and acc.unknown_parameters == ["mystery"]


def test_no_models_means_everything_unknown():
    acc = account(_trace(), None)
    assert acc.totals.tflops is None and acc.totals.cost_usd is None and acc.totals.total_tokens == 920
    assert set(acc.unknown_parameters) == {"big", "small"}


def _assert_consistent(acc) -> None:
    for field in ("prompt_tokens", "completion_tokens", "calls", "tflops", "cost_usd", "latency_s"):
        total = getattr(acc.totals, field)
        per_call = {
            "prompt_tokens": sum(c.prompt_tokens for c in acc.calls),
            "completion_tokens": sum(c.completion_tokens for c in acc.calls),
            "calls": len(acc.calls),
            "tflops": sum(c.tflops for c in acc.calls),
            "cost_usd": sum(c.cost_usd for c in acc.calls),
            "latency_s": total,
        }[field]
        for name, buckets in (("layer", acc.by_layer), ("role", acc.by_role), ("model", acc.by_model)):
            assert sum(getattr(b, field) for b in buckets.values()) == pytest.approx(total), (field, name)
        assert per_call == pytest.approx(total), field


def test_sums_agree_across_calls_layers_roles_and_models(simulator, tmp_path):
    names = ["p1", "p2", "p3", "judge", "agg"]
    sim = simulator(
        SimulatorConfig(
            latency_ms=5,
            output_tokens=20,
            models={
                "judge": Behaviour(latency_ms=5, reply=json.dumps({"chosen_responses": [3, 1], "end_debate": False})),
                "agg": Behaviour(latency_ms=5, reply=json.dumps({"roles": ["a nurse", "a pilot", "a poet"]})),
            },
        )
    )
    prices = {"input_per_mtok": 0.5, "output_per_mtok": 1.5}
    config = parse_config(
        {
            "models": {
                m: {"backend": "openai", "model": m, "base_url": sim.base_url, "parameters_b": 1 + i, "pricing": prices}
                for i, m in enumerate(names)
            },
            "pipelines": {
                "s": {
                    "kind": "smoa",
                    "layers": [["p1", "p2", "p3"]] * 2,
                    "aggregator": "agg",
                    "judge": "judge",
                    "k": 2,
                    "roles": {"dataset": "d", "task": "t"},
                }
            },
        }
    )
    pipe = SMoAPipeline("s", config.pipeline("s"), local_agents(config), models=config.models, role_cache=RoleCache(tmp_path))
    trace = asyncio.run(pipe.run("question?")).trace
    assert {c.role for c in trace.calls} == {"roles", "proposer", "judge", "aggregator"}
    acc = account(trace, config.models)
    _assert_consistent(acc)
    assert trace.accounting == acc  # the pipeline filled the trace itself
    assert trace.to_json_dict()["accounting"] == json.loads(acc.model_dump_json())  # and its JSON is the accounting's
    assert acc.totals.total_tokens == trace.totals().total_tokens and acc.totals.tflops > 0 and acc.totals.cost_usd > 0
    assert acc.critical_path_s < acc.sum_latency_s


def test_moa_trace_is_accounted_too(simulator):
    sim = simulator(SimulatorConfig(latency_ms=5))
    config = parse_config(
        {
            "models": {"m": {"backend": "openai", "model": "m", "base_url": sim.base_url, "parameters_b": 8}},
            "pipelines": {"moa": {"kind": "moa", "layers": [["m", "m"]], "aggregator": "m"}},
        }
    )
    pipe = build_pipeline(config, "moa", local_agents(config))
    trace = asyncio.run(pipe.run("q")).trace
    assert trace.accounting is not None
    assert trace.accounting.totals.tflops is not None and trace.accounting.totals.tflops > 0
    assert trace.accounting.totals.cost_usd is None and trace.accounting.unknown_pricing == ["m"]
    assert "accounting" in trace.to_json_dict()
