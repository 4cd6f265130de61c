"""Config loading: the issue's example, errors that name their field, presets, and Serve options."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from config_support import ISSUE_EXAMPLE

from moa_ray.config import (
    LlamaCppModelSpec,
    MoAPipelineSpec,
    OpenAIModelSpec,
    dump_config,
    load_config,
    load_presets,
    parse_config,
)
from moa_ray.errors import ConfigError


def example() -> dict[str, Any]:
    return yaml.safe_load(ISSUE_EXAMPLE)


# --------------------------------------------------------------------------- the issue's example


def test_issue_example_loads_from_yaml(tmp_path):
    path = tmp_path / "moa.yaml"
    path.write_text(ISSUE_EXAMPLE)
    cfg = load_config(path)

    qwen, smol = cfg.models["qwen"], cfg.models["smol"]
    assert isinstance(qwen, OpenAIModelSpec) and qwen.base_url == "http://127.0.0.1:8000/v1"
    assert qwen.api_key_env == "TOGETHER_API_KEY"
    assert isinstance(smol, LlamaCppModelSpec) and smol.n_threads == 2

    pipe = cfg.pipeline("my-moa")
    assert isinstance(pipe, MoAPipelineSpec)
    assert [[p.model for p in layer.proposers] for layer in pipe.layers] == [["qwen", "smol", "smol"], ["qwen", "smol"]]
    role = pipe.layers[0].proposers[2]
    assert (role.temperature, role.system) == (1.0, "You are a careful fact checker.")
    assert pipe.layers[0].proposers[0].temperature is None  # falls back to the model's default
    assert pipe.aggregator.model == "qwen"
    assert list(cfg.models_for(["my-moa"])) == ["qwen", "smol"]


def test_dumped_config_loads_back_identically(tmp_path):
    cfg = parse_config(example())
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_pipeline_quorum_defaults_fill_every_layer():
    data = example()
    data["pipelines"]["my-moa"].update(min_responses=3, layer_deadline_s=2.5)
    data["pipelines"]["my-moa"]["layers"][1] = {"proposers": ["qwen", "smol"], "deadline_s": 9}
    layers = parse_config(data).pipeline("my-moa").resolved_layers()
    assert [(layer.min_responses, layer.deadline_s) for layer in layers] == [(3, 2.5), (2, 9)]  # capped at the layer's size


# --------------------------------------------------------------------------- errors name their field


def _set(path: list[Any], value: Any) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


def _pop(path: list[Any]) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        node = data
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return mutate


def _update(path: list[Any], **values: Any) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        node = data
        for key in path:
            node = node[key]
        node.update(values)

    return mutate


PIPE = ["pipelines", "my-moa"]
INVALID = {
    "unknown model in a layer": (
        _set([*PIPE, "layers", 1, 0], "qwen3"),
        "pipelines.my-moa.layers[1][0].model: unknown model 'qwen3'",
    ),
    "unknown aggregator": (_set([*PIPE, "aggregator"], "gpt-9"), "pipelines.my-moa.aggregator.model: unknown model 'gpt-9'"),
    "empty layer": (_set([*PIPE, "layers", 1], []), "pipelines.my-moa.layers[1].proposers: List should have at least 1 item"),
    "no layers": (_set([*PIPE, "layers"], []), "pipelines.my-moa.layers: List should have at least 1 item"),
    "layers not a list": (_set([*PIPE, "layers"], "qwen"), "pipelines.my-moa.layers: Input should be a valid list"),
    "unknown backend": (_set(["models", "qwen", "backend"], "bogus"), "models.qwen.backend: Input tag 'bogus'"),
    "missing backend": (_pop(["models", "smol", "backend"]), "models.smol.backend:"),
    "model temperature < 0": (
        _set(["models", "smol", "temperature"], -0.1),
        "models.smol.temperature: Input should be greater than or equal to 0",
    ),
    "proposer temperature < 0": (
        _set([*PIPE, "layers", 0, 2, "temperature"], -1),
        "pipelines.my-moa.layers[0].proposers[2].temperature: Input should be greater than or equal to 0",
    ),
    "proposer without model": (
        _set([*PIPE, "layers", 0, 0], {"temperature": 0.3}),
        "pipelines.my-moa.layers[0].proposers[0].model: Field required",
    ),
    "missing aggregator": (_pop([*PIPE, "aggregator"]), "pipelines.my-moa.aggregator: Field required"),
    "aggregator max_tokens 0": (
        _set([*PIPE, "aggregator"], {"model": "qwen", "max_tokens": 0}),
        "pipelines.my-moa.aggregator.max_tokens: Input should be greater than or equal to 1",
    ),
    "unknown pipeline kind": (_set([*PIPE, "kind"], "mao"), "pipelines.my-moa.kind: Input tag 'mao'"),
    "smoa k equal to n": (_update(PIPE, kind="smoa", k=2), "pipelines.my-moa: k (2) must be smaller than the 2 proposers of layers[1]"),
    "smoa k above n": (_update(PIPE, kind="smoa", k=3), "pipelines.my-moa: k (3) must be smaller than the 3 proposers of layers[0]"),
    "base_url without scheme": (
        _set(["models", "qwen", "base_url"], "127.0.0.1:8000/v1"),
        "models.qwen.base_url: base_url must start with http:// or https://",
    ),
    "min_responses above n": (
        _set([*PIPE, "layers", 1], {"proposers": ["qwen", "smol"], "min_responses": 3}),
        "pipelines.my-moa.layers[1]: min_responses (3) exceeds the layer's 2 proposers",
    ),
    "misspelt field": (_set(["models", "qwen", "temprature"], 0.5), "models.qwen.temprature: Extra inputs are not permitted"),
    "autoscaling bounds": (
        _set(["models", "qwen", "autoscaling"], {"min_replicas": 3, "max_replicas": 2}),
        "models.qwen.autoscaling: min_replicas (3) exceeds max_replicas (2)",
    ),
    "negative num_cpus": (_set(["models", "smol", "num_cpus"], -1), "models.smol.num_cpus: Input should be greater than or equal to 0"),
    "no models": (_set(["models"], {}), "models: Dictionary should have at least 1 item"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_config_names_the_offending_field(case):
    mutate, expected = INVALID[case]
    data = copy.deepcopy(example())
    mutate(data)
    with pytest.raises(ConfigError) as info:
        parse_config(data, "moa.yaml")
    message = str(info.value)
    assert message.startswith("invalid config moa.yaml:")
    assert expected in message
    assert "function-before" not in message and "errors.pydantic.dev" not in message


@pytest.mark.parametrize(
    "value",
    [
        "sk-proj-abcdefghijklmnop0123456789",
        "sk_live_abcdefghij0123456789",
        "hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345",
        "3f9a1c0e5b7d2a4c6e8f0a1b3c5d7e9f1a3b5c7d9e1f3a5b7c9d1e3f5a7b9c1d",  # hex key (Together style)
        "ab12cd34ef56ab12cd34ef56ab12cd34",
        "gsk_abcdef",
        "",
    ],
)
def test_api_key_env_rejects_values_that_look_like_keys_without_echoing_them(value):
    data = example()
    data["models"]["qwen"]["api_key_env"] = value
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert "models.qwen.api_key_env" in str(info.value)
    if value:
        assert value not in str(info.value)


@pytest.mark.parametrize("name", ["TOGETHER_API_KEY", "OPENAI_API_KEY", "MY_KEY_2", "_PRIVATE"])
def test_api_key_env_accepts_variable_names(name):
    data = example()
    data["models"]["qwen"]["api_key_env"] = name
    assert parse_config(data).models["qwen"].api_key_env == name


def test_every_error_is_reported_at_once():
    data = example()
    data["models"]["smol"]["temperature"] = -1
    data["models"]["qwen"]["base_url"] = "ftp://x"
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    message = str(info.value)
    assert "models.smol.temperature" in message and "models.qwen.base_url" in message


def test_file_errors_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("models: {qwen: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad_yaml)
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(not_mapping)


def test_unknown_pipeline_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown pipeline 'nope' \(known pipelines: my-moa\)"):
        parse_config(example()).pipeline("nope")


# --------------------------------------------------------------------------- presets


def test_presets_load_with_the_papers_recipes():
    cfg = load_presets()
    assert load_config(None) == cfg
    assert {"embedded", "moa", "moa-lite"} <= set(cfg.pipelines)

    moa, lite = cfg.pipeline("moa"), cfg.pipeline("moa-lite")
    assert [len(layer.proposers) for layer in moa.layers] == [6, 6]  # 3 layers counting the aggregator
    assert moa.aggregator.model == "qwen1.5-110b"
    assert [len(layer.proposers) for layer in lite.layers] == [6]  # 2 layers
    assert lite.aggregator.model == "qwen1.5-72b"
    for name in cfg.models_for(["moa", "moa-lite"]):
        spec = cfg.models[name]
        assert isinstance(spec, OpenAIModelSpec) and spec.api_key_env and spec.temperature == 0.7


def test_embedded_preset_is_one_local_model_made_diverse():
    cfg = load_presets()
    pipe = cfg.pipeline("embedded")
    assert set(cfg.models_for(["embedded"])) == {"smollm2"}
    spec = cfg.models["smollm2"]
    assert isinstance(spec, LlamaCppModelSpec) and spec.model == "smollm2-135m-instruct"
    proposers = pipe.layers[0].proposers
    assert len({(p.temperature, p.system) for p in proposers}) == len(proposers) >= 3


# --------------------------------------------------------------------------- Serve options


def _openai(**extra: Any) -> OpenAIModelSpec:
    """A remote model with a deployment of its own (hosting: deployment), as these placement tests need."""
    return OpenAIModelSpec(backend="openai", model="m", base_url="http://127.0.0.1:1/v1", **{"hosting": "deployment", **extra})


def test_remote_models_reserve_a_sliver_of_cpu():
    spec = _openai()
    assert spec.ray_actor_options()["num_cpus"] < 0.1
    data = {
        "models": {f"remote-{i}": {"backend": "openai", "model": f"m{i}", "base_url": "http://127.0.0.1:1/v1"} for i in range(12)},
    }
    cfg = parse_config(data)
    total = sum(spec.deployment_options()["ray_actor_options"]["num_cpus"] for spec in cfg.models.values())
    assert total <= 2 - 1  # a dozen remote models leave a 2-core machine a whole core


def test_embedded_model_reserves_a_cpu_and_vllm_a_gpu():
    cfg = parse_config({"models": {"smol": {"backend": "llamacpp", "model": "x.gguf"}, "big": {"backend": "vllm", "model": "q"}}})
    assert cfg.models["smol"].ray_actor_options() == {"num_cpus": 1.0}
    assert cfg.models["big"].ray_actor_options()["num_gpus"] == 1


def test_placement_and_scaling_flow_into_deployment_options():
    spec = _openai(
        num_cpus=0.5,
        num_gpus=1,
        pool="pool-a100",
        resources={"accelerator_type:A100": 0.01},
        label_selector={"ray.io/accelerator-type": "A100"},
        num_replicas=3,
        max_ongoing_requests=7,
    )
    assert spec.deployment_options() == {
        "ray_actor_options": {
            "num_cpus": 0.5,
            "num_gpus": 1,
            "resources": {"accelerator_type:A100": 0.01, "pool-a100": 1.0},
            "label_selector": {"ray.io/accelerator-type": "A100"},
        },
        "max_ongoing_requests": 7,
        "num_replicas": 3,
    }


def test_autoscaling_replaces_num_replicas():
    spec = _openai(autoscaling={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8})
    opts = spec.deployment_options()
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}


def test_ray_serve_accepts_the_deployment_options():
    """The options are valid for Ray Serve itself, not only shaped like them."""
    from moa_ray.serve.agent import AgentDeployment
    from moa_ray.serve.builder import agent_deployment_name, build_agent

    spec = _openai(num_gpus=1, pool="gpu-pool", label_selector={"zone": "a"}, num_replicas=2, max_ongoing_requests=5)
    deployment = AgentDeployment.options(name=agent_deployment_name("x"), **spec.deployment_options())
    assert deployment.name == "agent-x"
    assert deployment.ray_actor_options == spec.ray_actor_options()
    assert deployment.num_replicas == 2 and deployment.max_ongoing_requests == 5
    scaled = _openai(autoscaling={"min_replicas": 0, "max_replicas": 3})
    AgentDeployment.options(**scaled.deployment_options())  # raises if Serve rejects the autoscaling config
    assert build_agent("x", spec) is not None


def test_error_paths_keep_names_that_equal_a_union_tag():
    """A model named ``vllm`` or a pipeline named ``moa`` (as in the shipped presets) keeps its name in the error path."""
    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "models": {"vllm": {"backend": "vllm", "model": "x", "max_tokens": 0}},
                "pipelines": {"moa": {"kind": "moa", "layers": [[{"model": "vllm", "temperature": 9}]], "aggregator": "vllm"}},
            }
        )
    message = str(info.value)
    assert "models.vllm.max_tokens:" in message
    assert "pipelines.moa.layers[0].proposers[0].temperature:" in message
