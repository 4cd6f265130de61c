"""The front door: a session answers prompts with a config's pipelines, and owns the Ray it needed.

.. code-block:: python

    import moa_ray

    with moa_ray.session("my.yaml") as s:  # a path, a loaded MoARayConfig, or None: the shipped presets
        result = s.run("moa", "What is Mixture-of-Agents?")
    print(result.answer, result.trace.summary())

``s.run`` returns the pipeline's :class:`~moa_ray.pipeline.base.PipelineResult`: ``.answer`` and ``.trace``, the
record ``moa-ray run --json`` prints (``result.trace.to_json_dict("full")`` adds every call's text). ``await
s.arun(...)`` does the same in a running event loop; ``s.stream(...)`` (``s.astream(...)`` there) yields the final
call's :class:`~moa_ray.chat.StreamChunk` deltas, then the result, and with ``call_events=True`` each earlier call
as a :class:`~moa_ray.pipeline.base.CallEvent` the moment it ends.

Ray is started only when needed: a pipeline's models that hold weights, or remote ones with ``hosting:
deployment``, are deployed as one Serve application (``app_name``) the first time a pipeline that calls them is
used (:meth:`Session.prepare` does it up front); remote models hosted ``in_process`` (the default) are called from
this process and need no Ray at all. On exit a session releases what it started: a local Ray it started is shut
down (with the reaper of :mod:`moa_ray.runtime`); a cluster it joined (``address=`` or ``RAY_ADDRESS``) keeps
running, and so does its agents application, for the next session to reuse, unless ``keep_deployed=False``.
A Ray this process had already started or joined is left as it was found. Sessions can follow each other in one
process.

``moa_ray.session`` is the function (the package binds it over this module's name): import this module's contents
with ``from moa_ray.session import Session``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:  # the heavy imports (pydantic models, the pipeline, Ray) happen when a session opens
    from types import TracebackType

    from moa_ray.chat import ChatMessage, ChatParams, StreamChunk
    from moa_ray.config import MoARayConfig
    from moa_ray.pipeline.agents import Agent
    from moa_ray.pipeline.base import CallEvent, Pipeline, PipelineResult

    StreamItem: TypeAlias = "StreamChunk | CallEvent | PipelineResult"
    Prompt: TypeAlias = "str | list[ChatMessage] | list[dict[str, Any]]"

log = logging.getLogger(__name__)

#: A request's default deadline in seconds (``moa-ray run --timeout``'s): every call and retry shares it.
DEFAULT_TIMEOUT_S = 600.0
#: The Serve application of a session's agents (``moa-ray run``'s).
DEFAULT_APP_NAME = "moa-agents"


class Session:
    """Pipelines of one config, their agents assembled once, and the Ray they needed (see :mod:`moa_ray.session`).

    A session over ``config`` (a YAML path, a loaded :class:`~moa_ray.config.MoARayConfig`, a mapping, or
    None: the shipped presets), validated now, before any Ray; use it as a context manager.

    ``address``: a Ray cluster to join when Ray is needed (default: ``RAY_ADDRESS``, else a local Ray on loopback,
    with ``num_cpus`` logical CPUs and ``env`` in its processes' environment). ``app_name``: the Serve application
    of the deployed agents; ``keep_deployed=False`` deletes it from a joined cluster on exit. ``apps``: other Serve
    applications (deployed by the caller, such as an endpoint) that leave a joined cluster with the session, and that
    Serve drains before a local Ray the session started goes down (which otherwise goes at once, as at a process's exit).
    """

    def __init__(
        self,
        config: str | os.PathLike[str] | MoARayConfig | Mapping[str, Any] | None = None,
        *,
        address: str | None = None,
        num_cpus: int | None = None,
        env: Mapping[str, str] | None = None,
        app_name: str = DEFAULT_APP_NAME,
        keep_deployed: bool = True,
        apps: Iterable[str] = (),
    ) -> None:
        self.config = _load(config)
        self.address = address
        self.num_cpus = num_cpus
        self.env = dict(env) if env is not None else None
        self.app_name = app_name
        self.keep_deployed = keep_deployed
        self.apps = list(apps)
        self.started_ray = False  # this session started or joined Ray (so it releases it)
        self._ray_touched = False  # this session used Ray (its own, or one this process already had)
        self._shared = False  # the Ray is a joined cluster
        self._deployed: list[str] = []  # models this session asked to deploy (all in ``app_name``)
        self._agents: dict[str, Agent] = {}
        self._pipelines: dict[str, Pipeline] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # runs the sync methods' coroutines
        self._assembling = threading.Lock()  # an async caller deploys in a worker thread
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("with Ray" if self._ray_touched else "without Ray")
        return f"<moa_ray.Session {state}: pipelines {', '.join(self.config.pipelines)}>"

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Session:
        self._check_open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    async def __aenter__(self) -> Session:
        return self.__enter__()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the session's own event loop (and its HTTP pools), then release the Ray it started; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._loop is not None:
                loop, self._loop = self._loop, None
                try:  # as asyncio.run ends, while the agents still hold their pools' closers (InProcessAgent)
                    if not _in_running_loop():  # (closed from async code, the pools are left to the collector)
                        loop.run_until_complete(loop.shutdown_asyncgens())
                        loop.run_until_complete(loop.shutdown_default_executor())
                finally:
                    loop.close()
        finally:
            self._pipelines.clear()
            self._agents.clear()
            self._release_ray()

    def _release_ray(self) -> None:
        if not self._ray_touched:
            return
        from moa_ray import runtime

        leaving = list(self.apps)
        if self._deployed and not self.keep_deployed:
            leaving.append(self.app_name)
        if self.started_ray:  # the caller's own apps (an endpoint's requests) are drained; the agents' calls are over
            runtime.release_ray(leaving, shared=self._shared, drain=bool(self.apps))
        elif leaving:  # a Ray this process had before the session: only what the session deployed goes
            from ray import serve

            for name in leaving:
                try:
                    serve.delete(name)
                except Exception as err:  # noqa: BLE001 - cleanup must not hide the outcome of what ran
                    log.warning("could not delete Serve app %r: %s", name, err)

    def _check_open(self) -> None:
        if self._closed:
            from moa_ray.errors import MoARayError

            raise MoARayError("this moa-ray session is closed")

    # ------------------------------------------------------------------ Ray and agents

    def start_ray(self, models: Iterable[str] = ()) -> None:
        """Start or join Ray now, after checking that ``models`` (names) can run here; idempotent.

        Deploying a model does it on its own; callers whose work runs on Ray anyway (eval's worker actors) call it.
        """
        self._check_open()
        if self._ray_touched:
            return
        import ray

        from moa_ray import runtime

        already = ray.is_initialized()
        runtime.init_ray(self.address, num_cpus=self.num_cpus, models=[self.config.models[m] for m in models], env=self.env)
        self._ray_touched = True
        self.started_ray = not already
        self._shared = runtime.is_shared_cluster(self.address)

    def prepare(self, pipelines: str | Iterable[str]) -> None:
        """Assemble the agents of ``pipelines`` now, deploying (and starting Ray for) the models that need it."""
        names = [pipelines] if isinstance(pipelines, str) else list(pipelines)
        self._ensure_agents(self.config.models_for(names))

    def agents(self, pipelines: str | Iterable[str] = (), *, models: Iterable[str] = ()) -> dict[str, Agent]:
        """The agents of the models that ``pipelines`` call, and of ``models``, by model name (assembled if new)."""
        names = [pipelines] if isinstance(pipelines, str) else list(pipelines)
        wanted = list(dict.fromkeys([*self.config.models_for(names), *models]))
        for model in wanted:
            if model not in self.config.models:
                from moa_ray.errors import ConfigError

                raise ConfigError(f"unknown model {model!r} (known models: {', '.join(sorted(self.config.models))})")
        self._ensure_agents(wanted)
        return {m: self._agents[m] for m in wanted}

    def _ensure_agents(self, models: Iterable[str]) -> None:
        self._check_open()
        with self._assembling:
            self._assemble([m for m in dict.fromkeys(models) if m not in self._agents])

    def _assemble(self, new: list[str]) -> None:
        if not new:
            return
        to_deploy = self.config.deployed_models(new)
        if not to_deploy:  # remote models called from this process: no Ray needed at all
            from moa_ray.pipeline.agents import assemble_agents

            self._agents.update(assemble_agents(self.config, new, {}))
            return
        from moa_ray.serve import deploy

        self.start_ray(new)
        # One application holds every model this session deploys: a new one redeploys it with the earlier ones kept.
        deployed = list(dict.fromkeys([*self._deployed, *to_deploy]))
        self._deployed = deployed
        agents = deploy.deploy_models(self.config, list(dict.fromkeys([*deployed, *new])), app_name=self.app_name)
        self._agents.update({m: agents[m] for m in agents if m not in self._agents})

    def pipeline(self, name: str) -> Pipeline:
        """The driver of pipeline ``name`` over this session's agents (deploying what it needs the first time)."""
        self._check_open()
        built = self._pipelines.get(name)
        if built is None:
            from moa_ray.pipeline import build_pipeline

            self.config.pipeline(name)  # an unknown name fails here, before any Ray
            self.prepare([name])
            built = self._pipelines.setdefault(name, build_pipeline(self.config, name, self._agents))
        return built

    async def _apipeline(self, name: str) -> Pipeline:
        """:meth:`pipeline` from a running event loop: a deployment (whose Serve calls block, and may not wait on a
        handle inside a loop) is made in a worker thread, once Ray has started here (it starts from this thread)."""
        self._check_open()
        if name not in self._pipelines:
            models = self.config.models_for([name])
            if self.config.deployed_models([m for m in models if m not in self._agents]):
                self.start_ray(models)
                await asyncio.to_thread(self.prepare, [name])
        return self.pipeline(name)

    # ------------------------------------------------------------------ answering

    async def arun(
        self,
        pipeline: str,
        prompt: Prompt,
        params: ChatParams | None = None,
        *,
        max_tokens: int | None = None,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
    ) -> PipelineResult:
        """Answer ``prompt`` (a string, or a conversation of messages) with ``pipeline``: the answer and its trace.

        ``params`` apply to the final call (``max_tokens`` caps it too); ``timeout_s`` is the request's one deadline,
        shared by every call and retry (None: only the models' own timeouts). A failed pipeline raises a
        :class:`~moa_ray.errors.PipelineError` whose ``trace`` says what happened.
        """
        return await (await self._apipeline(pipeline)).run(prompt, _with_max_tokens(params, max_tokens), timeout_s=timeout_s)

    def run(
        self,
        pipeline: str,
        prompt: Prompt,
        params: ChatParams | None = None,
        *,
        max_tokens: int | None = None,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
    ) -> PipelineResult:
        """:meth:`arun`, from code that is not in an event loop (the session runs its own)."""
        loop = self._sync_loop("run", "arun")
        self.pipeline(pipeline)  # deployed outside the loop
        return loop.run_until_complete(self.arun(pipeline, prompt, params, max_tokens=max_tokens, timeout_s=timeout_s))

    async def astream(
        self,
        pipeline: str,
        prompt: Prompt,
        params: ChatParams | None = None,
        *,
        max_tokens: int | None = None,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        call_events: bool = False,
    ) -> AsyncGenerator[StreamItem, None]:
        """The final call's deltas as they come, then the :class:`~moa_ray.pipeline.base.PipelineResult`; with
        ``call_events`` each earlier call (proposers, judge, moderator) first, as a
        :class:`~moa_ray.pipeline.base.CallEvent` the moment it ends. The whole stream is bounded by ``timeout_s``."""
        items = stream_within(
            await self._apipeline(pipeline), prompt, _with_max_tokens(params, max_tokens), timeout_s=timeout_s, call_events=call_events
        )
        async with contextlib.aclosing(items):
            async for item in items:
                yield item

    def stream(
        self,
        pipeline: str,
        prompt: Prompt,
        params: ChatParams | None = None,
        *,
        max_tokens: int | None = None,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        call_events: bool = False,
    ) -> Iterator[StreamItem]:
        """:meth:`astream`, from code that is not in an event loop: iterate it in a ``for`` loop."""
        loop = self._sync_loop("stream", "astream")
        self.pipeline(pipeline)  # deployed outside the loop
        items = self.astream(pipeline, prompt, params, max_tokens=max_tokens, timeout_s=timeout_s, call_events=call_events)
        try:
            while True:
                try:
                    item = loop.run_until_complete(anext(items))
                except StopAsyncIteration:
                    return
                yield item
        finally:
            if not loop.is_closed():
                loop.run_until_complete(items.aclose())

    def _sync_loop(self, method: str, instead: str) -> asyncio.AbstractEventLoop:
        """The session's own event loop, where the sync methods run (its HTTP pools last as long as the session)."""
        from moa_ray.errors import MoARayError

        self._check_open()
        if _in_running_loop():
            raise MoARayError(f"Session.{method}() cannot run inside a running event loop: use `await session.{instead}(...)`")
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop


#: ``moa_ray.session(config, ...)``: a :class:`Session` (the lower-case name reads as the front door, like a function).
session = Session


async def stream_within(
    pipeline: Pipeline,
    prompt: Prompt,
    params: ChatParams | None = None,
    *,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    call_events: bool = False,
) -> AsyncGenerator[StreamItem, None]:
    """``pipeline.stream(...)``, every wait of it bounded by the request's deadline (``timeout_s``, plus the driver's
    grace for a call's own timeout error), as the endpoint bounds a stream: the calls share the deadline, and the
    final call's stream, which the driver leaves to its caller, ends there too (a :class:`MoARayError`)."""
    from moa_ray.errors import MoARayError
    from moa_ray.pipeline.base import DEADLINE_GRACE_S

    items = pipeline.stream(prompt, params, timeout_s=timeout_s, call_events=call_events)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s + DEADLINE_GRACE_S
    async with contextlib.aclosing(items):
        while True:
            try:
                if deadline is None:
                    item = await anext(items)
                else:
                    item = await asyncio.wait_for(anext(items), max(deadline - time.monotonic(), 0.001))
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise MoARayError(f"{pipeline.name!r} did not finish within {timeout_s:g} s") from None
            yield item


def _in_running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _with_max_tokens(params: ChatParams | None, max_tokens: int | None) -> ChatParams | None:
    if max_tokens is None:
        return params
    from moa_ray.chat import ChatParams

    return ChatParams(max_tokens=max_tokens) if params is None else params.model_copy(update={"max_tokens": max_tokens})


def _load(config: str | os.PathLike[str] | MoARayConfig | Mapping[str, Any] | None) -> MoARayConfig:
    from moa_ray.config import MoARayConfig, load_config, parse_config

    if isinstance(config, MoARayConfig):
        return config
    if isinstance(config, Mapping):
        return parse_config(dict(config), "<mapping>")
    return load_config(None if config is None else os.fspath(config))
