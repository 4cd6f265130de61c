"""``POST /v1/responses``: OpenAI's Responses API as a translation over chat completions.

The OpenAI Agents SDK's default model (and newer OpenAI clients) speak the Responses API. A pipeline has nothing
more to offer it than to chat completions, so this module only translates: the request's ``instructions`` and
``input`` items (messages, ``function_call``, ``function_call_output``) become a chat request that
:class:`~moa_ray.serve.service.ChatService` validates and runs as any other (limits, tools, schema, per-request
``moa`` settings), and its answer or stream becomes a ``response`` object or Responses stream events. Nothing is
stored, so ``previous_response_id``, ``conversation`` and ``background`` are refused; only function tools exist
(hosted tools such as web search would need OpenAI's service).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moa_ray.serve.http_errors import APIError, from_validation_error

# --------------------------------------------------------------------------- request


class InputPart(BaseModel):
    """A text part of an input message (``input_text``; ``output_text`` and ``refusal`` of replayed answers)."""

    model_config = ConfigDict(extra="allow")  # annotations, logprobs of a replayed output_text

    type: Literal["input_text", "output_text", "refusal", "summary_text", "reasoning_text"]
    text: str | None = None
    refusal: str | None = None

    @property
    def value(self) -> str:
        return self.text if self.text is not None else self.refusal or ""


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputPart]
    id: str | None = None
    status: str | None = None
    phase: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.value for part in self.content)


class FunctionCallItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[InputPart]
    id: str | None = None
    status: str | None = None

    @property
    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(part.value for part in self.output)


_ITEMS: dict[str, type[BaseModel]] = {
    "message": InputMessage,
    "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem,
}


class FunctionTool(BaseModel):
    """A function tool in the Responses API's flat shape."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def chat(self) -> dict[str, Any]:
        function = {"name": self.name, "description": self.description, "parameters": self.parameters, "strict": self.strict}
        return {"type": "function", "function": {k: v for k, v in function.items() if v is not None}}


class NamedFunctionChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None

    def chat(self) -> dict[str, Any]:
        if self.type != "json_schema":
            return {"type": self.type}
        inner = {"name": self.name or "response", "schema": self.schema_ or {}, "strict": self.strict, "description": self.description}
        return {"type": "json_schema", "json_schema": {k: v for k, v in inner.items() if v is not None}}


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: str | None = None
    generate_summary: str | None = None


class ResponsesRequest(BaseModel):
    """``POST /v1/responses``: what a pipeline can answer of it; what only OpenAI's service can do is refused."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    background: bool | None = None
    # accepted and ignored, as on /v1/chat/completions
    metadata: dict[str, str] | None = None
    store: bool | None = None
    user: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    top_logprobs: int | None = None
    max_tool_calls: int | None = None
    moa: dict[str, Any] | None = Field(default=None, description="moa-ray's extension, as on /v1/chat/completions.")

    @field_validator("previous_response_id", "conversation")
    @classmethod
    def _nothing_stored(cls, v: Any) -> Any:
        if v is not None:
            raise ValueError("moa-ray stores no responses: send the whole conversation as input")
        return v

    @field_validator("background")
    @classmethod
    def _no_background(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("background responses are not supported")
        return v


def _item(index: int, raw: dict[str, Any]) -> BaseModel | None:
    """One input item as its model; None for an item that carries nothing a pipeline reads (reasoning)."""
    kind = raw.get("type", "message")
    if kind == "reasoning":
        return None  # an earlier answer's thinking: never read again (as proposers' never is)
    model = _ITEMS.get(kind)
    if model is None:
        raise APIError(
            400, f"input[{index}]: items of type {kind!r} are not supported", code="invalid_request", param=f"input[{index}].type"
        )
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        first = from_validation_error(err)
        raise APIError(
            400, f"input[{index}]: {first.message.removeprefix('invalid request: ')}", code="invalid_request", param=f"input[{index}]"
        ) from None


def chat_messages(request: ResponsesRequest) -> list[dict[str, Any]]:
    """``instructions`` and ``input`` as chat messages: consecutive function calls join one assistant turn."""
    messages: list[dict[str, Any]] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    if isinstance(request.input, str):
        return [*messages, {"role": "user", "content": request.input}]
    for index, raw in enumerate(request.input):
        item = _item(index, raw)
        if isinstance(item, InputMessage):
            messages.append({"role": item.role, "content": item.text})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
                last["content"] = last["content"] or None
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text})
    return messages


def _tools(request: ResponsesRequest) -> list[dict[str, Any]] | None:
    if not request.tools:
        return None
    out = []
    for index, raw in enumerate(request.tools):
        if raw.get("type") != "function":
            raise APIError(
                400,
                f"tools[{index}]: only function tools can be served (a {raw.get('type')!r} tool runs on OpenAI's service)",
                code="invalid_request",
                param=f"tools[{index}].type",
            )
        try:
            out.append(FunctionTool.model_validate(raw).chat())
        except ValidationError as err:
            raise APIError(
                400, f"tools[{index}]: {from_validation_error(err).message}", code="invalid_request", param=f"tools[{index}]"
            ) from None
    return out


def chat_body(request: ResponsesRequest) -> dict[str, Any]:
    """The chat-completions request that answers ``request``."""
    body: dict[str, Any] = {"model": request.model, "messages": chat_messages(request)}
    fields = {
        "tools": _tools(request),
        "parallel_tool_calls": request.parallel_tool_calls,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "max_completion_tokens": request.max_output_tokens,
        "reasoning_effort": request.reasoning.effort if request.reasoning else None,
        "moa": request.moa,
    }
    body.update({k: v for k, v in fields.items() if v is not None})
    if request.tool_choice is not None:
        choice = request.tool_choice
        body["tool_choice"] = choice if isinstance(choice, str) else {"type": "function", "function": {"name": choice.name}}
    if request.text is not None and request.text.format is not None:
        body["response_format"] = request.text.format.chat()
    if request.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}  # the completed response carries usage
    return body


def parse_request(body: bytes) -> ResponsesRequest:
    try:
        data = json.loads(body)
    except ValueError as err:
        raise APIError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return ResponsesRequest.model_validate(data)
    except ValidationError as err:
        raise from_validation_error(err) from None


# --------------------------------------------------------------------------- response


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if not usage:
        return None
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage["total_tokens"],
    }


def _message_item(text: str, status: str = "completed", item_id: str | None = None) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status == "completed" else []
    return {"type": "message", "id": item_id or _id("msg"), "status": status, "role": "assistant", "content": content}


def _call_item(call_id: str, name: str, arguments: str, status: str = "completed", item_id: str | None = None) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id or _id("fc"), "call_id": call_id, "name": name, "arguments": arguments, "status": status}


def _reasoning_item(text: str, item_id: str | None = None) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id or _id("rs"), "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


class ResponseShell:
    """The ``response`` object's fields that echo the request, around the output a run fills in."""

    def __init__(self, request: ResponsesRequest) -> None:
        self.request = request
        self.id = _id("resp")
        self.created_at = int(time.time())

    def build(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: dict[str, Any] | None = None,
        *,
        finish: str | None = None,
        error: dict[str, Any] | None = None,
        moa: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        request = self.request
        incomplete = {"reason": "max_output_tokens"} if finish == "length" else None
        data = {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "model": request.model,
            "status": "incomplete" if incomplete and status == "completed" else status,
            "output": output,
            "error": error,
            "incomplete_details": incomplete,
            "instructions": request.instructions,
            "tools": request.tools or [],
            "tool_choice": request.tool_choice
            if isinstance(request.tool_choice, str) or request.tool_choice is None
            else request.tool_choice.model_dump(),
            "parallel_tool_calls": True if request.parallel_tool_calls is None else request.parallel_tool_calls,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "max_output_tokens": request.max_output_tokens,
            "previous_response_id": None,
            "reasoning": request.reasoning.model_dump() if request.reasoning else None,
            "text": request.text.model_dump(by_alias=True, exclude_none=True) if request.text else {"format": {"type": "text"}},
            "truncation": request.truncation or "disabled",
            "metadata": request.metadata or {},
            "store": False,
            "user": request.user,
            "usage": _usage(usage),
        }
        if data["tool_choice"] is None:
            data["tool_choice"] = "auto"
        if moa is not None:
            data["moa"] = moa
        return data


def response_of(shell: ResponseShell, completion: dict[str, Any]) -> dict[str, Any]:
    """A chat completion (its JSON) as a ``response`` object."""
    choice = completion["choices"][0]
    message = choice["message"]
    output: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        output.append(_reasoning_item(message["reasoning_content"]))
    if message.get("content"):
        output.append(_message_item(message["content"]))
    for call in message.get("tool_calls") or []:
        output.append(_call_item(call["id"], call["function"]["name"], call["function"]["arguments"]))
    return shell.build("completed", output, completion.get("usage"), finish=choice.get("finish_reason"), moa=completion.get("moa"))


class EventWriter:
    """Responses stream events from a chat stream's chunks: items open as their first piece comes and close, in
    order, when the answer ends; every event numbered, as OpenAI numbers them."""

    def __init__(self, shell: ResponseShell) -> None:
        self.shell = shell
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self.texts: dict[int, str] = {}  # output index -> text so far (a message's, or a reasoning item's)
        self.message: int | None = None
        self.reasoning: int | None = None
        self.calls: dict[int, int] = {}  # a chat tool call's index -> its output index

    def event(self, kind: str, **fields: Any) -> str:
        self.sequence += 1
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"

    def start(self) -> list[str]:
        shell = self.shell.build("in_progress", [])
        return [self.event("response.created", response=shell), self.event("response.in_progress", response=shell)]

    def _open(self, item: dict[str, Any]) -> tuple[int, list[str]]:
        index = len(self.output)
        self.output.append(item)
        return index, [self.event("response.output_item.added", output_index=index, item=item)]

    def chunk(self, chunk: dict[str, Any]) -> list[str]:
        """The events of one chat chunk (a delta of text, thinking or tool calls)."""
        out: list[str] = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                out += self._reasoning(delta["reasoning_content"])
            if delta.get("content"):
                out += self._text(delta["content"])
            for piece in delta.get("tool_calls") or []:
                out += self._call(piece)
        return out

    def _reasoning(self, text: str) -> list[str]:
        out: list[str] = []
        if self.reasoning is None:
            item = _reasoning_item("")
            item["content"] = []
            self.reasoning, out = self._open(item)
            self.texts[self.reasoning] = ""
        index = self.reasoning
        self.texts[index] += text
        item_id = self.output[index]["id"]
        return [*out, self.event("response.reasoning_text.delta", item_id=item_id, output_index=index, content_index=0, delta=text)]

    def _text(self, text: str) -> list[str]:
        out: list[str] = []
        if self.message is None:
            self.message, out = self._open(_message_item("", status="in_progress"))
            self.texts[self.message] = ""
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            item_id = self.output[self.message]["id"]
            out.append(self.event("response.content_part.added", item_id=item_id, output_index=self.message, content_index=0, part=part))
        index = self.message
        self.texts[index] += text
        item_id = self.output[index]["id"]
        return [
            *out,
            self.event("response.output_text.delta", item_id=item_id, output_index=index, content_index=0, delta=text, logprobs=[]),
        ]

    def _call(self, piece: dict[str, Any]) -> list[str]:
        out: list[str] = []
        key = piece.get("index", 0)
        if key not in self.calls:
            function = piece.get("function") or {}
            self.calls[key], out = self._open(
                _call_item(piece.get("id") or _id("call"), function.get("name") or "", "", status="in_progress")
            )
        index = self.calls[key]
        arguments = (piece.get("function") or {}).get("arguments") or ""
        if arguments:
            self.output[index]["arguments"] += arguments
            out.append(
                self.event("response.function_call_arguments.delta", item_id=self.output[index]["id"], output_index=index, delta=arguments)
            )
        return out

    def finish(self, finish: str | None, usage: dict[str, Any] | None, moa: dict[str, Any] | None) -> list[str]:
        """Close every open item, in output order, then ``response.completed`` with the whole response."""
        out: list[str] = []
        for index, item in enumerate(self.output):
            if item["type"] == "message":
                text = self.texts[index]
                part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
                out.append(
                    self.event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0, text=text, logprobs=[])
                )
                out.append(self.event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part))
                self.output[index] = _message_item(text, item_id=item["id"])
            elif item["type"] == "function_call":
                out.append(
                    self.event(
                        "response.function_call_arguments.done",
                        item_id=item["id"],
                        output_index=index,
                        name=item["name"],
                        arguments=item["arguments"],
                    )
                )
                item["status"] = "completed"
            else:
                self.output[index] = _reasoning_item(self.texts[index], item_id=item["id"])
            out.append(self.event("response.output_item.done", output_index=index, item=self.output[index]))
        response = self.shell.build("completed", self.output, usage, finish=finish, moa=moa)
        return [*out, self.event("response.completed" if response["status"] == "completed" else "response.incomplete", response=response)]

    def failed(self, error: dict[str, Any]) -> list[str]:
        detail = {"code": error.get("code") or "server_error", "message": error.get("message", "")}
        return [self.event("response.failed", response=self.shell.build("failed", self.output, error=detail))]


async def response_events(shell: ResponseShell, chat_events: AsyncIterator[str]) -> AsyncIterator[str]:
    """The Responses stream of a chat stream (the server-sent events :meth:`ChatService.open_stream` returns)."""
    writer = EventWriter(shell)
    for event in writer.start():
        yield event
    finish: str | None = None
    usage: dict[str, Any] | None = None
    moa: dict[str, Any] | None = None
    async for event in chat_events:
        data = event.removeprefix("data: ").strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            for out in writer.failed(chunk["error"]):
                yield out
            return
        for choice in chunk.get("choices") or []:
            finish = choice.get("finish_reason") or finish
        usage = chunk.get("usage") or usage
        if chunk.get("choices") and chunk["choices"][0].get("finish_reason"):
            moa = chunk.get("moa")
        for out in writer.chunk(chunk):
            yield out
    for out in writer.finish(finish, usage, moa):
        yield out
