"""How a pipeline reaches a model: one async chat interface, three transports.

:class:`HandleAgent` calls a Ray Serve deployment (models that hold weights, or remote models
with ``hosting: deployment``); :class:`InProcessAgent` calls a remote model from this process
(``hosting: in_process``, the default for remote models); :class:`LocalAgent` wraps any backend
(unit tests, debugging). Pipelines only see :class:`Agent`.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from typing import Any, Protocol

from moa_ray.backends.base import ChatBackend
from moa_ray.chat import ChatMessage, ChatParams, ChatRequest, Completion, StreamChunk
from moa_ray.errors import BackendError, MoARayError
from moa_ray.pipeline.limits import rate_limited
from moa_ray.redaction import Redactor

log = logging.getLogger(__name__)

#: gRPC's own default cap on a received message, which Serve keeps for replica-to-replica calls.
GRPC_DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024
#: Room in a direct call's gRPC message for what travels beside the request (Serve's pickled request metadata,
#: the empty kwargs, protobuf framing): ~50 bytes measured, so a request this much under the cap always fits.
DIRECT_HEADROOM = 64 * 1024


class Agent(Protocol):
    async def chat(self, messages: list[ChatMessage], params: ChatParams) -> Completion: ...

    def stream(self, messages: list[ChatMessage], params: ChatParams) -> AsyncIterator[StreamChunk]: ...


class LocalAgent:
    """An in-process backend as an agent."""

    def __init__(self, backend: ChatBackend) -> None:
        self.backend = backend

    async def chat(self, messages: list[ChatMessage], params: ChatParams) -> Completion:
        return await self.backend.chat(messages, params)

    def stream(self, messages: list[ChatMessage], params: ChatParams) -> AsyncIterator[StreamChunk]:
        return self.backend.stream(messages, params)


class InProcessAgent:
    """A remote (OpenAI-compatible) model called from this process, as its deployment would call it.

    A remote model holds no weights, so a replica of its own only adds a Ray hop, two serialisations
    and a process to every call. Here the calling process (the CLI, each eval worker, each ingress
    replica) keeps what the deployment kept: one pooled HTTP client per process and event loop, the
    model's concurrency cap (:meth:`~moa_ray.config.OpenAIModelSpec.concurrency_cap`, held per
    process), retries, and the provider key redacted from every error before it leaves. The agent
    pickles as its spec, so Ray workers build their own client.
    """

    def __init__(self, name: str, spec: Any) -> None:
        self.name = name
        self.spec = spec
        self._redactor = Redactor.for_models([spec])
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backend: ChatBackend | None = None
        self._slots: asyncio.Semaphore | None = None
        self._closer: AsyncGenerator[None, None] | None = None
        self._closer_started: asyncio.Task[None] | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (InProcessAgent, (self.name, self.spec))

    def prepare(self) -> None:
        """Build the running loop's client now (imports, pool), not inside the first call of a burst.

        Built lazily, the first of forty concurrent calls stalls the event loop ~0.4 s while every
        other call of the burst waits (bench/eval_throughput.py: the first results 0.35 s later).
        """
        self._ready()

    def _ready(self) -> tuple[ChatBackend, asyncio.Semaphore]:
        """The client of the running loop (an httpx pool belongs to the loop that opened it)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._backend is None or self._slots is None:
            from moa_ray.backends import create_backend

            self._backend = create_backend(self.spec)
            self._slots = asyncio.Semaphore(self.spec.concurrency_cap())
            self._loop = loop
            self._closer = _closed_with_the_loop(self._backend)
            self._closer_started = loop.create_task(anext(self._closer))  # runs it to its yield
        return self._backend, self._slots

    def _redacted(self, err: BackendError) -> BackendError:
        return BackendError.from_dict(self._redactor.json(err.to_dict()))  # type: ignore[arg-type]  # a dict in, a dict out

    async def chat(self, messages: list[ChatMessage], params: ChatParams) -> Completion:
        backend, slots = self._ready()
        async with slots:
            try:
                return await backend.chat(messages, params)
            except BackendError as err:
                raise self._redacted(err) from None

    async def stream(self, messages: list[ChatMessage], params: ChatParams) -> AsyncIterator[StreamChunk]:
        backend, slots = self._ready()
        async with slots:
            try:
                async for chunk in backend.stream(messages, params):
                    yield chunk
            except BackendError as err:
                raise self._redacted(err) from None

    async def aclose(self) -> None:
        if self._backend is not None:
            await self._backend.aclose()
            self._backend = None


async def _closed_with_the_loop(backend: ChatBackend) -> AsyncGenerator[None, None]:
    """Closes ``backend`` (its connection pool) in its own loop as that loop ends.

    A client belongs to the loop that opened it, and the callers' loops end without telling the agent
    (each ``asyncio.run`` of the CLI and the benchmarks); left open, aiohttp's pool complains at exit.
    An async generator started in a loop is finalised by that loop's ``shutdown_asyncgens`` (which
    ``asyncio.run`` calls): this one waits at its ``yield`` until then.
    """
    try:
        yield
    finally:
        await backend.aclose()


def prepare_agents(agents: Iterable[Agent]) -> None:
    """Ready the in-process agents among ``agents`` in the running loop (:meth:`InProcessAgent.prepare`)."""
    for agent in agents:
        if isinstance(agent, InProcessAgent) or isinstance(getattr(agent, "inner", None), InProcessAgent):
            agent.prepare()  # type: ignore[attr-defined]  # an in-process agent, or a rate limit around one


def in_process_agents(config: Any, models: list[str]) -> dict[str, Agent]:
    """Agents for those of ``models`` called from this process (remote models without a deployment), each held to
    its model's ``rpm``/``tpm`` (:mod:`moa_ray.pipeline.limits`)."""
    return {m: rate_limited(InProcessAgent(m, config.models[m]), m, config.models[m]) for m in models if not config.models[m].deployed}


def assemble_agents(config: Any, models: Iterable[str], handles: Mapping[str, Any]) -> dict[str, Agent]:
    """The agents of ``models``, in that order: a deployed model (weights, or ``hosting: deployment``) through its
    Serve deployment's handle in ``handles``, a remote model hosted ``in_process`` through this process's own client.

    The one assembly of agents: a session's (:mod:`moa_ray.session`, with the handles of the deployments it made, or
    none when no model needs one) and the endpoint's ingress replicas' (the handles Serve binds to the ingress).
    Each is held to its model's ``rpm``/``tpm`` (:mod:`moa_ray.pipeline.limits`): every caller of a model assembles
    its agent here, so every call of the application counts against the one window.
    """
    names = list(dict.fromkeys(models))
    missing = [m for m in names if config.models[m].deployed and m not in handles]
    if missing:
        raise MoARayError(f"no Serve deployment handle for the deployed model(s) {', '.join(missing)}")
    agents: dict[str, Agent] = {}
    for m in names:
        spec = config.models[m]
        agent: Agent = HandleAgent(handles[m], m) if spec.deployed else InProcessAgent(m, spec)
        agents[m] = rate_limited(agent, m, spec)
    return agents


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
    import ray

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
        from ray.exceptions import RayActorError  # HandleAgent only exists where Ray does

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
