"""OpenAI chat requests -> pipeline runs -> OpenAI responses (plain or server-sent events).

Transport-free, so the same code runs inside the Serve ingress replica and in
unit tests with in-process agents. Every request is checked against the
configured ``server`` limits before any model is called, and every string that
leaves (answers aside) passes the :class:`~moa_ray.serve.auth.Redactor`.

The ``moa`` request extension: ``"trace": true`` (or ``"summary"``) returns the trace without texts,
``"trace": "full"`` with each call's text; ``"stream_layers": true`` on a streamed request sends each call
before the final one as a ``chat.completion.chunk`` with no choices and a ``moa`` field the moment it ends
(:func:`call_event`). Texts leave only when asked for, and never reach the log. ``proposers``, ``layers``,
``k`` and ``aggregator`` shape the pipeline for the request (:mod:`moa_ray.pipeline.overrides`).

A pipeline as an agent's model: ``tools`` and ``response_format`` reach the answering call only (proposers
advise in text: :func:`~moa_ray.prompts.advisory_messages`), its tool calls are the response, streamed as
OpenAI's deltas, and an answer that breaks the requested schema is an error, not a success.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

from pydantic import ValidationError

from moa_ray.backends.registry import tools_unsupported
from moa_ray.chat import StreamChunk
from moa_ray.config import MoARayConfig
from moa_ray.errors import PipelineError
from moa_ray.pipeline.base import DEADLINE_GRACE_S, CallEvent, Pipeline, PipelineResult
from moa_ray.pipeline.overrides import OverrideError, answering_call, apply_overrides
from moa_ray.pipeline.structured import schema_problem
from moa_ray.pipeline.trace import CallRecord, Trace
from moa_ray.serve.access_log import CLIENT_CLOSED, RequestOutcome
from moa_ray.serve.auth import Redactor
from moa_ray.serve.http_errors import APIError, from_pipeline_error, from_validation_error
from moa_ray.serve.openai_schema import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    ModelCard,
    ModelList,
    UsageOut,
    completion_id,
    finish_reason,
)
from moa_ray.streaming import coalesce

#: What can put a lone surrogate into a parsed JSON string: a ``\\ud800``-``\\udfff`` escape, or the raw UTF-8-style
#: bytes of one (``ED A0 80``...), which ``json.loads`` of bytes lets through (it decodes with ``surrogatepass``).
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")

# A child of "ray.serve", so Serve writes these lines to the replica's log file.
log = logging.getLogger("ray.serve.moa_ray.ingress")


def usage_of(trace: Trace) -> UsageOut:
    """Usage summed over every call the pipeline made (proposers, judges, aggregator...)."""
    totals = trace.totals()
    return UsageOut(prompt_tokens=totals.prompt_tokens, completion_tokens=totals.completion_tokens, total_tokens=totals.total_tokens)


def _began(outcome: RequestOutcome | None, request: ChatCompletionRequest) -> RequestOutcome:
    """The request's outcome (a fresh one where nobody logs it), now naming its pipeline."""
    outcome = outcome or RequestOutcome(request_id="", started=time.perf_counter())
    outcome.pipeline, outcome.stream = request.model, bool(request.stream)
    return outcome


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


_MARK = "\x00moa-delta\x00"

#: The fields of a call that a ``stream_layers`` event carries (the call's text among them).
CALL_EVENT_FIELDS = (
    "layer",
    "index",
    "role",
    "model",
    "label",
    "status",
    "text",
    "error",
    "prompt_tokens",
    "completion_tokens",
    "latency_s",
    "start_s",
    "selected",
    "reused",
    "reasoning",
)


def call_event(record: CallRecord) -> dict[str, Any]:
    """The ``moa`` field of a ``stream_layers`` event: ``{"event": "call", "call": {layer, index, role, ...}}``
    (``index`` counts from 0 within the layer; the caller redacts it)."""
    return {"event": "call", "call": record.model_dump(mode="json", include=set(CALL_EVENT_FIELDS))}


def content_event_template(rid: str, created: int, model: str, fingerprint: str | None = None) -> tuple[str, str]:
    """The text around a content delta's JSON string in its stream's events.

    A stream sends an event per delta that differs only in the text; the chunk model built once
    (with a marker for the text) gives the bytes around it, so each delta costs one ``json.dumps``
    of its text instead of building, dumping and encoding a model: the same bytes either way.
    """
    chunk = ChatCompletionChunk(
        id=rid, created=created, model=model, system_fingerprint=fingerprint, choices=[ChunkChoice(delta=Delta(content=_MARK))]
    )
    head, tail = sse(chunk.wire()).split(json.dumps(_MARK), 1)
    return head, tail


def fingerprint(pipeline: Pipeline) -> str:
    """``system_fingerprint``: a digest of what decides the pipeline's answers (its spec, its models' answer
    settings), so a client sees when the configuration behind a pipeline name changed, as OpenAI's does."""
    spec: Any = pipeline.spec
    models = {m: pipeline.models[m].answer_settings() for _, c in spec.calls() if pipeline.models and (m := c.model) in pipeline.models}
    material = json.dumps({"pipeline": spec.model_dump(mode="json"), "models": models}, sort_keys=True, default=str)
    return "fp_" + hashlib.sha256(material.encode()).hexdigest()[:12]


class ChatService:
    """Validates requests against the config's limits and runs them on the named pipeline."""

    def __init__(self, config: MoARayConfig, pipelines: Mapping[str, Pipeline], redactor: Redactor) -> None:
        self.config = config
        self.limits = config.server
        self.pipelines = dict(pipelines)
        self.redactor = redactor
        self.created = int(time.time())
        self.fingerprints = {name: fingerprint(p) for name, p in self.pipelines.items()}

    # ------------------------------------------------------------------ models

    def models(self) -> ModelList:
        return ModelList(data=[self.model_card(name) for name in self.pipelines])

    def model_card(self, name: str) -> ModelCard:
        if name not in self.pipelines:
            raise self._unknown(name)
        spec = self.config.pipelines[name]
        return ModelCard(id=name, created=self.created, kind=spec.kind, description=spec.description)

    def _unknown(self, name: str) -> APIError:
        known = ", ".join(self.pipelines) or "none"
        return APIError(
            404, f"the model {name!r} does not exist; models are pipeline names: {known}", code="model_not_found", param="model"
        )

    # ------------------------------------------------------------------ validation

    def parse(self, body: bytes) -> ChatCompletionRequest:
        """JSON -> request, then the limits of ``config.server``; every failure is a 4xx :class:`APIError`."""
        try:
            data = json.loads(body)
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
        except ValueError as err:  # invalid JSON or UTF-8, or an integer of more digits than Python parses
            raise APIError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        if _SURROGATE.search(body):  # a lone UTF-16 surrogate, escaped or raw, which no model can encode
            try:
                json.dumps(data, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, "the request holds text that is not valid Unicode (a lone surrogate)", code="invalid_json") from None
        try:
            request = ChatCompletionRequest.model_validate(data)
        except ValidationError as err:
            raise from_validation_error(err) from None
        if request.model not in self.pipelines:
            raise self._unknown(request.model)
        if request.moa.stream_layers and not request.stream:
            raise APIError(
                400,
                "moa.stream_layers needs a streamed request (stream: true); a plain request gets every call's text "
                'with "moa": {"trace": "full"}',
                code="invalid_request",
                param="moa.stream_layers",
            )
        self._check_limits(request)
        self._check_conversation(request)
        self._check_answerer(request, self.pipeline_for(request))
        return request

    def pipeline_for(self, request: ChatCompletionRequest) -> Pipeline:
        """The request's pipeline, shaped by its ``moa`` settings (proposers, layers, k, aggregator sampling)."""
        pipeline = self.pipelines[request.model]
        overrides = request.moa.overrides()
        if overrides.empty:
            return pipeline
        try:
            spec = apply_overrides(pipeline.spec, overrides, self.config.models)
        except OverrideError as err:
            raise APIError(400, str(err), code="invalid_request", param=err.param) from None
        return pipeline.with_spec(spec, overrides.model_dump(exclude_none=True))

    def _fingerprint(self, request: ChatCompletionRequest, pipeline: Pipeline) -> str:
        return self.fingerprints[request.model] if pipeline is self.pipelines[request.model] else fingerprint(pipeline)

    @staticmethod
    def _check_conversation(request: ChatCompletionRequest) -> None:
        """A tool message answers a call of the assistant message right before it (and its earlier tool messages)."""
        calls: set[str] = set()
        for i, message in enumerate(request.messages):
            if message.role == "assistant":
                calls = {c.id for c in message.tool_calls or []}
            elif message.role == "tool":
                if message.tool_call_id not in calls:
                    raise APIError(
                        400,
                        f"messages[{i}] answers the tool call {message.tool_call_id!r}, which the assistant message before it did not make",
                        code="invalid_request",
                        param=f"messages[{i}].tool_call_id",
                    )
            else:
                calls = set()

    def _check_answerer(self, request: ChatCompletionRequest, pipeline: Pipeline) -> None:
        """Tools and a response format need an answering call whose backend can honour them; 400 naming it."""
        tools = request.active_tools
        structured = request.response_format is not None and request.response_format.type != "text"
        if not tools and not structured:
            return
        param = "tools" if tools else "response_format"
        answerer = answering_call(pipeline.spec)
        if answerer is None:
            raise APIError(
                400,
                f"the pipeline {request.model!r} ({pipeline.spec.kind}) returns one proposer's answer verbatim: "  # type: ignore[attr-defined]
                f"it cannot call tools or follow a response_format",
                code="invalid_request",
                param=param,
            )
        if tools and (reason := tools_unsupported(answerer.model, self.config.models[answerer.model])) is not None:
            raise APIError(400, f"the pipeline {request.model!r} cannot call tools: {reason}", code="tools_unsupported", param="tools")
        schema = request.response_format.json_schema if request.response_format is not None else None
        if schema is not None and (problem := schema_problem(schema.schema_)) is not None:
            raise APIError(
                400, f"response_format.json_schema.schema is {problem}", code="invalid_request", param="response_format.json_schema.schema"
            )

    def _check_limits(self, request: ChatCompletionRequest) -> None:
        limits = self.limits
        if len(request.messages) > limits.max_messages:
            raise APIError(
                400,
                f"{len(request.messages)} messages exceed this server's limit of {limits.max_messages}",
                code="too_many_messages",
                param="messages",
            )
        for i, message in enumerate(request.messages):
            size = len(message.text) + sum(len(c.function.arguments) for c in message.tool_calls or [])
            if size > limits.max_message_chars:
                raise APIError(
                    400,
                    f"messages[{i}] has {size} characters; this server's limit is {limits.max_message_chars}",
                    code="message_too_long",
                    param=f"messages[{i}].content",
                )
        wanted = request.requested_max_tokens
        if wanted is not None and wanted > limits.max_tokens_limit:
            param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
            raise APIError(
                400,
                f"{param}={wanted} exceeds this server's limit of {limits.max_tokens_limit}",
                code="max_tokens_exceeded",
                param=param,
            )

    # ------------------------------------------------------------------ running

    def _moa_extension(self, request: ChatCompletionRequest, trace: Trace) -> dict[str, Any] | None:
        """The response's ``moa`` field: the trace at the detail asked for (texts only in a ``full`` one)."""
        if request.moa.trace is None:
            return None
        return {"trace": self.redactor.json(trace.to_json_dict(request.moa.trace))}

    def _pipeline_error(self, request: ChatCompletionRequest, err: PipelineError) -> APIError:
        if err.trace is not None and err.trace.time_left_s() is not None and err.trace.time_left_s() <= 0:
            return self._timeout(request)  # the calls failed because the request's deadline passed
        api_err = from_pipeline_error(err)
        api_err.message = self.redactor.text(api_err.message)
        log.warning("%s: %d %s", request.model, api_err.status, api_err.message)
        return api_err

    def _timeout(self, request: ChatCompletionRequest) -> APIError:
        log.warning("%s: timed out after %.0f s", request.model, self.limits.request_timeout_s)
        return APIError(
            504,
            f"the pipeline did not finish within {self.limits.request_timeout_s:g} s",
            code="timeout",
            type="upstream_error",
            retry=False,
        )

    async def complete(self, request: ChatCompletionRequest, outcome: RequestOutcome | None = None) -> ChatCompletion:
        """Run the pipeline to the end and answer in one response; ``outcome`` (the access log's) gets its trace."""
        pipeline = self.pipeline_for(request)
        outcome = _began(outcome, request)
        try:
            result = await asyncio.wait_for(
                pipeline.run(request.chat_messages(), request.chat_params(), timeout_s=self.limits.request_timeout_s),
                self.limits.request_timeout_s + DEADLINE_GRACE_S,
            )
        except PipelineError as err:
            outcome.trace = err.trace
            raise self._pipeline_error(request, err) from None
        except asyncio.TimeoutError:
            raise self._timeout(request) from None
        outcome.trace = result.trace
        self._log_done(request, result)
        message = AssistantMessage(
            content=None if result.tool_calls and not result.answer else result.answer,
            tool_calls=result.tool_calls,
            reasoning_content=result.reasoning,
        )
        return ChatCompletion(
            model=request.model,
            system_fingerprint=self._fingerprint(request, pipeline),
            choices=[
                Choice(
                    message=message,
                    finish_reason=finish_reason(result.finish_reason, bool(result.tool_calls)),
                    logprobs=ChoiceLogprobs.of(result.logprobs),
                )
            ],
            usage=usage_of(result.trace),
            moa=self._moa_extension(request, result.trace),
        )

    async def open_stream(self, request: ChatCompletionRequest, outcome: RequestOutcome | None = None) -> AsyncIterator[str]:
        """Run the layers and wait for the final call's first token, then return the SSE events.

        Waiting before the response starts means a pipeline that fails before answering
        still gets a proper HTTP status (502/504) instead of an error inside a 200 stream.
        A request with ``"moa": {"stream_layers": true}`` starts (200) at its first call event instead: a
        failure after that (every proposer failed, the aggregator failed) is an error event inside the stream.
        ``outcome`` (the access log's) gets the first token's time, the trace, and such an error's status.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.request_timeout_s + DEADLINE_GRACE_S
        pipeline = self.pipeline_for(request)
        outcome = _began(outcome, request)
        # deltas coalesced by time and size: fewer events through the Serve proxy and to the client, same bytes
        items: AsyncGenerator[Any, None] = pipeline.stream(
            request.chat_messages(),
            request.chat_params(),
            timeout_s=self.limits.request_timeout_s,
            call_events=request.moa.stream_layers,
        )
        if self.limits.stream_coalesce_ms:
            items = coalesce(items, window_s=self.limits.stream_coalesce_ms / 1000)
        try:
            first = await asyncio.wait_for(items.__anext__(), self.limits.request_timeout_s + DEADLINE_GRACE_S)
        except PipelineError as err:
            await items.aclose()
            outcome.trace = err.trace
            raise self._pipeline_error(request, err) from None
        except asyncio.TimeoutError:
            await items.aclose()
            raise self._timeout(request) from None
        return self._events(request, items, first, deadline, self._fingerprint(request, pipeline), outcome)

    async def _events(
        self,
        request: ChatCompletionRequest,
        items: AsyncGenerator[Any, None],
        first: Any,
        deadline: float,
        fp: str,
        outcome: RequestOutcome,
    ) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        rid, created = completion_id(), int(time.time())

        def chunk(delta: Delta | None, finish: Any = None, logprobs: ChoiceLogprobs | None = None, **extra: Any) -> str:
            choices = [ChunkChoice(delta=delta, finish_reason=finish, logprobs=logprobs)] if delta is not None else []
            return sse(
                ChatCompletionChunk(id=rid, created=created, model=request.model, system_fingerprint=fp, choices=choices, **extra).wire()
            )

        head, tail = content_event_template(rid, created, request.model, fp)
        yield chunk(Delta(role="assistant", content=""))
        item, result = first, None
        try:
            while not isinstance(item, PipelineResult):
                if isinstance(item, StreamChunk):
                    outcome.first_token()
                if isinstance(item, CallEvent):  # only asked for with stream_layers
                    yield chunk(None, moa=self.redactor.json(call_event(item.record)))
                elif isinstance(item, StreamChunk) and item.is_text:
                    if item.delta:
                        yield head + json.dumps(item.delta) + tail
                else:  # thinking, tool calls, tokens' logprobs: OpenAI's fields for them
                    delta = Delta(content=item.delta or None, reasoning_content=item.reasoning or None, tool_calls=item.tool_calls)
                    yield chunk(delta, logprobs=ChoiceLogprobs.of(item.logprobs))
                item = await asyncio.wait_for(items.__anext__(), max(deadline - loop.time(), 0.001))
            result = item
        except PipelineError as err:
            outcome.trace = err.trace
            error = self._pipeline_error(request, err)
            outcome.error_status = error.status
            yield sse(error.body().model_dump())
        except asyncio.TimeoutError:
            outcome.error_status = 504
            yield sse(self._timeout(request).body().model_dump())
        except (GeneratorExit, asyncio.CancelledError):  # the client went away mid-stream
            outcome.error_status = CLIENT_CLOSED
            raise
        finally:
            await items.aclose()
        if result is not None:
            outcome.trace = result.trace
            self._log_done(request, result)
            usage = usage_of(result.trace)
            yield chunk(
                Delta(), finish_reason(result.finish_reason, bool(result.tool_calls)), moa=self._moa_extension(request, result.trace)
            )
            if request.stream_options is not None and request.stream_options.include_usage:
                yield chunk(None, usage=usage)
        yield sse("[DONE]")

    def _log_done(self, request: ChatCompletionRequest, result: PipelineResult) -> None:
        totals = result.trace.totals()
        log.info(
            "%s: ok in %.2f s, %d calls, %d tokens%s",
            request.model,
            result.trace.wall_s,
            totals.calls,
            totals.total_tokens,
            " (stream)" if request.stream else "",
        )
