"""The OpenAI chat-completions wire format, as pydantic models.

Requests are validated strictly (unknown fields are rejected, as OpenAI does) so
a client that asks for something moa-ray cannot do (``n > 1``, tools, logprobs)
gets a 400 naming the field instead of a silently different answer.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moa_ray.chat import ChatMessage, ChatParams
from moa_ray.pipeline.trace import TraceDetail

# --------------------------------------------------------------------------- request


#: OpenAI accepts at most four stop sequences; more would pass here and be refused by the provider.
MAX_STOP = 4


class TextPart(BaseModel):
    """A text content part (``{"type": "text", "text": ...}``); other part types are not supported."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class RequestMessage(BaseModel):
    """One message of the conversation; ``developer`` is OpenAI's newer name for ``system``."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def to_chat(self) -> ChatMessage:
        return ChatMessage(role="system" if self.role == "developer" else self.role, content=self.text)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object"]


class MoAOptions(BaseModel):
    """The ``moa`` extension field: moa-ray specific switches."""

    model_config = ConfigDict(extra="forbid")

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
    n: int = Field(default=1, description="Only one choice per request is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    presence_penalty: float | None = Field(default=None, description="Not supported; only 0 is accepted.")
    frequency_penalty: float | None = Field(default=None, description="Not supported; only 0 is accepted.")
    logprobs: bool | None = Field(default=None, description="Not supported; only false is accepted.")
    user: str | None = None
    moa: MoAOptions = Field(default_factory=MoAOptions)

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, v: list[RequestMessage]) -> list[RequestMessage]:
        if not v:
            raise ValueError("messages must contain at least one message")
        return v

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported: a pipeline returns one answer")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v:
            raise ValueError("penalties are not supported by moa-ray pipelines; send 0 or leave it out")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("logprobs are not supported by moa-ray pipelines")
        return v

    @model_validator(mode="after")
    def _one_max_tokens(self) -> ChatCompletionRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

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
        if self.response_format is not None and self.response_format.type == "json_object":
            fields["json_mode"] = True
        return ChatParams(**fields)


# --------------------------------------------------------------------------- response

FinishReason = Literal["stop", "length", "content_filter"]


def finish_reason(value: str | None) -> FinishReason:
    """Map a backend's finish reason onto OpenAI's values (unknown or missing means ``stop``)."""
    return value if value in ("stop", "length", "content_filter") else "stop"  # type: ignore[return-value]


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: UsageOut
    moa: dict[str, Any] | None = Field(default=None, description="Extension: the trace when the request asked for it.")

    def wire(self) -> dict[str, Any]:
        """The JSON body; the ``moa`` extension only when there is one."""
        data = self.model_dump()
        if data["moa"] is None:
            del data["moa"]
        return data


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: UsageOut | None = None
    moa: dict[str, Any] | None = None

    def wire(self) -> dict[str, Any]:
        """The event's JSON: unset delta fields, usage and ``moa`` are left out, as OpenAI does."""
        data = self.model_dump()
        for key in ("usage", "moa"):
            if data[key] is None:
                del data[key]
        for choice in data["choices"]:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
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
