"""The driver shared by every pipeline kind: traced calls, parallel layers, the final call.

A pipeline kind implements :meth:`Pipeline.plan`, which runs whatever comes
before the final answer (proposer layers, judge, moderator) and returns either
the final call to make or an answer that is already known (the ranker). The base
class turns that into :meth:`run` (one answer) and :meth:`stream` (the final
call's tokens as they come), so the CLI, the jobs and the HTTP endpoint share
one code path.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import itertools
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from moa_ray.chat import ChatMessage, ChatParams, Completion, StreamChunk, TokenLogprob, ToolCall, as_messages
from moa_ray.config import LayerSpec, ModelSpecBase, ProposerSpec, fallback_chain
from moa_ray.errors import AggregatorFailed, BackendError, BackendTimeout, LayerFailed, MoARayError
from moa_ray.metrics import record_trace
from moa_ray.pipeline.accounting import fill_accounting
from moa_ray.pipeline.agents import Agent
from moa_ray.pipeline.limits import Admission, RateLimitedAgent
from moa_ray.pipeline.reasoning import ThinkSplitter, without_thinking
from moa_ray.pipeline.reuse import CallReuse
from moa_ray.pipeline.structured import InvalidStructuredOutput, structure_error
from moa_ray.pipeline.trace import CallRecord, CallRole, LayerRecord, Trace
from moa_ray.prompts import advisory_messages, inject_references, with_role
from moa_ray.redaction import Redactor

log = logging.getLogger(__name__)


#: A proposer call of a layer in flight: its completion, or None when it failed.
CallTask = asyncio.Task[Completion | None]


def record_error(record: CallRecord, err: Exception) -> None:
    """Put a failed call's error on its record as data; anything but a backend error is logged with its traceback."""
    record.error = f"{type(err).__name__}: {err}"
    record.error_type = type(err).__name__
    if isinstance(err, BackendError):
        record.status_code = err.status_code
        record.attempts, record.retries = err.attempts, err.retries
        record.retry_after_s = err.retry_after_s
    else:  # a bug or a transport failure, not a model's answer: keep the layer going, but leave a trace of it
        log.error("%s call to %s failed unexpectedly", record.role, record.model, exc_info=err)


#: How long past the request's deadline the driver waits for a call's own timeout error before cancelling it.
DEADLINE_GRACE_S = 0.25


def _deadline_passed(spec: ProposerSpec) -> BackendTimeout:
    return BackendTimeout(f"{spec.model}: the request's deadline passed", model=spec.model)


def failure_text(records: Sequence[CallRecord]) -> str:
    """Why a call failed: its error, then each fallback's that was tried after it."""
    first, *fallbacks = records
    return "; ".join([first.error or first.status, *(f"its fallback {r.model} failed: {r.error or r.status}" for r in fallbacks)])


class PipelineResult(BaseModel):
    """A pipeline's answer with its trace: text, or the tools the answering model called; its thinking apart."""

    answer: str
    finish_reason: str | None = None
    tool_calls: list[ToolCall] | None = None
    reasoning: str | None = None
    logprobs: list[TokenLogprob] | None = None
    trace: Trace


@dataclass
class CallEvent:
    """A call of the request that just ended (proposer, judge, moderator...): what a live view shows of a layer."""

    record: CallRecord


@dataclass
class FinalCall:
    """The last call of a request, whose text is the answer: the conversation as the client sent it (tool calls
    and results included), with ``references`` (the last layer's answers) injected where there are any."""

    spec: ProposerSpec
    layer: int
    references: list[str] = field(default_factory=list)
    role: CallRole = "aggregator"


@dataclass
class KnownAnswer:
    """An answer decided without a final generation (the ranker picks a response verbatim)."""

    text: str
    finish_reason: str | None = None


@dataclass
class _StreamedCall:
    """What one streamed final call gave: its completion (the last chunk), and whether any piece left."""

    completion: Completion | None = None
    started: bool = False


@dataclass
class StragglerBound:
    """When a layer without a deadline stops waiting for its last proposers: ``wait_s`` after its start, or
    ``factor`` times the slowest answer so far when later, once most of it answered (:class:`LayerSpec`)."""

    wait_s: float
    factor: float
    slowest_s: float
    answered: int
    proposers: int

    @property
    def after_s(self) -> float:
        return max(self.wait_s, self.factor * self.slowest_s)

    def mark(self, calls: Sequence[CallRecord], cut: set[int]) -> None:
        """Say on each cut call's record why it was cut: the bound, and what it was computed from."""
        why = (
            f"cut as a straggler at {self.after_s:.1f} s: {self.answered} of {self.proposers} proposers had answered, "
            f"the slowest at {self.slowest_s:.1f} s (bound: max({self.wait_s:g} s, {self.factor:g} x the slowest))"
        )
        for call in calls:
            if call.role == "proposer" and call.index in cut and call.status == "cut":
                call.error = why


@dataclass
class Response:
    """A successful call inside a layer."""

    index: int
    spec: ProposerSpec
    completion: Completion

    @property
    def text(self) -> str:
        return self.completion.text


def call_params(spec: ProposerSpec, override: ChatParams | None = None) -> ChatParams:
    """Per-call parameters: the request's override beats the proposer's, unset falls to the model."""
    params = ChatParams(temperature=spec.temperature, max_tokens=spec.max_tokens, top_p=spec.top_p, seed=spec.seed)
    if override is not None:  # the set fields' own values: nested ones (tools, a schema) stay models
        params = params.model_copy(
            update={name: getattr(override, name) for name in override.model_dump(exclude_unset=True, exclude_defaults=True)}
        )
    return params


def final_messages(conversation: list[ChatMessage], step: FinalCall, params: ChatParams | None) -> list[ChatMessage]:
    """What the answering call reads: the real conversation, the references injected (and told of its tools)."""
    return inject_references(conversation, step.references, tools=bool(params is not None and params.tools))


class Pipeline:
    """Base class of every pipeline kind."""

    def __init__(
        self,
        name: str,
        spec: BaseModel,
        agents: Mapping[str, Agent],
        *,
        models: Mapping[str, ModelSpecBase] | None = None,
        reuse: CallReuse | None = None,
    ) -> None:
        self.name = name
        self.spec = spec
        self.agents = agents
        self.models = models  # parameters and prices for the trace's accounting (None: unknown)
        self.reuse = reuse  # identical calls answered once (evaluations); None: every call is made
        self.settings: dict[str, Any] | None = None  # a request's own settings, recorded in its trace (with_spec)
        # True: a wait for a model's rpm/tpm room moves the request's deadline back (an evaluation's deadline bounds
        # work, not queueing); False: the wait counts, and a call that cannot get room in time fails (the endpoint)
        self.patient_limits = False
        # every text the trace records passes this first: a model may echo what it was sent, a key included
        self.redactor = Redactor.for_models(models.values()) if models else Redactor(())
        called = {s.model for _, s in spec.calls()}  # type: ignore[attr-defined]
        missing = sorted((called | {f for m in called if models and m in models for f in fallback_chain(models, m)}) - set(agents))
        if missing:
            raise MoARayError(f"pipeline {name!r} needs agents for models {missing}")

    def with_spec(self, spec: BaseModel, settings: dict[str, Any]) -> Pipeline:
        """This pipeline for one request, with the spec its per-request ``settings`` made (same agents, same memory)."""
        shaped = copy.copy(self)
        shaped.spec = spec
        shaped.settings = settings
        return shaped

    # ------------------------------------------------------------------ to implement

    async def plan(self, messages: list[ChatMessage], trace: Trace, t0: float) -> FinalCall | KnownAnswer:
        """Run everything before the final answer."""
        raise NotImplementedError

    # ------------------------------------------------------------------ building blocks

    async def call(
        self,
        spec: ProposerSpec,
        messages: list[ChatMessage],
        *,
        layer: int,
        index: int,
        role: CallRole,
        trace: Trace,
        t0: float,
        params: ChatParams | None = None,
        structured: bool = False,
    ) -> Completion | None:
        """One traced call, made again on its model's fallbacks (in order) when it fails with time left; returns None
        (and records why) when every one fails, is cut, or outlives the request's deadline.

        With a deadline the call gets what is left of it as ``timeout_s`` (so the backend stops retrying in
        time) and is cancelled, replica-side too, if it runs past it. A cut call (cancelled) and a passed deadline
        end it: no fallback is tried then. Each fallback is a record of its own, ``fallback_of`` the failed model.
        """
        # the model itself, then (lazily: each while time is left) its fallbacks
        for other in itertools.chain([None], self._fallbacks(spec.model, trace)):
            completion = await self._call_once(
                spec if other is None else spec.model_copy(update={"model": other}),
                messages,
                layer=layer,
                index=index,
                role=role,
                trace=trace,
                t0=t0,
                params=params,
                fallback_of=None if other is None else spec.model,
                structured=structured,
            )
            if completion is not None:
                return completion
        return None

    def _fallbacks(self, model: str, trace: Trace) -> Iterator[str]:
        """The models a failed call to ``model`` is made again on, one by one while the request has time left (more
        than :data:`DEADLINE_GRACE_S`: a call that failed as its deadline passed is not made again)."""
        if not self.models or model not in self.models:
            return
        for other in fallback_chain(self.models, model):
            left = trace.time_left_s()
            if left is not None and left <= DEADLINE_GRACE_S:
                return
            if other in self.agents:
                yield other

    async def _call_once(
        self,
        spec: ProposerSpec,
        messages: list[ChatMessage],
        *,
        layer: int,
        index: int,
        role: CallRole,
        trace: Trace,
        t0: float,
        params: ChatParams | None = None,
        fallback_of: str | None = None,
        structured: bool = False,
    ) -> Completion | None:
        """One traced call to ``spec.model`` (see :meth:`call`); ``structured``: the answer must follow the format
        ``params`` asks for (:class:`InvalidStructuredOutput` otherwise), checked before the call counts as ended."""
        record = CallRecord(
            layer=layer,
            index=index,
            role=role,
            model=spec.model,
            label=spec.label,
            start_s=time.perf_counter() - t0,
            fallback_of=fallback_of,
        )
        trace.calls.append(record)
        start = time.perf_counter()
        sent = with_role(messages, spec.system)
        wanted = call_params(spec, params)
        agent = self.agents[spec.model]

        async def ask() -> Completion:
            chat = agent.chat
            if isinstance(agent, RateLimitedAgent):  # wait for room first: only the call itself runs against the clock
                admission = await self._admit(agent, spec, sent, wanted, trace)
                chat = functools.partial(agent.chat_admitted, admission)
            left = trace.time_left_s()
            if left is None:
                return await chat(sent, wanted)
            if left <= 0:
                raise _deadline_passed(spec)
            call = chat(sent, wanted.model_copy(update={"timeout_s": left}))
            try:  # the backend's own budget error (with its attempts) normally comes first
                return await asyncio.wait_for(call, left + DEADLINE_GRACE_S)
            except asyncio.TimeoutError:
                raise _deadline_passed(spec) from None

        try:
            if self.reuse is None:
                completion = await ask()
            else:
                record.key, reusable = self.reuse.key(spec.model, sent, wanted)
                completion, record.reused_from = await self.reuse.call(spec.model, record.key, reusable, ask)
                record.reused = record.reused_from is not None
        except asyncio.CancelledError:
            record.status, record.error, record.latency_s = "cut", "cut by the layer deadline", time.perf_counter() - start
            trace.call_ended(record)
            raise
        except Exception as err:  # noqa: BLE001 - a failed agent is recorded, the layer decides what it means
            record.status, record.latency_s = "error", time.perf_counter() - start
            record_error(record, err)
            trace.call_ended(record)
            return None
        completion = without_thinking(completion)  # the next layer reads the answer; the trace keeps the thinking
        self._record_completion(record, completion, time.perf_counter() - start)
        try:
            if structured:
                self._check_structure(record, completion, params, trace)
        finally:
            trace.call_ended(record)  # after the check: the metrics count a broken answer as an error
        return completion

    async def _admit(
        self, agent: RateLimitedAgent, spec: ProposerSpec, sent: list[ChatMessage], wanted: ChatParams, trace: Trace
    ) -> Admission:
        """Room for a call in its model's rate limit: within what is left of the deadline, or, for a patient pipeline,
        however long it takes, the deadline moved back by the wait."""
        left = trace.time_left_s()
        if left is not None and left <= 0:
            raise _deadline_passed(spec)
        timed = wanted if left is None else wanted.model_copy(update={"timeout_s": left})
        deadline = trace.deadline
        admission = await agent.admit(sent, timed, patient=self.patient_limits)
        if self.patient_limits:
            trace.excuse_wait(deadline, admission.waited_s)
        return admission

    def _record_completion(self, record: CallRecord, completion: Completion, elapsed_s: float) -> None:
        """What a call answered, on its record: tokens, latency, attempts, and its text (redacted)."""
        record.prompt_tokens = completion.usage.prompt_tokens
        record.completion_tokens = completion.usage.completion_tokens
        record.latency_s = elapsed_s if record.reused else (completion.latency_s or elapsed_s)
        record.finish_reason = completion.finish_reason
        record.attempts, record.retries = completion.attempts, completion.retries
        record.text = self.redactor.text(completion.text)
        record.reasoning = self.redactor.text(completion.reasoning) if completion.reasoning else None
        if completion.tool_calls:
            record.tool_calls = [self.redactor.json(call.model_dump()) for call in completion.tool_calls]  # type: ignore[misc]
        record.usage_estimated = completion.usage_estimated

    async def run_layer(
        self,
        layer_no: int,
        layer: LayerSpec,
        messages_for: Sequence[list[ChatMessage]] | list[ChatMessage],
        trace: Trace,
        t0: float,
    ) -> list[Response]:
        """Send every proposer call of a layer concurrently and return the successful responses in proposer order.

        With ``min_responses`` and/or ``deadline_s`` the layer leaves stragglers behind: once the
        deadline has passed (immediately when no deadline is set) and at least ``min_responses``
        calls have answered, the pending calls are cancelled and traced as ``cut``. Without a deadline, the
        straggler bound (``straggler_wait_s``, :meth:`_await_quorum`) cuts them once most of the layer answered.
        """
        start = time.perf_counter()
        record = LayerRecord(layer=layer_no, role="proposer")
        trace.layers.append(record)
        per_call = messages_for if messages_for and isinstance(messages_for[0], list) else [messages_for] * len(layer.proposers)
        tasks = {
            asyncio.create_task(self.call(spec, msgs, layer=layer_no, index=i, role="proposer", trace=trace, t0=t0)): i  # type: ignore[arg-type]
            for i, (spec, msgs) in enumerate(zip(layer.proposers, per_call, strict=True))
        }
        bound: StragglerBound | None = None
        try:
            done, bound = await self._await_quorum(set(tasks), layer)
        finally:
            pending = [t for t in tasks if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        record.wall_s = time.perf_counter() - start
        if bound is not None:
            bound.mark(trace.calls_in(layer_no), {tasks[t] for t in pending})
        responses = [
            Response(index=tasks[t], spec=layer.proposers[tasks[t]], completion=completion)
            for t in done
            if not t.cancelled() and (completion := t.result()) is not None
        ]
        responses.sort(key=lambda r: r.index)
        if not responses:
            errors = "; ".join(c.error or c.status for c in trace.calls_in(layer_no))
            raise LayerFailed(f"layer {layer_no}: every proposer failed ({errors})", trace)
        return responses

    @staticmethod
    async def _await_quorum(tasks: set[CallTask], layer: LayerSpec) -> tuple[set[CallTask], StragglerBound | None]:
        """The calls to go on with, once the layer's rule allows: its quorum and deadline when it sets either, else
        every call, or the straggler bound's cut (returned when it cut); the rest are left pending."""
        start = time.perf_counter()
        explicit = layer.min_responses is not None or layer.deadline_s is not None
        quorum = layer.min_responses or 1
        straggling = layer.straggler_wait_s is not None and layer.deadline_s is None
        # most of the layer (and its quorum) must have answered before the rest count as stragglers
        enough = max(quorum, math.ceil(len(tasks) / 2))
        done: set[CallTask] = set()
        pending = set(tasks)
        slowest_s = 0.0  # when the slowest answer so far came, from the layer's start
        while pending:
            now = time.perf_counter() - start
            answered = sum(1 for t in done if not t.cancelled() and t.result() is not None)
            if explicit and answered >= quorum and now >= (layer.deadline_s or 0.0):
                return done, None
            wake: list[float] = [layer.deadline_s] if explicit and layer.deadline_s and now < layer.deadline_s else []
            if straggling and answered >= enough:
                bound = StragglerBound(layer.straggler_wait_s or 0.0, layer.straggler_factor, slowest_s, answered, len(tasks))
                if now >= bound.after_s:
                    return done, bound
                wake.append(bound.after_s)
            newly, pending = await asyncio.wait(pending, timeout=min(wake) - now if wake else None, return_when=asyncio.FIRST_COMPLETED)
            if any(not t.cancelled() and t.result() is not None for t in newly):
                slowest_s = time.perf_counter() - start
            done |= newly
        return done, None

    # ------------------------------------------------------------------ entry points

    def _new_trace(self, timeout_s: float | None) -> Trace:
        trace = Trace(pipeline=self.name, kind=self.spec.kind, settings=self.settings)  # type: ignore[attr-defined]
        trace.set_deadline(timeout_s)
        return trace

    @staticmethod
    def _check_structure(record: CallRecord, completion: Completion, params: ChatParams | None, trace: Trace) -> None:
        """Raise :class:`InvalidStructuredOutput` when the answer breaks the format the request asked for."""
        if completion.tool_calls:
            return  # the model acted instead of answering: its tool calls are the response
        problem = structure_error(completion.text, params)
        if problem is not None:
            record.status, record.error, record.error_type = "error", problem, InvalidStructuredOutput.__name__
            raise InvalidStructuredOutput(f"the {record.role} ({record.model}): {problem}", trace)

    def _finish(self, trace: Trace, t0: float) -> None:
        trace.wall_s = time.perf_counter() - t0
        fill_accounting(trace, self.models)
        record_trace(trace)

    async def run(
        self, messages: list[ChatMessage] | list[dict[str, Any]] | str, params: ChatParams | None = None, *, timeout_s: float | None = None
    ) -> PipelineResult:
        """Answer one conversation. ``params`` (e.g. the endpoint's max_tokens) apply to the final call; ``timeout_s``
        is the request's one deadline, which every call and every retry shares."""
        t0 = time.perf_counter()
        trace = self._new_trace(timeout_s)
        conversation = as_messages(messages)
        try:
            step = await self.plan(advisory_messages(conversation, params.tools if params else None), trace, t0)
            if isinstance(step, KnownAnswer):
                return PipelineResult(answer=step.text, finish_reason=step.finish_reason, trace=trace)
            final_start = time.perf_counter()
            trace.layers.append(LayerRecord(layer=step.layer, role="aggregator"))
            completion = await self.call(
                step.spec,
                final_messages(conversation, step, params),
                layer=step.layer,
                index=0,
                role=step.role,
                trace=trace,
                t0=t0,
                params=params,
                structured=True,
            )
            trace.layers[-1].wall_s = time.perf_counter() - final_start
            if completion is None:
                tried = [c for c in trace.calls if c.layer == step.layer and c.role == step.role]
                raise AggregatorFailed(f"the {step.role} ({step.spec.model}) failed: {failure_text(tried)}", trace)
            return PipelineResult(
                answer=completion.text,
                finish_reason=completion.finish_reason,
                tool_calls=completion.tool_calls,
                reasoning=completion.reasoning,
                logprobs=completion.logprobs,
                trace=trace,
            )
        finally:
            self._finish(trace, t0)

    async def _stream_call(
        self, model: str, sent: list[ChatMessage], wanted: ChatParams, trace: Trace, final: _StreamedCall
    ) -> AsyncGenerator[StreamChunk, None]:
        """The pieces of one streamed final call to ``model`` (its thinking apart); ``final`` gets its completion and
        whether any piece reached the caller. The call gets what is left of the deadline, rate-limit room first."""
        agent = self.agents[model]
        spec = ProposerSpec(model=model)
        chunks: Callable[[list[ChatMessage], ChatParams], AsyncIterator[StreamChunk]] = agent.stream
        if isinstance(agent, RateLimitedAgent):
            chunks = functools.partial(agent.stream_admitted, await self._admit(agent, spec, sent, wanted, trace))
        left = trace.time_left_s()
        if left is not None:
            wanted = wanted.model_copy(update={"timeout_s": max(left, 0.001)})
        thinking = ThinkSplitter()  # <think> text streams as reasoning, not as the answer
        async for chunk in chunks(sent, wanted):
            if chunk.completion is not None:
                final.completion = chunk.completion
                continue
            answer, thought = thinking.feed(chunk.delta) if chunk.delta else ("", "")
            piece = StreamChunk(delta=answer, reasoning=chunk.reasoning + thought, tool_calls=chunk.tool_calls, logprobs=chunk.logprobs)
            if piece.delta or piece.reasoning or piece.tool_calls or piece.logprobs:
                final.started = True
                yield piece
        answer, thought = thinking.flush()
        if answer or thought:
            final.started = True
            yield StreamChunk(delta=answer, reasoning=thought)

    async def _plan_live(
        self, messages: list[ChatMessage], trace: Trace, t0: float
    ) -> AsyncGenerator[CallEvent | FinalCall | KnownAnswer, None]:
        """:meth:`plan`, yielding a :class:`CallEvent` the moment each of its calls ends, then the plan's step."""
        queue: asyncio.Queue[CallRecord | None] = asyncio.Queue()
        trace.listen(queue.put_nowait)
        task = asyncio.create_task(self.plan(messages, trace, t0))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (record := await queue.get()) is not None:
                yield CallEvent(record)
            yield task.result()
        finally:
            trace.listen(None)
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def stream(
        self,
        messages: list[ChatMessage] | list[dict[str, Any]] | str,
        params: ChatParams | None = None,
        *,
        timeout_s: float | None = None,
        call_events: bool = False,
    ) -> AsyncGenerator[StreamChunk | CallEvent | PipelineResult, None]:
        """Run the layers, then stream the final call's deltas; the last item is the :class:`PipelineResult`.
        The caller bounds the stream's own wait by the same ``timeout_s``; the final call gets what is left of it.
        With ``call_events`` every earlier call (proposers, judge, moderator) comes as a :class:`CallEvent` the
        moment it ends, before the final call's first delta."""
        t0 = time.perf_counter()
        trace = self._new_trace(timeout_s)
        conversation = as_messages(messages)
        advisory = advisory_messages(conversation, params.tools if params else None)
        step: FinalCall | KnownAnswer | None = None
        try:
            if call_events:
                async for item in self._plan_live(advisory, trace, t0):
                    if isinstance(item, CallEvent):
                        yield item
                    else:
                        step = item
            else:
                step = await self.plan(advisory, trace, t0)
        except BaseException:  # a failed layer's trace still says how long the request ran
            self._finish(trace, t0)
            raise
        assert step is not None
        if isinstance(step, KnownAnswer):
            self._finish(trace, t0)
            yield StreamChunk(delta=step.text)
            yield PipelineResult(answer=step.text, finish_reason=step.finish_reason, trace=trace)
            return
        final_start = time.perf_counter()
        layer = LayerRecord(layer=step.layer, role="aggregator")
        trace.layers.append(layer)
        sent = with_role(final_messages(conversation, step, params), step.spec.system)
        tried: list[CallRecord] = []
        completion: Completion | None = None
        for model in itertools.chain([step.spec.model], self._fallbacks(step.spec.model, trace)):  # fallbacks while time is left
            record = CallRecord(
                layer=step.layer,
                role=step.role,
                model=model,
                label=step.spec.model_copy(update={"model": model}).label,
                start_s=time.perf_counter() - t0,
                fallback_of=step.spec.model if tried else None,
            )
            trace.calls.append(record)
            tried.append(record)
            final = _StreamedCall()
            try:
                async for piece in self._stream_call(model, sent, call_params(step.spec, params), trace, final):
                    yield piece
            except Exception as err:  # noqa: BLE001 - recorded, then made again on a fallback or surfaced as AggregatorFailed
                record.status = "error"
                record_error(record, err)
            else:
                completion = final.completion
                if completion is None:
                    record.status, record.error = "error", "stream ended without a completion"
            layer.wall_s = time.perf_counter() - final_start
            record.latency_s = time.perf_counter() - t0 - record.start_s  # the stream's own wall time, first byte to last
            if record.status != "ok":
                trace.call_ended(record)  # final: counted in the metrics (the answered one below, once complete)
            if record.status == "ok" or final.started:  # answered, or failed after pieces reached the client: no fallback
                break
        if completion is None or tried[-1].status != "ok":
            self._finish(trace, t0)
            raise AggregatorFailed(f"the {step.role} ({step.spec.model}) failed: {failure_text(tried)}", trace)
        completion, answered = without_thinking(completion), tried[-1]
        wall_s = answered.latency_s
        self._record_completion(answered, completion, wall_s)
        answered.latency_s = wall_s  # the stream's own wall time, first byte to last
        try:
            self._check_structure(answered, completion, params, trace)
        finally:
            trace.call_ended(answered)  # after the check: the metrics count a broken answer as an error
            self._finish(trace, t0)
        yield PipelineResult(
            answer=completion.text,
            finish_reason=completion.finish_reason,
            tool_calls=completion.tool_calls,
            reasoning=completion.reasoning,
            logprobs=completion.logprobs,
            trace=trace,
        )
