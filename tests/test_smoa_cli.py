"""`moa-ray run` for SMoA: the rendered judge/moderator facts and cost, role flags, accounting in --json."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner
from rich.console import Console

from bench.simulator import Behaviour, SimulatorConfig
from moa_ray.cli import main
from moa_ray.cli.render import trace_view
from moa_ray.config import parse_config
from moa_ray.errors import ConfigError
from moa_ray.pipeline.roles import override_roles
from moa_ray.pipeline.trace import CallRecord, LayerRecord, Trace


def _render(trace: Trace) -> str:
    console = Console(record=True, width=250)
    console.print(trace_view(trace))
    return console.export_text()


def test_view_shows_selection_stop_roles_and_unknown_costs():
    trace = Trace(pipeline="s", kind="smoa", stopped_at_layer=1, roles=["a chef", "a nurse"], roles_source="cache")
    trace.layers = [
        LayerRecord(layer=1, role="proposer", selected=[2, 0], stopped=True, stop_reason="they agree", judge_fallback="cut 3 picks to k=2"),
        LayerRecord(layer=2, role="aggregator"),
    ]
    trace.calls = [CallRecord(layer=1, index=i, role="proposer", model="m", prompt_tokens=5, completion_tokens=5) for i in range(3)]
    trace.calls += [
        CallRecord(layer=0, role="roles", model="m", prompt_tokens=50, completion_tokens=10, latency_s=0.4),
        CallRecord(layer=1, role="judge", model="m", prompt_tokens=40, completion_tokens=9),
        CallRecord(layer=2, role="aggregator", model="m", prompt_tokens=30, completion_tokens=7),
    ]
    text = _render(trace)
    assert "kept 3, 1 of 3" in text and "moderator stop: they agree" in text and "fallback: cut 3 picks" in text
    assert "roles (cache):" in text and "1. a chef" in text
    assert "unknown" in text and "moderator stopped after layer 1" in text
    assert "judge" in text and "roles" in text  # both the layer-0 row and the cost table


def test_override_roles_validates():
    cfg = parse_config(
        {
            "models": {"m": {"backend": "openai", "model": "m"}},
            "pipelines": {
                "moa": {"kind": "moa", "layers": [["m", "m"]], "aggregator": "m"},
                "s": {"kind": "smoa", "layers": [["m", "m", "m"]], "aggregator": "m"},
                "r": {"kind": "smoa", "layers": [["m", "m", "m"]], "aggregator": "m", "roles": {"dataset": "d0", "task": "t0"}},
            },
        }
    )
    assert override_roles(cfg, "s", "d", "t").pipelines["s"].roles.dataset == "d"
    assert cfg.pipelines["s"].roles is None  # the loaded config is not mutated
    assert override_roles(cfg, "r", None, "t1").pipelines["r"].roles.model_dump() == {"dataset": "d0", "task": "t1", "model": None}
    with pytest.raises(ConfigError, match="need an smoa pipeline"):
        override_roles(cfg, "moa", "d", "t")
    with pytest.raises(ConfigError, match="give both"):
        override_roles(cfg, "s", "d", None)


def test_cli_rejects_roles_for_other_kinds_before_ray(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "models": {"m": {"backend": "openai", "model": "m"}},
                "pipelines": {"moa": {"kind": "moa", "layers": [["m"]], "aggregator": "m"}},
            }
        )
    )
    result = CliRunner().invoke(main, ["run", "hi", "--config", str(path), "--pipeline", "moa", "--roles-task", "t"])
    assert result.exit_code == 2 and "need an smoa pipeline" in result.output


@pytest.mark.ray
def test_cli_run_json_has_selection_roles_and_accounting(ray_session, simulator, tmp_path, monkeypatch):
    from ray import serve

    sim = simulator(
        SimulatorConfig(
            latency_ms=5,
            models={
                "judge": Behaviour(latency_ms=5, reply=json.dumps({"reasoning": "same", "chosen_responses": [2, 1], "end_debate": True})),
                "agg": Behaviour(latency_ms=5, reply=json.dumps({"roles": ["a chef", "a nurse", "a pilot"]})),
            },
        )
    )
    models = {
        m: {
            "backend": "openai",
            "model": m,
            "base_url": sim.base_url,
            "num_cpus": 0.01,
            "parameters_b": 1,
            "pricing": {"input_per_mtok": 1, "output_per_mtok": 2},
        }
        for m in ("p", "judge", "agg")
    }
    cfg = {
        "models": models,
        "pipelines": {
            "s": {
                "kind": "smoa",
                "layers": [["p", "p", "p"]] * 2,
                "aggregator": "agg",
                "judge": "judge",
                "min_responses": 2,
                "layer_deadline_s": 5,
            }
        },
    }  # quorum settings through Serve handles
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("MOA_RAY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps tables to the terminal width
    args = ["run", "Plan a dinner.", "--config", str(path), "--pipeline", "s", "--roles-dataset", "recipes", "--roles-task", "plan meals"]
    try:
        result = CliRunner().invoke(main, [*args, "--json"])
        assert result.exit_code == 0, result.output
        out = json.loads(result.stdout.strip().splitlines()[-1])
        trace = out["trace"]
        assert trace["layers"][0]["selected"] == [1, 0] and trace["stopped_at_layer"] == 1
        assert trace["roles"] == ["a chef", "a nurse", "a pilot"] and trace["roles_source"] == "generated"
        acc = trace["accounting"]
        assert acc["totals"]["calls"] == len(trace["calls"]) and acc["totals"]["cost_usd"] > 0
        assert set(acc["by_role"]) == {"roles", "proposer", "judge", "aggregator"}
        # second run: roles from the disk cache, and the human view shows the judge's choice
        human = CliRunner().invoke(main, args)
        assert human.exit_code == 0, human.output
        assert "roles (cache):" in human.output and "kept 2, 1 of 3" in human.output and "moderator stop" in human.output
    finally:
        serve.delete("moa-agents")
