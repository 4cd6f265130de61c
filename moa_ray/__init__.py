"""moa-ray: Mixture-of-Agents and Sparse Mixture-of-Agents as a distributed LLM pipeline on Ray.

.. code-block:: python

    import moa_ray

    with moa_ray.session("my.yaml") as s:  # or None: the shipped presets
        result = s.run("moa", "What is Mixture-of-Agents?")
    print(result.answer, result.trace.summary())

The names below are the public API (:mod:`moa_ray.session` says what a session does). Importing the package is
cheap: the config and pipeline types load on first use, and Ray only when a session needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from moa_ray.errors import (
    AggregatorFailed,
    AuthenticationFailed,
    BackendError,
    BackendTimeout,
    BadRequest,
    ConfigError,
    ContextLengthExceeded,
    LayerFailed,
    MoARayError,
    PipelineError,
    RateLimited,
    StreamInterrupted,
    UpstreamError,
)

# Bound over the submodule of the same name on purpose (as ``moa_ray.session(...)`` reads); the module itself
# imports nothing heavy until a session opens.
from moa_ray.session import Session, session

if TYPE_CHECKING:
    from moa_ray.chat import ChatMessage, ChatParams, Completion, StreamChunk
    from moa_ray.config import MoARayConfig, dump_config, load_config, load_presets, parse_config
    from moa_ray.pipeline.base import CallEvent, Pipeline, PipelineResult
    from moa_ray.pipeline.structured import InvalidStructuredOutput
    from moa_ray.pipeline.trace import CallRecord, LayerRecord, Trace

__version__ = "0.1.0"

__all__ = [
    "AggregatorFailed",
    "AuthenticationFailed",
    "BackendError",
    "BackendTimeout",
    "BadRequest",
    "CallEvent",
    "CallRecord",
    "ChatMessage",
    "ChatParams",
    "Completion",
    "ConfigError",
    "ContextLengthExceeded",
    "InvalidStructuredOutput",
    "LayerFailed",
    "LayerRecord",
    "MoARayConfig",
    "MoARayError",
    "Pipeline",
    "PipelineError",
    "PipelineResult",
    "RateLimited",
    "Session",
    "StreamChunk",
    "StreamInterrupted",
    "Trace",
    "UpstreamError",
    "__version__",
    "dump_config",
    "load_config",
    "load_presets",
    "parse_config",
    "session",
]

#: Public names loaded on first use (pydantic models and the pipeline driver), by the module that defines them.
_LAZY = {
    "ChatMessage": "moa_ray.chat",
    "ChatParams": "moa_ray.chat",
    "Completion": "moa_ray.chat",
    "StreamChunk": "moa_ray.chat",
    "MoARayConfig": "moa_ray.config",
    "dump_config": "moa_ray.config",
    "load_config": "moa_ray.config",
    "load_presets": "moa_ray.config",
    "parse_config": "moa_ray.config",
    "CallEvent": "moa_ray.pipeline.base",
    "Pipeline": "moa_ray.pipeline.base",
    "PipelineResult": "moa_ray.pipeline.base",
    "InvalidStructuredOutput": "moa_ray.pipeline.structured",
    "CallRecord": "moa_ray.pipeline.trace",
    "LayerRecord": "moa_ray.pipeline.trace",
    "Trace": "moa_ray.pipeline.trace",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'moa_ray' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
