"""How a pipeline reaches a model deployed on Ray Serve: :class:`HandleAgent`, an :class:`~moa_ray.pipeline.agents.Agent`
over a deployment's handle (models that hold weights, or remote models with ``hosting: deployment``).

Transport belongs to serve/: the pipeline only sees the :class:`~moa_ray.pipeline.agents.Agent` interface, and
the callers that hold handles (a session's :func:`~moa_ray.serve.deploy.deploy_models`, the endpoint's ingress) wrap them
here (:func:`handle_agents`) before :func:`~moa_ray.pipeline.agents.assemble_agents` puts them beside the in-process
agents.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
from collections.abc import AsyncIterator, Mapping
from typing import Any

import ray
from ray.exceptions import RayActorError

from moa_ray.chat import ChatMessage, ChatParams, ChatRequest, Completion, StreamChunk
from moa_ray.errors import BackendError
from moa_ray.pipeline.agents import Agent

log = logging.getLogger(__name__)

#: gRPC's own default cap on a received message, which Serve keeps for replica-to-replica calls.
GRPC_DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024
#: Room in a direct call's gRPC message for what travels beside the request (Serve's pickled request metadata,
#: the empty kwargs, protobuf framing): ~50 bytes measured, so a request this much under the cap always fits.
DIRECT_HEADROOM = 64 * 1024


def _unwrap(reply: dict[str, Any]) -> dict[str, Any]:
    if "error" in reply:
        raise BackendError.from_dict(reply["error"])
    return reply


def fast_handle(handle: Any) -> Any:
    """The handle with Serve's direct gRPC transport and plain pickle for requests and responses.

    Agent payloads are plain dicts, so they need neither Ray's object store nor
    cloudpickle; on a 6-proposer layer this cuts the fan-out's overhead by ~10 ms
    (bench/overhead.py). Its messages are capped (:func:`direct_payload_limit`), so
    :class:`HandleAgent` sends larger requests by reference. Ray versions without
    these options, and Ray Client sessions (no direct route to replicas), keep the
    default transport.
    """
    return _transport_options(handle, _by_reference=False, request_serialization="pickle", response_serialization="pickle")


def by_reference_handle(handle: Any) -> Any:
    """The handle with Serve's actor-call transport, whose arguments travel through Ray's object store (no size cap).

    Asked for explicitly: a handle's default transport is gRPC where Serve runs throughput-optimized.
    """
    return _transport_options(handle, _by_reference=True)


def _transport_options(handle: Any, **options: Any) -> Any:
    """``handle.options(**options)``, or the handle as it is under Ray Client or a Ray without those options."""
    if ray.util.client.ray.is_connected():
        return handle
    try:
        return handle.options(**options)
    except (TypeError, ValueError):
        return handle


def direct_payload_limit() -> int:
    """The largest pickled request the direct gRPC transport is sure to carry.

    Serve caps a message a replica receives at ``RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH`` (gRPC's 4 MiB unless
    that variable is set, ``ray/serve/_private/constants.py``), read in each replica's own process. A lower value
    here is followed; a higher one is not, since this process cannot see whether the replicas have it too. Larger
    requests go by reference.
    """
    try:
        from ray.serve._private.constants import RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH as cap
    except ImportError:  # a Ray without it: gRPC's default
        cap = GRPC_DEFAULT_MAX_MESSAGE
    return max(min(int(cap), GRPC_DEFAULT_MAX_MESSAGE) - DIRECT_HEADROOM, 0)


class HandleAgent:
    """A model deployed as a Ray Serve deployment, called through its handle.

    Requests go over Serve's direct gRPC transport (fast) unless they are too large for it: long conversations, and
    the prompts of later layers that add every reference to them, go through the object store instead, so whatever
    the endpoint accepts reaches the model.
    """

    def __init__(self, handle: Any, name: str, *, replica_retries: int = 1) -> None:
        self.handle = fast_handle(handle)
        self.by_reference = by_reference_handle(handle)
        self.direct_limit = direct_payload_limit()
        self.name = name
        self.replica_retries = replica_retries

    def handle_for(self, request: dict[str, Any]) -> Any:
        """The direct handle, or the by-reference one for a request whose pickle would not fit a gRPC message.

        Measured as Serve's direct transport serializes it (pickle of the argument tuple): the bound is in bytes,
        and no cheaper estimate of a pickle's size is exact. A request of a few kB pickles in microseconds.
        """
        if self.by_reference is self.handle:
            return self.handle
        size = len(pickle.dumps((request,), protocol=pickle.HIGHEST_PROTOCOL))
        if size <= self.direct_limit:
            return self.handle
        log.debug("%s: a %d-byte request exceeds the direct transport's %d bytes: sent by reference", self.name, size, self.direct_limit)
        return self.by_reference

    async def chat(self, messages: list[ChatMessage], params: ChatParams) -> Completion:
        request = ChatRequest(messages=messages, params=params).model_dump()
        handle = self.handle_for(request)
        replica_failures: list[str] = []
        for attempt in range(1 + self.replica_retries):
            response = handle.agent_chat.remote(request)
            try:
                reply = await response
                break
            except asyncio.CancelledError:
                response.cancel()  # a cut straggler must stop using its replica
                raise
            except RayActorError as err:
                # The replica died mid-call (crash, node loss, kill): Serve routes the retry to a live
                # replica. Nothing was returned yet, so the call is safe to repeat.
                if attempt == self.replica_retries:
                    raise
                replica_failures.append(f"{type(err).__name__} (replica lost)")
        completion = Completion.model_validate(_unwrap(reply)["completion"])
        if replica_failures:  # a retry on another replica is a retry: it shows on the call's record
            completion.retries = replica_failures + completion.retries
            completion.attempts += len(replica_failures)
        return completion

    async def stream(self, messages: list[ChatMessage], params: ChatParams) -> AsyncIterator[StreamChunk]:
        request = ChatRequest(messages=messages, params=params).model_dump()
        generator = self.handle_for(request).options(stream=True).agent_stream.remote(request)
        try:
            async for reply in generator:
                yield StreamChunk.model_validate(_unwrap(reply)["chunk"])
        except asyncio.CancelledError:
            generator.cancel()
            raise


def handle_agents(handles: Mapping[str, Any]) -> dict[str, Agent]:
    """A :class:`HandleAgent` for each Serve deployment handle in ``handles`` (by model name), for
    :func:`~moa_ray.pipeline.agents.assemble_agents`."""
    return {name: HandleAgent(handle, name) for name, handle in handles.items()}
