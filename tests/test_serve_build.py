"""The served application and `moa-ray serve build`: options flow from the config into Serve (no Ray needed)."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner
from ray.serve.schema import ServeDeploySchema

from moa_ray.cli import main
from moa_ray.config import parse_config
from moa_ray.errors import ConfigError
from moa_ray.serve.app import APP_BUILDER_IMPORT_PATH, AppArgs, app_builder, build_app, serve_config
from moa_ray.serve.builder import PRIORITY_ENV_VARS, SINGLE_LOOP_ENV_VARS
from moa_ray.serve.ingress import INGRESS_DEPLOYMENT

AGENT_RUNTIME_ENV = {"env_vars": {**PRIORITY_ENV_VARS, **SINGLE_LOOP_ENV_VARS}}

CONFIG = {
    "models": {
        "big": {
            "backend": "openai",
            "model": "org/big",
            "base_url": "http://big.internal/v1",
            "hosting": "deployment",
            "api_key_env": "BIG_KEY",
            "pool": "pool_big",
            "num_gpus": 2,
            "max_ongoing_requests": 32,
            "autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8, "upscale_delay_s": 5},
        },
        "small": {
            "backend": "openai",
            "model": "org/small",
            "base_url": "http://small.internal/v1",
            "hosting": "deployment",
            "pool": "pool_small",
            "num_gpus": 0.5,
            "num_replicas": 3,
            "resources": {"ssd": 1},
        },
        "unused": {"backend": "openai", "model": "org/unused"},
    },
    "pipelines": {
        "mix": {"kind": "moa", "layers": [["big", "small"]], "aggregator": "big"},
        "solo": {"kind": "moa", "layers": [["small"]], "aggregator": "small"},
    },
    "server": {"max_tokens_limit": 1024, "ingress": {"autoscaling": {"min_replicas": 2, "max_replicas": 6}, "num_cpus": 0.5}},
}


@pytest.fixture
def config():
    return parse_config(CONFIG)


def _deployments(app) -> dict:
    """name -> Deployment of the ingress and its children."""
    root = app._bound_deployment
    out = {root.name: root}
    for child in root.init_kwargs.values():
        out[child._bound_deployment.name] = child._bound_deployment
    return out


def test_app_binds_one_agent_per_called_model_under_the_ingress(config):
    deployments = _deployments(build_app(config))
    assert set(deployments) == {INGRESS_DEPLOYMENT, "agent-big", "agent-small"}  # "unused" is not deployed
    ingress = deployments[INGRESS_DEPLOYMENT]
    assert ingress.init_args[1] == ["mix", "solo"]
    assert parse_config(ingress.init_args[0]) == config  # the config travels whole, defaults filled in


def test_autoscaling_and_placement_flow_into_serve(config):
    deployments = _deployments(build_app(config))
    big, small, ingress = deployments["agent-big"], deployments["agent-small"], deployments[INGRESS_DEPLOYMENT]
    assert big.ray_actor_options == {"num_cpus": 0.05, "num_gpus": 2, "resources": {"pool_big": 1.0}, "runtime_env": AGENT_RUNTIME_ENV}
    auto = big._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests, auto.upscale_delay_s) == (1, 4, 8, 5)
    assert big.max_ongoing_requests == 32
    assert small.num_replicas == 3 and small._deployment_config.autoscaling_config is None
    assert small.ray_actor_options["resources"] == {"ssd": 1, "pool_small": 1.0} and small.ray_actor_options["num_gpus"] == 0.5
    assert ingress.ray_actor_options == {"num_cpus": 0.5, "runtime_env": AGENT_RUNTIME_ENV}  # the agents' priority and loop
    assert ingress._deployment_config.autoscaling_config.max_replicas == 6


def test_only_the_named_pipelines_are_served(config):
    deployments = _deployments(build_app(config, ["solo"]))
    assert set(deployments) == {INGRESS_DEPLOYMENT, "agent-small"}
    with pytest.raises(ConfigError, match="unknown pipeline 'nope'"):
        build_app(config, ["nope"])
    with pytest.raises(ConfigError, match="no pipeline"):
        build_app(parse_config({"models": CONFIG["models"]}))


def test_serve_config_is_valid_and_carries_per_deployment_options(config):
    data = serve_config(config, host="0.0.0.0", port=9000, app_name="moa-prod")
    schema = ServeDeploySchema.model_validate(data)
    assert schema.http_options.host == "0.0.0.0" and schema.http_options.port == 9000
    (app,) = schema.applications
    assert app.name == "moa-prod" and app.import_path == APP_BUILDER_IMPORT_PATH and app.route_prefix == "/"
    by_name = {d.name: d for d in app.deployments}
    assert set(by_name) == {INGRESS_DEPLOYMENT, "agent-big", "agent-small"}
    assert by_name["agent-big"].autoscaling_config["max_replicas"] == 4
    assert by_name["agent-big"].ray_actor_options.resources == {"pool_big": 1.0}
    assert by_name["agent-big"].ray_actor_options.num_gpus == 2
    assert by_name["agent-small"].num_replicas == 3
    assert by_name[INGRESS_DEPLOYMENT].autoscaling_config["min_replicas"] == 2
    # moa-ray's own replicas run on one event loop each (the Serve config carries it, as serve.run does)
    for name in (INGRESS_DEPLOYMENT, "agent-big", "agent-small"):
        assert SINGLE_LOOP_ENV_VARS.items() <= by_name[name].ray_actor_options.runtime_env["env_vars"].items()


def test_vllm_replicas_keep_ray_serve_llms_threads():
    from moa_ray.serve.builder import agent_deployment_options

    cfg = parse_config(
        {"models": {"v": {"backend": "vllm", "model": "org/v"}}, "pipelines": {"p": {"kind": "moa", "layers": [["v"]], "aggregator": "v"}}}
    )
    env = agent_deployment_options("v", cfg.models["v"])["ray_actor_options"]["runtime_env"]["env_vars"]
    assert not SINGLE_LOOP_ENV_VARS.keys() & env.keys()


def test_serve_config_args_rebuild_the_same_app(config):
    args = serve_config(config)["applications"][0]["args"]
    rebuilt, direct = _deployments(app_builder(args)), _deployments(build_app(config))
    assert set(rebuilt) == set(direct)
    for name, deployment in direct.items():
        assert rebuilt[name].ray_actor_options == deployment.ray_actor_options
        assert rebuilt[name]._deployment_config == deployment._deployment_config


def test_app_args_from_a_path_and_bad_args(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    assert set(_deployments(app_builder({"config_path": str(path), "pipelines": ["solo"]}))) == {INGRESS_DEPLOYMENT, "agent-small"}
    with pytest.raises(ValueError, match="either config or config_path"):
        AppArgs.model_validate({"config": CONFIG, "config_path": str(path)})
    with pytest.raises(ValueError):
        AppArgs.model_validate({"config": CONFIG, "secret_keys": ["x"]})


def test_cli_serve_build_writes_a_deployable_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "serve.yaml"
    result = CliRunner().invoke(main, ["serve", "build", "--config", str(path), "--pipeline", "solo", "-o", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert text.startswith("# Generated by `moa-ray serve build`")
    data = yaml.safe_load(text)
    ServeDeploySchema.model_validate(data)
    app = data["applications"][0]
    assert app["args"]["pipelines"] == ["solo"]
    assert [d["name"] for d in app["deployments"]] == [INGRESS_DEPLOYMENT, "agent-small"]
    assert data["http_options"]["host"] == "127.0.0.1"  # loopback unless told otherwise
    assert "BIG_KEY" in text and "sk-" not in text  # the env var's name travels, never a key


def test_cli_serve_refuses_bad_input_before_starting_ray(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    runner = CliRunner()
    result = runner.invoke(main, ["serve", "--config", str(path), "--pipeline", "nope"])
    assert result.exit_code == 2 and "unknown pipeline 'nope'" in result.output
    monkeypatch.setenv("MOA_RAY_API_KEYS_FILE", str(tmp_path / "missing"))
    result = runner.invoke(main, ["serve", "--config", str(path)])
    assert result.exit_code == 2 and "MOA_RAY_API_KEYS_FILE" in result.output
    result = runner.invoke(main, ["serve", "build", "--config", str(tmp_path / "absent.yaml")])
    assert result.exit_code == 2 and "config file not found" in result.output


def test_cli_serve_refuses_a_taken_port_before_starting_ray(tmp_path, monkeypatch):
    import socket

    import moa_ray.runtime

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(moa_ray.runtime, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", "--config", str(path), "--port", str(port)])
    assert result.exit_code != 0 and f"cannot serve on 127.0.0.1:{port}: Address already in use" in result.output, result.output
