"""The agent deployment: one Ray Serve deployment per configured model.

Backend errors are returned as data (``{"error": ...}``) rather than raised, so
the driver rebuilds the exact :class:`~moa_ray.errors.BackendError` subclass
instead of unwrapping a ``RayTaskError``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from pydantic import TypeAdapter
from ray import serve

from moa_ray.backends import create_backend
from moa_ray.chat import ChatRequest
from moa_ray.config import ModelSpec
from moa_ray.errors import BackendError

log = logging.getLogger("moa_ray.agent")
_MODEL_SPEC: TypeAdapter[Any] = TypeAdapter(ModelSpec)


@serve.deployment
class AgentDeployment:
    """Hosts one model's backend; replicas, placement and concurrency come from its ``ModelSpec``."""

    def __init__(self, name: str, spec: dict[str, Any]) -> None:
        self.name = name
        self.spec = _MODEL_SPEC.validate_python(spec)
        self.backend = create_backend(self.spec)

    async def chat(self, request: dict[str, Any]) -> dict[str, Any]:
        req = ChatRequest.model_validate(request)
        try:
            completion = await self.backend.chat(req.messages, req.params)
        except BackendError as err:
            log.warning("%s: %s", self.name, err)
            return {"error": err.to_dict()}
        return {"completion": completion.model_dump()}

    async def stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        req = ChatRequest.model_validate(request)
        try:
            async for chunk in self.backend.stream(req.messages, req.params):
                yield {"chunk": chunk.model_dump()}
        except BackendError as err:
            log.warning("%s: %s", self.name, err)
            yield {"error": err.to_dict()}

    async def info(self) -> dict[str, Any]:
        """Which model this replica serves, and where (used by placement checks)."""
        import ray

        ctx = ray.get_runtime_context()
        return {
            "name": self.name,
            "model": self.spec.model,
            "backend": self.spec.backend,
            "node_id": ctx.get_node_id(),
            "pid": os.getpid(),
            "niceness": os.nice(0),
        }

    async def check_health(self) -> None:
        """Serve calls this periodically; a replica whose backend is gone is restarted."""
        if self.backend is None:
            raise RuntimeError(f"{self.name}: backend not loaded")
