"""The OpenAI chat wire format, read in one place: a response body, or a stream's chunks, into a Completion.

OpenAI-compatible providers, llama-cpp-python and vLLM's OpenAI layer all answer in this shape, so every
backend turns their dicts into :class:`~moa_ray.chat.Completion` / deltas here, and a fix to the reading
(a missing usage, a null content, logprobs) reaches all of them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from moa_ray.chat import Completion, FunctionCall, FunctionCallDelta, StreamChunk, TokenLogprob, ToolCall, ToolCallDelta, TopLogprob, Usage


class MalformedResponse(ValueError):
    """A response body without ``choices[0].message``."""


def usage_of(raw: Any) -> Usage:
    """OpenAI ``usage`` (missing or null counts as 0)."""
    if not isinstance(raw, Mapping):
        return Usage()
    return Usage(prompt_tokens=raw.get("prompt_tokens") or 0, completion_tokens=raw.get("completion_tokens") or 0)


def parse_logprobs(choice: Any) -> list[TokenLogprob] | None:
    """The tokens of an OpenAI chat choice's ``logprobs.content`` (None when the engine sent none).

    vLLM and llama.cpp answer in the same shape, so every backend reads it here.
    """
    logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list):
        return None
    tokens = []
    for entry in content:
        if not isinstance(entry, dict) or entry.get("token") is None or entry.get("logprob") is None:
            continue  # a malformed entry is dropped, not fatal: the caller falls back to the text
        top = [
            TopLogprob(token=t["token"], logprob=float(t["logprob"]))
            for t in entry.get("top_logprobs") or []
            if isinstance(t, dict) and t.get("token") is not None and t.get("logprob") is not None
        ]
        tokens.append(TokenLogprob(token=str(entry["token"]), logprob=float(entry["logprob"]), top_logprobs=top))
    return tokens


def _arguments(value: Any) -> str:
    """A tool call's arguments as JSON text (some servers send an object instead of OpenAI's string)."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def tool_calls_of(raw: Any) -> list[ToolCall] | None:
    """A message's ``tool_calls``; entries without a function name are dropped (None when there are none)."""
    calls = []
    for i, entry in enumerate(raw if isinstance(raw, list) else []):
        function = entry.get("function") if isinstance(entry, dict) else None
        if not isinstance(function, dict) or not function.get("name"):
            continue
        call_id = entry.get("id") or f"call_{i}"
        calls.append(
            ToolCall(id=str(call_id), function=FunctionCall(name=str(function["name"]), arguments=_arguments(function.get("arguments"))))
        )
    return calls or None


def reasoning_of(message: Mapping[str, Any]) -> str:
    """A reasoning model's thinking: ``reasoning_content`` (DeepSeek, vLLM) or ``reasoning`` (newer vLLM, OpenRouter)."""
    value = message.get("reasoning_content") or message.get("reasoning") or ""
    return value if isinstance(value, str) else ""


def completion_of(body: Mapping[str, Any], *, model: str, latency_s: float, **extra: Any) -> Completion:
    """A non-streaming chat response as a Completion (``extra``: attempts, retries...)."""
    try:
        choice = body["choices"][0]
        message = choice["message"]
        text = message.get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError):
        raise MalformedResponse("malformed response without choices[0].message") from None
    return Completion(
        text=text,
        usage=usage_of(body.get("usage")),
        latency_s=latency_s,
        finish_reason=choice.get("finish_reason"),
        model=model,
        logprobs=parse_logprobs(choice),
        tool_calls=tool_calls_of(message.get("tool_calls")),
        reasoning=reasoning_of(message) or None,
        **extra,
    )


def tool_call_deltas(raw: Any) -> list[ToolCallDelta]:
    """A stream delta's ``tool_calls`` pieces (a piece without an index is the next call)."""
    out = []
    for position, entry in enumerate(raw if isinstance(raw, list) else []):
        if not isinstance(entry, dict):
            continue
        function = entry.get("function") if isinstance(entry.get("function"), dict) else None
        out.append(
            ToolCallDelta(
                index=entry["index"] if isinstance(entry.get("index"), int) else position,
                id=entry.get("id"),
                type="function" if entry.get("type") == "function" or entry.get("id") else None,
                function=FunctionCallDelta(
                    name=function.get("name"), arguments=None if function.get("arguments") is None else _arguments(function["arguments"])
                )
                if function is not None
                else None,
            )
        )
    return out


class ToolCallAssembler:
    """Joins streamed tool call pieces, by index, into whole calls."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, str]] = {}

    def add(self, pieces: list[ToolCallDelta]) -> list[ToolCallDelta]:
        """Take ``pieces`` in; returns them as OpenAI streams them: a call's id, type and name in its first piece
        only (llama.cpp repeats them in every piece, which a client that joins the pieces would repeat too)."""
        out = []
        for piece in pieces:
            call = self._calls.get(piece.index)
            if call is None:
                call = self._calls[piece.index] = {"id": piece.id or "", "name": "", "arguments": ""}
            elif piece.id == call["id"] or not piece.id:
                piece = piece.model_copy(update={"id": None, "type": None})
            name = piece.function.name if piece.function is not None else None
            if name and name == call["name"]:  # a repeat, not a continuation
                name = None
                piece = piece.model_copy(update={"function": piece.function.model_copy(update={"name": None})})  # type: ignore[union-attr]
            if piece.id:
                call["id"] = piece.id
            if piece.function is not None:
                call["name"] += name or ""
                call["arguments"] += piece.function.arguments or ""
            out.append(piece)
        return out

    def calls(self) -> list[ToolCall] | None:
        out = [
            ToolCall(id=c["id"] or f"call_{i}", function=FunctionCall(name=c["name"], arguments=c["arguments"]))
            for i, c in sorted(self._calls.items())
            if c["name"]
        ]
        return out or None


class StreamReader:
    """Reads a chat stream's chunks (dicts) one by one into :class:`StreamChunk` pieces (text, reasoning, tool
    calls); the whole answer, the last usage and finish reason are kept for the completion."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.thoughts: list[str] = []
        self.tools = ToolCallAssembler()
        self.pieces = 0
        self.logprobs: list[TokenLogprob] | None = None
        self.usage: Usage | None = None
        self.finish_reason: str | None = None

    def read(self, chunk: Mapping[str, Any]) -> StreamChunk:
        """What this chunk adds (an empty piece for a usage-only or role-only chunk)."""
        if chunk.get("usage"):
            self.usage = usage_of(chunk["usage"])
        delta, thought, pieces = "", "", list[ToolCallDelta]()
        tokens: list[TokenLogprob] | None = None
        for choice in chunk.get("choices") or []:
            body = choice.get("delta") or {}
            delta += body.get("content") or ""
            thought += reasoning_of(body)
            pieces += tool_call_deltas(body.get("tool_calls"))
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
            if (found := parse_logprobs(choice)) is not None:
                tokens = (tokens or []) + found
        if tokens is not None:
            self.logprobs = (self.logprobs or []) + tokens
        if delta or thought or pieces:
            self.pieces += 1
        if delta:
            self.parts.append(delta)
        if thought:
            self.thoughts.append(thought)
        if pieces:
            pieces = self.tools.add(pieces)
        return StreamChunk(delta=delta, reasoning=thought, tool_calls=pieces or None, logprobs=tokens)

    def feed(self, chunk: Mapping[str, Any]) -> str:
        """The text this chunk adds ("" for a usage-only or role-only chunk)."""
        return self.read(chunk).delta

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def completion(self, *, model: str, latency_s: float, usage: Usage | None = None, **extra: Any) -> Completion:
        """The streamed answer; ``usage`` when the engine sent none (e.g. counted by its tokenizer)."""
        return Completion(
            text=self.text,
            usage=usage or self.usage or Usage(),
            latency_s=latency_s,
            finish_reason=self.finish_reason,
            model=model,
            tool_calls=self.tools.calls(),
            reasoning="".join(self.thoughts) or None,
            logprobs=self.logprobs,
            **extra,
        )


def has_content(piece: StreamChunk) -> bool:
    """Whether a streamed piece carries anything for the caller (text, thinking or a tool call)."""
    return bool(piece.delta or piece.reasoning or piece.tool_calls)


def joined(pieces: list[StreamChunk]) -> StreamChunk:
    """Several pieces as one: texts and thoughts joined, tool call pieces and tokens in order."""
    calls = [c for p in pieces for c in p.tool_calls or []]
    tokens = [t for p in pieces for t in p.logprobs or []] if any(p.logprobs is not None for p in pieces) else None
    text, thought = "".join(p.delta for p in pieces), "".join(p.reasoning for p in pieces)
    return StreamChunk(delta=text, reasoning=thought, tool_calls=calls or None, logprobs=tokens)


#: Characters per token of an estimate (English text with BPE tokenizers), and the tokens OpenAI's chat format
#: adds per message and to prime the reply: counts for a provider that streams no usage.
CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
TOKENS_PER_REPLY = 3


def estimated_usage(request: Mapping[str, Any], reader: StreamReader) -> Usage:
    """Usage of a stream whose provider sent none: the prompt by its characters (the chat format's per-message
    tokens added), the answer by its streamed pieces (providers send about one token per piece).

    Not exact (the provider's tokenizer is not here), but of the right size: a prompt counted as 0 tokens would
    make a streamed request look several times cheaper than the same request unstreamed.
    """
    messages = request.get("messages") or []
    chars = sum(len(m.get("content") or "") + (len(json.dumps(m["tool_calls"])) if m.get("tool_calls") else 0) for m in messages)
    chars += len(json.dumps(request["tools"])) if request.get("tools") else 0
    prompt = math.ceil(chars / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * len(messages) + TOKENS_PER_REPLY
    return Usage(prompt_tokens=prompt, completion_tokens=reader.pieces)
