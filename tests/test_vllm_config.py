"""vLLM model specs -> Ray Serve LLM: validation, engine arguments, placement bundles and the Serve config.

Most of this needs neither Ray nor vLLM; the two tests that build a real ``LLMConfig`` (and compare our
options with Ray Serve LLM's own computation) need the vLLM route.
"""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner
from ray.serve.schema import ServeDeploySchema
from vllm_support import require_vllm

from moa_ray.cli import main
from moa_ray.config import load_config, parse_config
from moa_ray.errors import ConfigError
from moa_ray.packaged_models import hf_folder
from moa_ray.serve.builder import PRIORITY_ENV_VARS, agent_deployment_options
from moa_ray.serve.llm import engine_kwargs, llm_deployment_options
from moa_ray.serve.manifests import pools_for

BIG = {
    "backend": "vllm",
    "model": "Qwen/Qwen2.5-72B-Instruct",
    "tensor_parallel_size": 4,
    "accelerator_type": "A100",
    "pool": "pool_qwen",
    "max_model_len": 8192,
    "enable_prefix_caching": True,
    "engine_kwargs": {"kv_cache_dtype": "fp8"},
    "autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 16},
    "max_ongoing_requests": 48,
    "env_vars": {"VLLM_ATTENTION_BACKEND": "FLASH_ATTN"},
}


def cfg(**models):
    return parse_config(
        {
            "models": models,
            "pipelines": {"p": {"kind": "moa", "layers": [list(models)], "aggregator": next(iter(models))}},
        }
    )


def error_of(model: dict) -> str:
    with pytest.raises(ConfigError) as info:
        cfg(m=model)
    return str(info.value)


def test_gpus_come_from_the_parallelism_and_cpu_has_none():
    config = cfg(big=BIG, cpu={"backend": "vllm", "model": "smollm2-135m-instruct", "device": "cpu"})
    assert config.models["big"].num_gpus == 4 and config.models["cpu"].num_gpus == 0
    assert cfg(m={"backend": "vllm", "model": "q", "num_gpus": 1}).models["m"].num_gpus == 1  # explicit and equal: fine


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"num_gpus": 2}, "num_gpus (2) must equal tensor_parallel_size x pipeline_parallel_size"),
        ({"device": "cpu", "accelerator_type": "A100"}, "accelerator_type needs device: gpu"),
        ({"kv_cache_space_gib": 1}, "kv_cache_space_gib is for device: cpu"),
        ({"engine_kwargs": {"max_model_len": 4096}}, "engine_kwargs.max_model_len: set it with max_model_len"),
        ({"engine_kwargs": {"served_model_name": "x"}}, "served_model_name: set it with the config's model name"),
        ({"tensor_parallel_size": 2, "placement_group_bundles": [{"GPU": 1}]}, "placement_group_bundles has 1 bundles; the engine has 2"),
        ({"placement_strategy": "ANYWHERE"}, "placement_strategy"),
    ],
)
def test_inconsistent_vllm_specs_are_refused_with_the_field(extra, message):
    assert message in error_of({"backend": "vllm", "model": "q", **extra})


def test_engine_arguments_from_the_spec_then_engine_kwargs():
    spec = cfg(big=BIG).models["big"]
    assert engine_kwargs(spec) == {
        "dtype": "auto",
        "tensor_parallel_size": 4,
        "pipeline_parallel_size": 1,
        "enforce_eager": False,
        "gpu_memory_utilization": 0.9,
        "max_model_len": 8192,
        "enable_prefix_caching": True,
        "kv_cache_dtype": "fp8",
        "structured_outputs_config": {"backend": "guidance", "disable_any_whitespace": True},
    }
    cpu = load_config().models["smollm2-vllm"]  # the shipped preset: float32, eager, no GPU memory fraction
    assert engine_kwargs(cpu) == {
        "dtype": "float32",
        "tensor_parallel_size": 1,
        "pipeline_parallel_size": 1,
        "enforce_eager": True,
        "enable_chunked_prefill": False,  # seeded requests + chunked prefill crash vLLM's CPU engine
        "max_model_len": 4096,
        "structured_outputs_config": {"backend": "guidance", "disable_any_whitespace": True},
    }


def test_every_rank_gets_a_gpu_bundle_in_the_pool_and_the_replica_rides_on_the_first():
    options = llm_deployment_options("big", cfg(big=BIG).models["big"], PRIORITY_ENV_VARS)
    bundles = options["placement_group_bundles"]
    assert len(bundles) == 4
    assert bundles[0] == {"GPU": 1.0, "accelerator_type:A100": 0.001, "pool_qwen": 1.001, "CPU": 1.0}
    assert all(b == {"GPU": 1.0, "accelerator_type:A100": 0.001, "pool_qwen": 0.001} for b in bundles[1:])
    assert options["placement_group_strategy"] == "PACK"
    assert options["ray_actor_options"] == {
        "num_cpus": 1.0,
        "resources": {"pool_qwen": 1.0},
        "runtime_env": {"env_vars": {**PRIORITY_ENV_VARS, "VLLM_ATTENTION_BACKEND": "FLASH_ATTN"}},
    }
    assert options["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in options
    assert options["max_ongoing_requests"] == 48 and options["health_check_period_s"] == 10


def test_a_cpu_replica_takes_its_engine_core_and_its_kv_cache_size():
    spec = load_config().models["smollm2-vllm"]
    options = llm_deployment_options("smollm2-vllm", spec, PRIORITY_ENV_VARS)
    assert options["placement_group_bundles"] == [{"CPU": 2.0}]  # the replica's CPU + one engine worker
    assert options["ray_actor_options"]["runtime_env"]["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert options["num_replicas"] == 1


def test_pools_are_sized_from_the_bundles():
    config = cfg(big=BIG, small={"backend": "vllm", "model": "s", "pool": "pool_cpu", "device": "cpu", "num_replicas": 6})
    pools = {p.name: p for p in pools_for(config)}
    assert (pools["pool_qwen"].node_gpus, pools["pool_qwen"].min_nodes, pools["pool_qwen"].max_nodes) == (4, 1, 3)
    assert (pools["pool_cpu"].node_gpus, pools["pool_cpu"].max_nodes) == (0, 2)  # 6 replicas x 2 CPUs on 8-CPU nodes


def test_serve_build_with_vllm_models_is_a_valid_serve_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "models": {"big": BIG, "smol": load_config().models["smollm2-vllm"].model_dump(mode="json", exclude_none=True)},
                "pipelines": {"p": {"kind": "moa", "layers": [["big", "smol"]], "aggregator": "big"}},
            }
        )
    )
    out = tmp_path / "serve.yaml"
    result = CliRunner().invoke(main, ["serve", "build", "--config", str(path), "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    schema = ServeDeploySchema.model_validate(yaml.safe_load(out.read_text()))
    (app,) = schema.applications
    deployments = {d.name: d for d in app.deployments}
    assert (
        deployments["agent-big"].placement_group_bundles
        == llm_deployment_options("big", cfg(big=BIG).models["big"], PRIORITY_ENV_VARS)["placement_group_bundles"]
    )
    assert deployments["agent-smol"].placement_group_bundles == [{"CPU": 2.0}]


@pytest.mark.vllm
def test_the_llm_config_names_the_model_its_source_and_the_cpu():
    require_vllm()
    from moa_ray.serve.llm import llm_config

    spec = load_config().models["smollm2-vllm"]
    llm = llm_config("smollm2-vllm", spec, PRIORITY_ENV_VARS)
    assert llm.model_id == "smollm2-vllm"
    assert llm.model_loading_config.model_source == str(hf_folder("smollm2-135m-instruct"))
    assert llm.accelerator_config.kind == "cpu" and llm.accelerator_type is None
    assert llm.engine_kwargs["dtype"] == "float32" and llm.runtime_env["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] == "1"
    big = llm_config("big", cfg(big=BIG).models["big"], PRIORITY_ENV_VARS)
    assert big.model_loading_config.model_source == "Qwen/Qwen2.5-72B-Instruct" and big.accelerator_type == "A100"
    assert big.placement_group_config["bundles"][1] == {"GPU": 1.0, "accelerator_type:A100": 0.001, "pool_qwen": 0.001}


@pytest.mark.vllm
@pytest.mark.ray
def test_our_deployment_options_are_ray_serve_llms_own(ray_session):
    """What `moa-ray serve build` writes (computed without Ray) is what Ray Serve LLM computes from the LLMConfig."""
    require_vllm()
    from moa_ray.serve.llm import llm_config
    from moa_ray.serve.llm_server import MoALLMServer

    for name, spec in [("big", cfg(big=BIG).models["big"]), ("smollm2-vllm", load_config().models["smollm2-vllm"])]:
        ours = agent_deployment_options(name, spec)
        theirs = MoALLMServer.get_deployment_options(llm_config(name, spec, PRIORITY_ENV_VARS))
        theirs["ray_actor_options"]["runtime_env"].pop("worker_process_setup_hook", None)  # a no-op hook
        theirs["placement_group_bundles"] = [{k: v for k, v in b.items() if v} for b in theirs["placement_group_bundles"]]
        for key in ("health_check_period_s", "health_check_timeout_s"):  # Ray Serve LLM's defaults, applied after this step
            ours.pop(key)
        assert ours == theirs
