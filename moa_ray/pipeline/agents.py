"""How a pipeline reaches a model: one async chat interface, three transports.

:class:`~moa_ray.serve.handle.HandleAgent` (in serve/, where the transport lives) calls a Ray Serve
deployment (models that hold weights, or remote models with ``hosting: deployment``);
:class:`InProcessAgent` calls a remote model from this process (``hosting: in_process``, the default
for remote models); :class:`LocalAgent` wraps any backend (unit tests, debugging). Pipelines only see
:class:`Agent`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from typing import Any, Protocol

from moa_ray.backends import create_backend
from moa_ray.backends.base import ChatBackend
from moa_ray.chat import ChatMessage, ChatParams, Completion, StreamChunk
from moa_ray.errors import BackendError, MoARayError
from moa_ray.pipeline.limits import rate_limited
from moa_ray.redaction import Redactor


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


def assemble_agents(config: Any, models: Iterable[str], deployed: Mapping[str, Agent]) -> dict[str, Agent]:
    """The agents of ``models``, in that order: a deployed model (weights, or ``hosting: deployment``) through its
    agent in ``deployed`` (a Serve deployment's handle, wrapped by the caller: :func:`moa_ray.serve.handle.handle_agents`),
    a remote model hosted ``in_process`` through this process's own client.

    The one assembly of agents: a session's (:mod:`moa_ray.session`, with the handles of the deployments it made, or
    none when no model needs one) and the endpoint's ingress replicas' (the handles Serve binds to the ingress).
    Each is held to its model's ``rpm``/``tpm`` (:mod:`moa_ray.pipeline.limits`): every caller of a model assembles
    its agent here, so every call of the application counts against the one window. The transport stays in serve/:
    this module never imports it.
    """
    names = list(dict.fromkeys(models))
    missing = [m for m in names if config.models[m].deployed and m not in deployed]
    if missing:
        raise MoARayError(f"no Serve deployment handle for the deployed model(s) {', '.join(missing)}")
    agents: dict[str, Agent] = {}
    for m in names:
        spec = config.models[m]
        agent: Agent = deployed[m] if spec.deployed else InProcessAgent(m, spec)
        agents[m] = rate_limited(agent, m, spec)
    return agents
