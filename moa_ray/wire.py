"""The OpenAI chat wire format, read in one place: a response body, or a stream's chunks, into a Completion.

OpenAI-compatible providers, llama-cpp-python and vLLM's OpenAI layer all answer in this shape, so every
backend turns their dicts into :class:`~moa_ray.chat.Completion` / deltas here, and a fix to the reading
(a missing usage, a null content, logprobs) reaches all of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moa_ray.chat import Completion, TokenLogprob, TopLogprob, Usage


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


def completion_of(body: Mapping[str, Any], *, model: str, latency_s: float, **extra: Any) -> Completion:
    """A non-streaming chat response as a Completion (``extra``: attempts, retries...)."""
    try:
        choice = body["choices"][0]
        text = choice["message"].get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError):
        raise MalformedResponse("malformed response without choices[0].message") from None
    return Completion(
        text=text,
        usage=usage_of(body.get("usage")),
        latency_s=latency_s,
        finish_reason=choice.get("finish_reason"),
        model=model,
        logprobs=parse_logprobs(choice),
        **extra,
    )


class StreamReader:
    """Reads a chat stream's chunks (dicts) one by one: each gives its delta text; the last usage and finish
    reason are kept for the completion."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.usage: Usage | None = None
        self.finish_reason: str | None = None

    def feed(self, chunk: Mapping[str, Any]) -> str:
        """The text this chunk adds ("" for a usage-only or role-only chunk)."""
        if chunk.get("usage"):
            self.usage = usage_of(chunk["usage"])
        delta = ""
        for choice in chunk.get("choices") or []:
            delta += (choice.get("delta") or {}).get("content") or ""
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        if delta:
            self.parts.append(delta)
        return delta

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
            **extra,
        )
