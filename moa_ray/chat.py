"""Chat data types shared by backends, Serve deployments and pipelines.

These are the wire format of the async chat interface: they cross Ray Serve
handles as plain dicts (``model_dump``) so replicas and drivers need not share
pickled classes.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["system", "user", "assistant", "tool"]
#: OpenAI's ``reasoning_effort`` values, passed to the model that answers (reasoning models only).
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]


class FunctionCall(BaseModel):
    """The function a tool call names, with its arguments as the JSON text the model wrote."""

    name: str
    arguments: str = ""


class ToolCall(BaseModel):
    """One tool call of an assistant message (OpenAI's ``tool_calls[i]``)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A piece of a streamed tool call: the first piece of a call carries its id and name, later ones its arguments."""

    index: int = 0
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class FunctionDefinition(BaseModel):
    """A function the answering model may call; ``parameters`` is its JSON schema."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-.:]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(BaseModel):
    """One entry of ``tools``: only function tools exist in chat completions' wire format that every provider speaks."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)


class NamedToolChoice(BaseModel):
    """``tool_choice`` forcing one function: ``{"type": "function", "function": {"name": ...}}``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ResponseSchema(BaseModel):
    """A ``response_format: json_schema`` the answer must follow (OpenAI's ``json_schema`` object)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    json_schema: dict[str, Any] = Field(default_factory=dict, description="The schema itself (OpenAI's ``schema`` key).")
    strict: bool | None = None
    description: str | None = None

    def openai(self) -> dict[str, Any]:
        """OpenAI's ``response_format`` for this schema."""
        inner: dict[str, Any] = {"name": self.name, "schema": self.json_schema}
        if self.strict is not None:
            inner["strict"] = self.strict
        if self.description:
            inner["description"] = self.description
        return {"type": "json_schema", "json_schema": inner}


class ChatMessage(BaseModel):
    """One message of a chat conversation: text, or an assistant's tool calls, or a tool's result."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    content: str = ""
    tool_calls: list[ToolCall] | None = Field(default=None, description="An assistant message's tool calls.")
    tool_call_id: str | None = Field(default=None, description="A tool message: the call it answers.")

    def wire(self) -> dict[str, Any]:
        """The message as OpenAI's API takes it (no tool fields on a plain message; null content beside tool calls)."""
        data: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            data["tool_calls"] = [call.model_dump() for call in self.tool_calls]
            if not self.content:
                data["content"] = None
        if self.tool_call_id is not None:
            data["tool_call_id"] = self.tool_call_id
        return data


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
    # The answering call's extras (an endpoint request's fields); None: not sent, and not part of a call's key.
    tools: list[ToolDefinition] | None = Field(default=None, description="Functions the model may call (the final call only).")
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_schema: ResponseSchema | None = Field(
        default=None, description="A JSON schema the answer must follow: passed to providers, a grammar or guided decoding locally."
    )
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    reasoning_effort: ReasoningEffort | None = None

    #: Fields added after call keys existed: a call's key includes them only when set, so stored keys stay valid.
    KEYED_WHEN_SET: ClassVar[frozenset[str]] = frozenset(
        {
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "response_schema",
            "presence_penalty",
            "frequency_penalty",
            "logit_bias",
            "reasoning_effort",
        }
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
    tool_calls: list[ToolCall] | None = Field(default=None, description="The tools the model called (text may then be empty).")
    reasoning: str | None = Field(default=None, description="A reasoning model's thinking, apart from its answer.")
    usage_estimated: bool = Field(default=False, description="The provider sent no usage: the counts are estimated here.")


class ChatRequest(BaseModel):
    """What a driver sends to an agent deployment."""

    messages: list[ChatMessage] = Field(min_length=1)
    params: ChatParams = Field(default_factory=ChatParams)


class StreamChunk(BaseModel):
    """A piece of a streamed completion; the last chunk carries the full :class:`Completion`."""

    delta: str = ""
    reasoning: str = Field(default="", description="A piece of a reasoning model's thinking.")
    tool_calls: list[ToolCallDelta] | None = Field(default=None, description="Pieces of tool calls, as OpenAI streams them.")
    logprobs: list[TokenLogprob] | None = Field(default=None, description="The piece's tokens, where the call asked for logprobs.")
    completion: Completion | None = None

    @property
    def is_text(self) -> bool:
        """Only answer text: what may be joined with its neighbours."""
        return self.completion is None and not self.reasoning and not self.tool_calls and self.logprobs is None


def as_messages(messages: list[ChatMessage] | list[dict[str, Any]] | str) -> list[ChatMessage]:
    """Accept a prompt string, OpenAI-style dicts or ChatMessages."""
    if isinstance(messages, str):
        return [ChatMessage(role="user", content=messages)]
    return [m if isinstance(m, ChatMessage) else ChatMessage.model_validate(m) for m in messages]
