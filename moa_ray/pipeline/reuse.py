"""Reusing calls: a content key per call, and a per-process memory that makes every identical call once.

A call's answer is decided by the model's answer settings, the messages it is sent (its system role
included) and the sampling parameters with the model's defaults filled in: :func:`call_key` hashes exactly
those, so two pipelines whose layer 1 is the same (the papers' ``moa`` and ``moa-lite``), or a ``single``
baseline whose settings equal a proposer's, make one call between them.

Only *deterministic* calls (temperature 0, or a seed) are reused by default. A sampled call is reused only
when the caller asks (``reuse_sampled``): one stored sample per key then stands for every identical call,
as the MoA paper's evaluation effectively did with its round files. Calls that ask for logprobs are never
reused (the store keeps text, not token probabilities).

:class:`CallReuse` is what a pipeline consults: the calls stored by earlier runs (given at start), the
recent answers of this process (a bounded memory), and the calls in flight (a second identical call waits
for the first instead of making its own). An evaluation keeps all calls of one prompt in one worker
(:meth:`~moa_ray.eval.runner.WorkerPool.run`'s ``route``), so its pipelines share the prompt's calls.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Literal

from pydantic import BaseModel

from moa_ray.chat import ChatMessage, ChatParams, Completion, Usage
from moa_ray.config import ModelSpecBase

#: Parameters that never change an answer (a budget), left out of the key.
_NOT_ANSWER_PARAMS = frozenset({"timeout_s"})
#: Recent answers a process keeps for calls that come again soon (the other pipelines of the same prompt).
RECENT_CALLS = 8192


class StoredCall(BaseModel):
    """What a reused call answers with: the stored text and what the original call took."""

    key: str
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    #: ``store``: an earlier identical call; ``references``: an answer the user imported (reused even if sampled).
    source: Literal["store", "references"] = "store"

    def completion(self, model: str) -> Completion:
        usage = Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens)
        return Completion(text=self.text, usage=usage, finish_reason=self.finish_reason, model=model)

    @classmethod
    def of(cls, key: str, completion: Completion) -> StoredCall:
        return cls(
            key=key,
            text=completion.text,
            prompt_tokens=completion.usage.prompt_tokens,
            completion_tokens=completion.usage.completion_tokens,
            finish_reason=completion.finish_reason,
        )


def effective_params(model: ModelSpecBase, params: ChatParams) -> ChatParams:
    """``params`` with the model's defaults filled in, so an explicit default and an unset one are the same call."""
    return params.model_copy(
        update={
            "temperature": model.temperature if params.temperature is None else params.temperature,
            "max_tokens": model.max_tokens if params.max_tokens is None else params.max_tokens,
        }
    )


def call_key(model: ModelSpecBase, messages: list[ChatMessage], params: ChatParams) -> str:
    """The content key of a call: SHA-256 over the model's answer settings, the messages and the parameters."""
    unset = {name for name in ChatParams.KEYED_WHEN_SET if getattr(params, name) is None}
    material = {
        "model": model.answer_settings(),
        "messages": [m.model_dump(exclude_none=True) for m in messages],  # a plain message: role and content, as always
        "params": effective_params(model, params).model_dump(exclude=set(_NOT_ANSWER_PARAMS) | unset),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def is_deterministic(model: ModelSpecBase, params: ChatParams) -> bool:
    """Whether the call would give the same answer again: temperature 0, or a seed."""
    effective = effective_params(model, params)
    return effective.temperature == 0 or effective.seed is not None


class CallReuse:
    """Answers identical calls once per process: from the stored calls, the recent ones, or the one in flight."""

    def __init__(
        self,
        models: Mapping[str, ModelSpecBase],
        *,
        reuse_sampled: bool = False,
        stored: Iterable[StoredCall] = (),
        recent: int = RECENT_CALLS,
    ) -> None:
        self.models = dict(models)
        self.reuse_sampled = reuse_sampled
        self._recent: OrderedDict[str, StoredCall] = OrderedDict()
        self._max_recent = recent
        self._in_flight: dict[str, asyncio.Future[StoredCall | None]] = {}
        self.add(stored)

    def add(self, calls: Iterable[StoredCall]) -> None:
        """Calls stored by earlier runs, for the calls about to come (an evaluation adds a prompt's before its
        items run); they share the bounded memory of recent calls, so a long run's memory stays flat."""
        for call in calls:
            if call.key not in self._recent or call.source == "references":
                self._remember(call)
            else:
                self._recent.move_to_end(call.key)

    def key(self, model: str, messages: list[ChatMessage], params: ChatParams) -> tuple[str, bool]:
        """The call's key and whether it may be answered by another call with that key."""
        spec = self.models[model]
        # a stored call keeps text only: logprobs and tool calls are never answered from it
        reusable = not params.logprobs and not params.tools and (self.reuse_sampled or is_deterministic(spec, params))
        return call_key(spec, messages, params), reusable

    def _known(self, key: str) -> StoredCall | None:
        found = self._recent.get(key)
        if found is not None:
            self._recent.move_to_end(key)
        return found

    def _remember(self, call: StoredCall) -> None:
        self._recent[call.key] = call
        self._recent.move_to_end(call.key)
        while len(self._recent) > self._max_recent:
            self._recent.popitem(last=False)

    async def call(
        self, model: str, key: str, reusable: bool, make: Callable[[], Awaitable[Completion]]
    ) -> tuple[Completion, Literal["store", "references"] | None]:
        """The completion of the call keyed ``key``, and where it came from when it was reused (None: made here).

        A reusable call is answered by a known call with its key, or waits for the identical call in
        flight; if that one fails, this one is made after all. A failed call is never remembered. An
        imported answer (``references``) stands even for a sampled call: the user asked for it.
        """
        known = self._known(key)
        if known is not None and (reusable or known.source == "references"):
            return known.completion(model), known.source
        if reusable:
            leader = self._in_flight.get(key)
            if leader is not None:
                shared = await asyncio.shield(leader)
                if shared is not None:
                    return shared.completion(model), "store"
        if not reusable or key in self._in_flight:
            return await make(), None
        future: asyncio.Future[StoredCall | None] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        answered: StoredCall | None = None
        try:
            completion = await make()
            answered = StoredCall.of(key, completion)
            self._remember(answered)
            return completion, None
        finally:
            del self._in_flight[key]
            future.set_result(answered)
