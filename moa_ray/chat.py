"""Chat data types shared by backends, Serve deployments and pipelines.

These are the wire format of the async chat interface: they cross Ray Serve
handles as plain dicts (``model_dump``) so replicas and drivers need not share
pickled classes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["system", "user", "assistant"]


class ChatMessage(BaseModel):
    """One message of a chat conversation."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    content: str


class ChatParams(BaseModel):
    """Sampling parameters of one call; ``None`` means the model's configured default."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: list[str] | None = None
    seed: int | None = None
    json_mode: bool = False
    json_schema: dict[str, Any] | None = Field(
        default=None,
        description="With json_mode: a JSON schema the output must follow where the backend can enforce it "
        "(llama.cpp compiles it to a grammar, which keeps small models' structured output valid; vLLM uses its "
        "structured outputs); "
        "HTTP backends send plain JSON mode and rely on the prompt.",
    )
    timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="The call's whole budget in seconds, retries included: what is left of the request's deadline "
        "when the call starts (relative, so no clocks need to agree across nodes). None: only the model's own timeouts.",
    )
    logprobs: bool = Field(default=False, description="Ask for the log probability of each generated token (OpenAI's logprobs).")
    top_logprobs: int | None = Field(
        default=None, ge=0, le=20, description="With logprobs: also the N most likely tokens at each position (OpenAI's top_logprobs)."
    )


class Usage(BaseModel):
    """Token usage of one call."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class TopLogprob(BaseModel):
    """One candidate token at a position and its log probability."""

    token: str
    logprob: float


class TokenLogprob(BaseModel):
    """A generated token, its log probability and the most likely candidates at its position."""

    token: str
    logprob: float
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class Completion(BaseModel):
    """The result of one chat call: text, usage, latency and why generation stopped."""

    text: str
    usage: Usage = Field(default_factory=Usage)
    latency_s: float = 0.0
    finish_reason: str | None = None
    model: str = ""
    attempts: int = Field(default=1, ge=1, description="Provider attempts this answer took (retries + 1).")
    retries: list[str] = Field(default_factory=list, description="Why each earlier attempt failed (error class and status).")
    logprobs: list[TokenLogprob] | None = Field(
        default=None, description="Per generated token, when the call asked for logprobs and the engine returned them."
    )


class ChatRequest(BaseModel):
    """What a driver sends to an agent deployment."""

    messages: list[ChatMessage] = Field(min_length=1)
    params: ChatParams = Field(default_factory=ChatParams)


class StreamChunk(BaseModel):
    """A piece of a streamed completion; the last chunk carries the full :class:`Completion`."""

    delta: str = ""
    completion: Completion | None = None


def as_messages(messages: list[ChatMessage] | list[dict] | str) -> list[ChatMessage]:
    """Accept a prompt string, OpenAI-style dicts or ChatMessages."""
    if isinstance(messages, str):
        return [ChatMessage(role="user", content=messages)]
    return [m if isinstance(m, ChatMessage) else ChatMessage.model_validate(m) for m in messages]
