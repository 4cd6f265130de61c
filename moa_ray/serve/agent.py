"""The agent deployment: one Ray Serve deployment per model that runs in-process (llama.cpp) or
calls a provider over HTTP; vLLM models are Ray Serve LLM deployments (:mod:`moa_ray.serve.llm`)
that speak the same ``agent_chat`` / ``agent_stream`` protocol.

Backend errors are returned as data (``{"error": ...}``) rather than raised, so
the driver rebuilds the exact :class:`~moa_ray.errors.BackendError` subclass
instead of unwrapping a ``RayTaskError``. The replica redacts its provider key
from them first, and from its own log: errors end up in traces, Parquet rows
and HTTP bodies far from here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from pydantic import TypeAdapter
from ray import serve

from moa_ray.backends import create_backend
from moa_ray.chat import ChatRequest
from moa_ray.config import ModelSpec
from moa_ray.errors import BackendError
from moa_ray.pipeline.limits import replica_backend
from moa_ray.serve.auth import Redactor
from moa_ray.streaming import coalesce

log = logging.getLogger("moa_ray.agent")
_MODEL_SPEC: TypeAdapter[Any] = TypeAdapter(ModelSpec)


def replica_info(name: str, spec: Any) -> dict[str, Any]:
    """Which model a replica serves, and where (placement checks, the health test): every agent deployment's ``info``."""
    import ray

    return {
        "name": name,
        "model": spec.model,
        "backend": spec.backend,
        "node_id": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
        "niceness": os.nice(0),
    }


@serve.deployment
class AgentDeployment:
    """Hosts one model's backend; replicas, placement and concurrency come from its ``ModelSpec``."""

    _closed = True  # until __init__ has a backend: a replica that failed to start has nothing to close

    def __init__(self, name: str, spec: dict[str, Any]) -> None:
        self.name = name
        self.spec = _MODEL_SPEC.validate_python(spec)
        self.backend = create_backend(self.spec)
        self._calls = replica_backend(self.backend, name, self.spec)  # a limited model's retries take room here
        self._closed = False  # a backend to close from here on
        self._redactor = Redactor.for_models([self.spec])

    def _error(self, err: BackendError) -> dict[str, Any]:
        """The error as data for the caller, logged here; the provider key redacted from both."""
        log.warning("%s: %s", self.name, self._redactor.text(str(err)))
        return {"error": self._redactor.json(err.to_dict())}

    async def agent_chat(self, request: dict[str, Any]) -> dict[str, Any]:
        req = ChatRequest.model_validate(request)
        try:
            completion = await self._calls.chat(req.messages, req.params)
        except BackendError as err:
            return self._error(err)
        return {"completion": completion.model_dump()}

    async def agent_stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        req = ChatRequest.model_validate(request)
        try:
            async for chunk in coalesce(self._calls.stream(req.messages, req.params)):  # fewer messages per answer
                yield {"chunk": chunk.model_dump()}
        except BackendError as err:
            yield self._error(err)

    async def info(self) -> dict[str, Any]:
        return replica_info(self.name, self.spec)

    async def check_health(self) -> None:
        """Serve calls this periodically; a raise marks the replica unhealthy and Serve replaces it."""
        await self.backend.check_health()

    async def aclose(self) -> None:
        """Close the backend (its HTTP client); once: later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        await self.backend.aclose()

    def __del__(self) -> Coroutine[Any, Any, None] | None:
        """Ray Serve's shutdown hook: Serve calls ``__del__`` as it stops the replica and awaits the coroutine it
        returns (as it awaits an ``async def __del__``), which closes the backend.

        Not ``async def`` itself: the interpreter calls ``__del__`` once more when it frees the object, and an async
        one would leave a coroutine nobody awaits. Once closed (by Serve, or by ``aclose`` outside Serve) there is
        nothing to return."""
        return None if self._closed else self.aclose()
