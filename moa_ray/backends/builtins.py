"""Two of the built-in backends: OpenAI-compatible HTTP services and llama.cpp GGUF models. The third, vLLM under
Ray Serve LLM, is described beside its Serve code (:data:`moa_ray.serve.llm.VLLM`), as a plugin would be.

Loaded by :mod:`moa_ray.backends.registry` like any plugin. Each engine is imported where a model of it is made
(an in-process backend created, a deployment built), never here: validating a config imports no engine.
"""

from __future__ import annotations

from moa_ray.backends.base import ChatBackend
from moa_ray.backends.llamacpp import LlamaCppBackend, llamacpp_tools_unsupported
from moa_ray.backends.registry import BackendDescriptor
from moa_ray.config import LlamaCppModelSpec, OpenAIModelSpec

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
