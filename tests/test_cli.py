"""The ``moa-ray`` CLI: config validate/show (no Ray), and ``run`` on the session's Ray against the simulator."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner
from config_support import ISSUE_EXAMPLE

from bench.simulator import Behaviour, SimulatorConfig, run_simulator
from moa_ray.cli import main
from moa_ray.config import load_presets, parse_config


def invoke(*args: str):
    return CliRunner(env={"COLUMNS": "200"}).invoke(main, list(args))


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    path = tmp_path / "good.yaml"
    path.write_text(ISSUE_EXAMPLE)
    return path


# --------------------------------------------------------------------------- config (no Ray)


def test_validate_accepts_a_good_config(good_file):
    result = invoke("config", "validate", str(good_file))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "ok: 2 models, 1 pipelines (my-moa)"


def test_validate_rejects_a_bad_config_naming_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(ISSUE_EXAMPLE.replace("- [qwen, smol]\n", "- [qwen, smoll]\n"))
    result = invoke("config", "validate", str(bad))
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "config error:" in result.stderr
    assert "pipelines.my-moa.layers[1][1].model: unknown model 'smoll'" in result.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "config file not found"),
        ("models: [unclosed\n", "invalid YAML"),
        ("", "top level must be a mapping"),
    ],
)
def test_validate_reports_unreadable_files(tmp_path, content, message):
    path = tmp_path / "cfg.yaml"
    if content is not None:
        path.write_text(content)
    result = invoke("config", "validate", str(path))
    assert result.exit_code == 2 and message in result.stderr


def test_show_prints_the_presets_with_defaults_filled_in():
    result = invoke("config", "show")
    assert result.exit_code == 0
    shown = yaml.safe_load(result.stdout)
    assert {"embedded", "moa", "moa-lite"} <= set(shown["pipelines"])
    assert shown["models"]["smollm2"]["num_replicas"] == 1  # a default, not written in the preset
    assert parse_config(shown) == load_presets()


def test_show_prints_a_file(good_file):
    result = invoke("config", "show", str(good_file))
    assert result.exit_code == 0
    shown = yaml.safe_load(result.stdout)
    assert shown["models"]["qwen"]["max_retries"] == 3 and shown["models"]["qwen"]["temperature"] == 0.7  # defaults
    assert shown["pipelines"]["my-moa"]["layers"][0]["proposers"][2]["system"] == "You are a careful fact checker."
    assert "TOGETHER_API_KEY" in result.stdout


def test_run_fails_before_ray_on_bad_input(good_file, monkeypatch):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not start for bad input")

    monkeypatch.setattr("moa_ray.runtime.init_ray", no_ray)
    monkeypatch.setattr("moa_ray.serve.deploy.deploy_models", no_ray)
    unknown = invoke("run", "hi", "--config", str(good_file), "--pipeline", "nope")
    assert unknown.exit_code == 2 and "unknown pipeline 'nope' (known pipelines: my-moa)" in unknown.stderr
    empty = invoke("run", "   ", "--config", str(good_file), "--pipeline", "my-moa")
    assert empty.exit_code == 2 and "the prompt is empty" in empty.stderr
    bad_tokens = invoke("run", "hi", "--max-tokens", "0")
    assert bad_tokens.exit_code == 2


# --------------------------------------------------------------------------- run (session Ray + simulator)


def _sim_config_file(tmp_path: Path, base_url: str) -> Path:
    def model(name: str) -> dict:
        return {"backend": "openai", "model": f"sim/{name}", "base_url": base_url, "max_retries": 0}

    data = {
        "models": {"p1": model("p1"), "p2": model("p2"), "agg": model("agg"), "down": model("down")},
        "pipelines": {
            "tiny": {"kind": "moa", "layers": [["p1", "p2"]], "aggregator": "agg"},
            "broken": {"kind": "moa", "layers": [["down"]], "aggregator": "agg"},
        },
    }
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def sim_file(tmp_path_factory, ray_session):
    """One simulator and one config for the module, so the CLI's agents application is deployed once."""
    from ray import serve

    sim_config = SimulatorConfig(latency_ms=20, output_tokens=40, models={"sim/down": Behaviour(failure_rate=1.0)})
    with run_simulator(sim_config) as sim:
        yield _sim_config_file(tmp_path_factory.mktemp("cli"), sim.base_url)
    serve.delete("moa-agents")  # the CLI's application


@pytest.mark.ray
def test_run_json_prints_one_object_with_answer_pipeline_and_trace(sim_file):
    result = invoke("run", "Why is the sky blue?", "--config", str(sim_file), "--pipeline", "tiny", "--json", "--max-tokens", "9")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)  # stdout holds exactly one JSON object
    assert set(out) == {"answer", "pipeline", "trace"}
    assert out["pipeline"] == "tiny" and len(out["answer"].split()) == 9
    trace = out["trace"]
    assert {"wall_s", "layers", "calls"} <= set(trace)
    assert trace["wall_s"] > 0
    assert [(layer["layer"], layer["role"]) for layer in trace["layers"]] == [(1, "proposer"), (2, "aggregator")]
    assert [(c["layer"], c["role"], c["model"], c["status"]) for c in trace["calls"]] == [
        (1, "proposer", "p1", "ok"),
        (1, "proposer", "p2", "ok"),
        (2, "aggregator", "agg", "ok"),
    ]
    assert all(c["prompt_tokens"] > 0 and c["completion_tokens"] > 0 and c["latency_s"] > 0 for c in trace["calls"])
    assert trace["calls"][-1]["completion_tokens"] == 9
    assert trace["tokens"]["calls"] == 3


@pytest.mark.ray
def test_run_prints_the_answer_and_a_layer_table(sim_file):
    result = invoke("run", "Why is the sky blue?", "--config", str(sim_file), "--pipeline", "tiny", "--max-tokens", "5")
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.split()) == 5  # only the answer on stdout
    assert "tiny (moa)" in result.stderr and "p1, p2" in result.stderr and "aggregator" in result.stderr


@pytest.mark.ray
def test_run_json_reports_a_failed_pipeline_with_its_trace(sim_file):
    result = invoke("run", "Why?", "--config", str(sim_file), "--pipeline", "broken", "--json")
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert out["pipeline"] == "broken" and "every proposer failed" in out["error"]
    assert out["trace"]["calls"][0]["status"] == "error"
    assert "error:" in result.stderr


def _every_command(group: click.Group, path: str = "moa-ray") -> Iterator[tuple[str, click.Command]]:
    yield path, group
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _every_command(command, f"{path} {name}")
        else:
            yield f"{path} {name}", command


#: Commands whose option of a shared flag is their own on purpose (command, flag): why.
OWN_OPTIONS = {("moa-ray eval judge", "--max-tokens"): "the judge's output cap (default 1024), not the answer's"}


@pytest.mark.parametrize("flag", ["--config", "--address", "--timeout", "--max-tokens", "--app-name", "--json"])
def test_a_shared_option_is_the_same_wherever_it_appears(flag: str) -> None:
    """moa_ray/cli/options.py defines them once: every command that takes one (two at least) takes the same parameter:
    name, type, default (``--app-name``'s is each command's own application); only the help text may be its own."""
    found = {
        path: (param.name, repr(param.type), None if flag == "--app-name" else param.default, param.is_flag)
        for path, command in _every_command(main)
        for param in command.params
        if isinstance(param, click.Option) and flag in param.opts and (path, flag) not in OWN_OPTIONS
    }
    assert len(found) >= 2 and len(set(found.values())) == 1, found
