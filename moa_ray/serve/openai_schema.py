"""The OpenAI chat-completions wire format, as pydantic models.

Every field of OpenAI's chat-completions request is accepted (the official SDKs and agent frameworks send
several by default); unknown fields are rejected, as OpenAI does, so a typo or a field of another API gets a
400 naming it instead of a silently different answer. What a field does in a pipeline:

* applied to the answering call (the aggregator; a ``single`` pipeline's model): ``temperature``, ``top_p``,
  ``max_tokens`` / ``max_completion_tokens``, ``stop``, ``seed``, ``presence_penalty``, ``frequency_penalty``,
  ``logit_bias``, ``reasoning_effort``, ``response_format``, ``tools``, ``tool_choice``, ``parallel_tool_calls``,
  ``logprobs`` / ``top_logprobs`` (the answering call's tokens, where its engine returns them);
* refused with a 400 where a pipeline cannot do what is asked: ``n > 1``, the deprecated
  ``functions`` / ``function_call`` (send ``tools``), content parts other than text;
* accepted and ignored (:data:`IGNORED_FIELDS`): they steer OpenAI's own service (storage, tiers, caching,
  moderation, web search, audio) or only ever shape the answer's style (``verbosity``).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from moa_ray.chat import (
    ChatMessage,
    ChatParams,
    FunctionCall,
    NamedToolChoice,
    ReasoningEffort,
    ResponseSchema,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolDefinition,
)
from moa_ray.pipeline.overrides import PipelineOverrides
from moa_ray.pipeline.trace import TraceDetail

# --------------------------------------------------------------------------- request


#: OpenAI accepts at most four stop sequences; more would pass here and be refused by the provider.
MAX_STOP = 4

#: Request fields accepted and ignored: what they ask for is OpenAI's service (storing completions, service
#: tiers, prompt caching, moderation, web search, audio output) or a style hint no other provider takes.
IGNORED_FIELDS = (
    "audio",
    "metadata",
    "modalities",
    "moderation",
    "prediction",
    "prompt_cache_key",
    "prompt_cache_options",
    "prompt_cache_retention",
    "safety_identifier",
    "service_tier",
    "store",
    "user",
    "verbosity",
    "web_search_options",
    "stream_options.include_obfuscation",
)


class TextPart(BaseModel):
    """A text content part (``{"type": "text", "text": ...}``); other part types are not supported."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class RefusalPart(BaseModel):
    """An earlier assistant turn's refusal, as a content part."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["refusal"]
    refusal: str


class RequestFunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    arguments: str


class RequestToolCall(BaseModel):
    """A tool call of an earlier assistant turn, replayed by the client."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    type: Literal["function"]
    function: RequestFunctionCall


class RequestMessage(BaseModel):
    """One message of the conversation; ``developer`` is OpenAI's newer name for ``system``.

    An assistant turn may carry ``tool_calls`` (and then null content); a ``tool`` turn answers one of them by
    ``tool_call_id``.
    """

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str | list[TextPart | RefusalPart] | None, Field(validate_default=True)] = None
    name: str | None = None
    tool_calls: list[RequestToolCall] | None = None
    tool_call_id: Annotated[str | None, Field(validate_default=True)] = None
    refusal: str | None = None
    audio: dict[str, Any] | None = Field(default=None, description="A reference to an earlier audio answer: ignored.")
    function_call: dict[str, Any] | None = Field(default=None, description="Deprecated: refused (replay tool_calls).")

    @field_validator("content")
    @classmethod
    def _content(cls, v: Any, info: ValidationInfo) -> Any:
        role = info.data.get("role")
        if v is None and role != "assistant":
            raise ValueError(f"a {role} message needs content")
        if isinstance(v, list) and role != "assistant" and any(isinstance(part, RefusalPart) for part in v):
            raise ValueError("refusal parts belong to assistant messages")
        return v

    @field_validator("tool_call_id")
    @classmethod
    def _tool_call_id(cls, v: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("role") == "tool" and not v:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return v

    @field_validator("function_call")
    @classmethod
    def _no_function_call(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            raise ValueError("function_call is deprecated; replay the call as tool_calls")
        return v

    @model_validator(mode="after")
    def _role_fields(self) -> RequestMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return self.refusal or ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text if isinstance(part, TextPart) else part.refusal for part in self.content)

    def to_chat(self) -> ChatMessage:
        role = "system" if self.role == "developer" else self.role
        calls = [
            ToolCall(id=c.id, function=FunctionCall(name=c.function.name, arguments=c.function.arguments)) for c in self.tool_calls or []
        ]
        return ChatMessage(
            role=role, content=self.text, tool_calls=calls or None, tool_call_id=self.tool_call_id if self.role == "tool" else None
        )


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    include_obfuscation: bool | None = Field(default=None, description="OpenAI's padding of streamed events: ignored.")


class JSONSchemaFormat(BaseModel):
    """The ``json_schema`` of a ``response_format``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``text`` (the default), ``json_object`` (any JSON object) or ``json_schema`` (an answer that follows it)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema is required with type "json_schema", and only with it')
        return self


class MoAOptions(PipelineOverrides):
    """The ``moa`` extension field: moa-ray specific switches, and the request's own pipeline settings."""

    trace: TraceDetail | None = Field(
        default=None,
        description='Return the pipeline\'s trace: true or "summary" (every call, layer and token count), "full" '
        "(the same, plus each call's text: every proposer's answer, the judge's and moderator's raw verdicts).",
    )
    stream_layers: bool = Field(
        default=False,
        description="On a streamed request: send each call before the final one (proposers, judge, moderator) as an "
        "event the moment it ends, before the answer's deltas (see ChatService.open_stream).",
    )

    @field_validator("trace", mode="before")
    @classmethod
    def _trace_detail(cls, v: Any) -> Any:
        """``true`` keeps meaning the summary (as before detail levels existed); ``false`` or null: no trace."""
        if v is True:
            return "summary"
        if v is False or v is None:
            return None
        if isinstance(v, str) and v in ("summary", "full"):
            return v
        raise ValueError('trace must be true, false, "summary" or "full"')

    def overrides(self) -> PipelineOverrides:
        """The pipeline settings among the options."""
        return PipelineOverrides.model_validate(self.model_dump(include=set(PipelineOverrides.model_fields)))


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``; ``model`` names a pipeline. Sampling fields apply to the final call."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    messages: list[RequestMessage]
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = Field(
        default=None, description=f"Up to {MAX_STOP} stop sequences, as OpenAI allows (a provider refuses more)."
    )
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1, description="A 64-bit integer, as providers take.")
    n: int | None = Field(default=1, description="Only one choice per request is supported.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    logprobs: bool | None = Field(default=None, description="The answering call's token log probabilities.")
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="With logprobs: the N most likely tokens at each position.")
    reasoning_effort: ReasoningEffort | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = Field(default=None, description="Deprecated: refused (send tools).")
    function_call: str | dict[str, Any] | None = Field(default=None, description="Deprecated: refused (send tool_choice).")
    # accepted and ignored (IGNORED_FIELDS)
    audio: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    moderation: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    store: bool | None = None
    user: str | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    web_search_options: dict[str, Any] | None = None
    moa: MoAOptions = Field(default_factory=MoAOptions)

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, v: list[RequestMessage]) -> list[RequestMessage]:
        if not v:
            raise ValueError("messages must contain at least one message")
        return v

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("only n=1 is supported: a pipeline returns one answer")
        return v

    @field_validator("functions", "function_call")
    @classmethod
    def _no_functions(cls, v: Any) -> Any:
        if v is not None:
            raise ValueError("functions and function_call are deprecated; send tools and tool_choice")
        return v

    @model_validator(mode="after")
    def _one_max_tokens(self) -> ChatCompletionRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        return self

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(cls, v: ToolChoice | None, info: ValidationInfo) -> ToolChoice | None:
        tools = info.data.get("tools") or []
        if v == "required" and not tools:
            raise ValueError('"required" needs tools to choose from')
        if isinstance(v, NamedToolChoice) and v.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"names the function {v.function.name!r}, which is not among the tools")
        return v

    @property
    def streamed(self) -> bool:
        return bool(self.stream)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def active_tools(self) -> list[ToolDefinition] | None:
        """The tools the answering model gets: none when ``tool_choice`` is ``"none"`` (it would not call them)."""
        return None if self.tool_choice == "none" else self.tools or None

    def chat_messages(self) -> list[ChatMessage]:
        return [m.to_chat() for m in self.messages]

    def chat_params(self) -> ChatParams:
        """Only the fields the client set, so unset ones fall back to the aggregator's configured values."""
        fields: dict[str, Any] = {}
        if self.temperature is not None:
            fields["temperature"] = self.temperature
        if self.top_p is not None:
            fields["top_p"] = self.top_p
        if self.requested_max_tokens is not None:
            fields["max_tokens"] = self.requested_max_tokens
        if self.stop:
            fields["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if self.seed is not None:
            fields["seed"] = self.seed
        for name in ("presence_penalty", "frequency_penalty", "logit_bias", "reasoning_effort"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        if self.logprobs:
            fields["logprobs"] = True
            if self.top_logprobs is not None:
                fields["top_logprobs"] = self.top_logprobs
        if self.response_format is not None and self.response_format.type == "json_object":
            fields["json_mode"] = True
        if self.response_format is not None and self.response_format.json_schema is not None:
            spec = self.response_format.json_schema
            fields["response_schema"] = ResponseSchema(
                name=spec.name, json_schema=spec.schema_, strict=spec.strict, description=spec.description
            )
        if self.active_tools:
            fields["tools"] = self.active_tools
            if self.tool_choice is not None:
                fields["tool_choice"] = self.tool_choice
            if self.parallel_tool_calls is not None:
                fields["parallel_tool_calls"] = self.parallel_tool_calls
        return ChatParams(**fields)


# --------------------------------------------------------------------------- response

FinishReason = Literal["stop", "length", "content_filter", "tool_calls"]


def finish_reason(value: str | None, tool_calls: bool = False) -> FinishReason:
    """Map a backend's finish reason onto OpenAI's values (unknown or missing means ``stop``); an answer that
    calls tools finishes with ``tool_calls``, whatever the backend said."""
    if tool_calls:
        return "tool_calls"
    return value if value in ("stop", "length", "content_filter") else "stop"  # type: ignore[return-value]


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    """The answer: text, or the tools the answering model called (content null); a reasoning model's thinking
    comes as ``reasoning_content`` (left out when there is none)."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = None


class TopLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class LogprobOut(TopLogprobOut):
    top_logprobs: list[TopLogprobOut] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    """OpenAI's ``logprobs`` of a choice: the answering call's tokens."""

    content: list[LogprobOut] | None = None
    refusal: None = None

    @classmethod
    def of(cls, tokens: list[TokenLogprob] | None) -> ChoiceLogprobs | None:
        if tokens is None:
            return None
        return cls(
            content=[
                LogprobOut(
                    token=t.token,
                    logprob=t.logprob,
                    bytes=list(t.token.encode()),
                    top_logprobs=[TopLogprobOut(token=c.token, logprob=c.logprob, bytes=list(c.token.encode())) for c in t.top_logprobs],
                )
                for t in tokens
            ]
        )


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[Choice]
    usage: UsageOut
    moa: dict[str, Any] | None = Field(default=None, description="Extension: the trace when the request asked for it.")

    def wire(self) -> dict[str, Any]:
        """The JSON body; the ``moa`` extension, tool calls and reasoning only when there are any."""
        data = self.model_dump()
        if data["moa"] is None:
            del data["moa"]
        for choice in data["choices"]:
            for key in ("tool_calls", "reasoning_content"):
                if choice["message"][key] is None:
                    del choice["message"][key]
        return data


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: UsageOut | None = None
    moa: dict[str, Any] | None = None

    def wire(self) -> dict[str, Any]:
        """The event's JSON: unset delta fields, usage and ``moa`` are left out, as OpenAI does."""
        data = self.model_dump()
        for key in ("usage", "moa"):
            if data[key] is None:
                del data[key]
        for choice, wired in zip(self.choices, data["choices"], strict=True):
            wired["delta"] = choice.delta.model_dump(exclude_none=True)
        return data


class ModelCard(BaseModel):
    """One pipeline as an OpenAI "model"."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moa-ray"
    kind: str = Field(description="Extension: the pipeline kind (moa, smoa, single...).")
    description: str = ""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail
