"""``MoALLMServer``: Ray Serve LLM's ``LLMServer`` that also speaks moa-ray's agent protocol.

Every agent deployment answers ``agent_chat`` / ``agent_stream`` with plain dicts
(:class:`~moa_ray.chat.ChatRequest` in; a completion, stream chunks or an error as data
out), so drivers and the ingress need neither vLLM nor its pickled classes. Here
each call becomes an OpenAI ``ChatCompletionRequest`` for ``LLMServer.chat``, the
same path Ray Serve LLM's own OpenAI ingress takes; the engine, its batching,
structured outputs, health check and placement are all Ray Serve LLM's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter
from ray.serve.llm.deployment import LLMServer

from moa_ray.backends.base import chat_kwargs
from moa_ray.chat import ChatRequest, StreamChunk
from moa_ray.config import ModelSpec, VLLMModelSpec
from moa_ray.errors import BackendError, UpstreamError, error_for_status
from moa_ray.packaged_models import is_packaged, prepare_hf_folder
from moa_ray.serve.agent import replica_info
from moa_ray.wire import StreamReader, completion_of, has_content, joined

log = logging.getLogger("moa_ray.agent")
_MODEL_SPEC: TypeAdapter[Any] = TypeAdapter(ModelSpec)


def openai_request_body(model_id: str, spec: VLLMModelSpec, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
    """The OpenAI chat request for one agent call; JSON mode becomes vLLM's structured output (compact JSON:
    the engine's setting, :data:`moa_ray.serve.llm.STRUCTURED_OUTPUTS`)."""
    body = {"model": model_id, **chat_kwargs(spec, request.messages, request.params)}
    params = request.params
    if params.response_schema is not None:  # the caller's schema: vLLM's guided decoding
        body.pop("response_format", None)
        body["structured_outputs"] = {"json": params.response_schema.json_schema}
    elif params.json_mode:
        body.pop("response_format", None)
        target = {"json": params.json_schema} if params.json_schema else {"json_object": True}
        body["structured_outputs"] = target
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _plain(value: Any) -> Any:
    """A pydantic object of vLLM's protocol as plain data (what :mod:`moa_ray.wire` reads)."""
    return value.model_dump() if hasattr(value, "model_dump") else value


def _error_from(error: Any, model: str) -> BackendError:
    """An OpenAI ``ErrorResponse`` (object or dict) as the matching :class:`BackendError`."""
    info = error.get("error", error) if isinstance(error, dict) else getattr(error, "error", error)
    if not isinstance(info, dict):
        info = info.model_dump() if hasattr(info, "model_dump") else {"message": str(info)}
    status = int(info.get("code") or 500)
    message = str(info.get("message") or info)
    return error_for_status(status, f"{model}: HTTP {status}: {message}", model=model, detail=str(info.get("type") or ""))


class MoALLMServer(LLMServer):
    """One vLLM model (an ``LLMServer`` deployment) behind the agent protocol."""

    async def __init__(self, llm_config: Any, *, agent_name: str, spec: dict[str, Any], **kwargs: Any) -> None:  # type: ignore[misc]
        # (an async constructor, as LLMServer's own: Serve awaits it)
        self.name = agent_name
        self.spec: VLLMModelSpec = _MODEL_SPEC.validate_python(spec)
        if is_packaged(self.spec.model):  # made once per node from the packaged GGUF, then cached
            await asyncio.to_thread(prepare_hf_folder, self.spec.model, Path(llm_config.model_loading_config.model_source))
        await super().__init__(llm_config, **kwargs)

    def _request(self, request: dict[str, Any], *, stream: bool) -> Any:
        from ray.serve.llm.openai_api_models import ChatCompletionRequest

        body = openai_request_body(self._llm_config.model_id, self.spec, ChatRequest.model_validate(request), stream=stream)
        return ChatCompletionRequest(**body)

    def _unexpected(self, err: Exception) -> dict[str, Any]:
        log.exception("%s: the engine call failed", self.name)
        return {"error": UpstreamError(f"{self.spec.model}: {type(err).__name__}: {err}", model=self.spec.model).to_dict()}

    async def agent_chat(self, request: dict[str, Any]) -> dict[str, Any]:
        """One completion, or the error as data."""
        start = time.perf_counter()
        try:
            async for item in await self.chat(self._request(request, stream=False)):
                if hasattr(item, "error") or isinstance(item, list):  # an ErrorResponse (a list only ever streams)
                    return {"error": _error_from(item, self.spec.model).to_dict()}
                completion = completion_of(_plain(item), model=self.spec.model, latency_s=time.perf_counter() - start)
                return {"completion": completion.model_dump()}
        except BackendError as err:
            return {"error": err.to_dict()}
        except Exception as err:  # noqa: BLE001 - a dead engine: reported as data, logged with its traceback
            return self._unexpected(err)
        return {"error": UpstreamError(f"{self.spec.model}: the engine returned nothing", model=self.spec.model).to_dict()}

    async def agent_stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Deltas as Ray Serve LLM batches them (one message per batch, not per token), then the completion."""
        start = time.perf_counter()
        reader = StreamReader()
        try:
            async for batch in await self.chat(self._request(request, stream=True)):
                for item in batch if isinstance(batch, list) else [batch]:
                    if not isinstance(item, str):  # an ErrorResponse before the first token
                        yield {"error": _error_from(item, self.spec.model).to_dict()}
                        return
                    pieces, done = [], False  # one message per batch: its chunks' pieces together
                    for line in item.splitlines():
                        if not line.startswith("data: "):
                            continue
                        data = line[len("data: ") :].strip()
                        if data == "[DONE]":
                            done = True
                            continue
                        chunk = json.loads(data)
                        if "error" in chunk:
                            yield {"error": _error_from(chunk, self.spec.model).to_dict()}
                            return
                        pieces.append(reader.read(chunk))
                    piece = joined(pieces)
                    if has_content(piece):
                        yield {"chunk": piece.model_dump()}
                    if done:
                        break
        except BackendError as err:
            yield {"error": err.to_dict()}
            return
        except Exception as err:  # noqa: BLE001 - see agent_chat
            yield self._unexpected(err)
            return
        completion = reader.completion(model=self.spec.model, latency_s=time.perf_counter() - start)
        yield {"chunk": StreamChunk(completion=completion).model_dump()}

    async def info(self) -> dict[str, Any]:
        return replica_info(self.name, self.spec)
