"""The trace of one pipeline request: every call, every layer, and the totals derived from them.

Only raw facts are stored (calls and layer wall times); every sum is derived, so
per-call, per-layer and per-role totals cannot disagree.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr, computed_field

from moa_ray.metrics import record_call
from moa_ray.pipeline.accounting import Accounting

CallRole = Literal["proposer", "aggregator", "judge", "moderator", "roles", "ranker"]
CallStatus = Literal["ok", "error", "cut"]
#: How much of a trace leaves the process: ``summary`` (facts and numbers, the default) or ``full`` (every call's text).
TraceDetail = Literal["summary", "full"]
#: The fields that only a ``full`` trace carries.
FULL_ONLY_FIELDS = frozenset({"text", "reasoning", "tool_calls"})
#: Roles whose calls wait for their layer's proposers (a sequential step on the critical path).
SEQUENTIAL_AFTER_LAYER = ("judge", "moderator")


class CallRecord(BaseModel):
    """One LLM call of a request."""

    layer: int = Field(description="1-based layer; the aggregator's layer is the last; role generation is layer 0.")
    index: int = Field(default=0, description="Position of the call within its layer.")
    role: CallRole
    model: str = Field(description="Config name of the model.")
    label: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    start_s: float = Field(default=0.0, description="Seconds from the request's start to this call's start.")
    finish_reason: str | None = None
    status: CallStatus = "ok"
    error: str | None = None
    error_type: str | None = Field(default=None, description="The error's class (BadRequest, RateLimited, ...): decided on as data.")
    status_code: int | None = Field(default=None, description="The provider's HTTP status, where it answered one.")
    retry_after_s: float | None = Field(
        default=None, description="When a rate-limited call could be made again (the provider's Retry-After, or the model's rpm/tpm)."
    )
    fallback_of: str | None = Field(
        default=None, description="The model this call stood in for, whose call (same layer, index and role, traced before it) failed."
    )
    selected: bool | None = Field(default=None, description="Kept by the SMoA judge (None where no judge ran).")
    attempts: int = Field(default=1, ge=1, description="Attempts the call took: provider retries and replica retries included.")
    retries: list[str] = Field(default_factory=list, description="Why each attempt before the last failed (error class, status).")
    text: str | None = Field(
        default=None,
        description="What the call answered, provider keys redacted (a judge's, moderator's or ranker's raw verdict too); "
        "only a full trace shows it.",
    )
    reasoning: str | None = Field(
        default=None,
        description="A reasoning model's thinking (its reasoning_content, or <think> text moved out of the answer), redacted; "
        "only a full trace shows it. The next layer never reads it.",
    )
    tool_calls: list[dict[str, Any]] | None = Field(
        default=None, description="The tool calls the answering model made (name, arguments); only a full trace shows them."
    )
    usage_estimated: bool = Field(default=False, description="The provider streamed no usage: the token counts are estimated.")
    key: str | None = Field(
        default=None, description="Content key of the call (model settings, messages, parameters), where a call store ran."
    )
    reused: bool = Field(default=False, description="Answered from the call store, not by the model: it cost nothing this time.")
    reused_from: Literal["store", "references"] | None = Field(
        default=None, description="Where a reused answer came from: an earlier identical call, or imported references."
    )

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class LayerRecord(BaseModel):
    """One layer of a request: its wall time and what the sparse machinery decided."""

    layer: int
    role: Literal["proposer", "aggregator"]
    wall_s: float = 0.0
    selected: list[int] | None = Field(default=None, description="Indices of the responses the judge kept.")
    judge_fallback: str | None = Field(default=None, description="Why the judge's selection was replaced, if it was.")
    stopped: bool = Field(default=False, description="The moderator ended the debate after this layer.")
    stop_reason: str | None = None


class TokenTotals(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, call: CallRecord) -> None:
        self.prompt_tokens += call.prompt_tokens
        self.completion_tokens += call.completion_tokens
        self.calls += 1


class Trace(BaseModel):
    """Everything that happened while answering one request."""

    pipeline: str
    kind: str
    wall_s: float = 0.0
    layers: list[LayerRecord] = Field(default_factory=list)
    calls: list[CallRecord] = Field(default_factory=list)
    stopped_at_layer: int | None = Field(default=None, description="Proposer layer after which the moderator stopped.")
    roles: list[str] | None = Field(default=None, description="System roles given to the proposers (role-playing SMoA).")
    roles_source: str | None = Field(default=None, description="Where the roles came from: generated, cache, or why partial.")
    accounting: Accounting | None = Field(default=None, description="Cost and TFLOPs, filled by moa_ray.pipeline.accounting.")
    settings: dict[str, Any] | None = Field(
        default=None, description="The request's own pipeline settings (proposers, layers, k, aggregator sampling), where it set any."
    )
    #: The request's deadline (``time.monotonic()``), None without one: every call of the request shares it.
    _deadline: float | None = PrivateAttr(default=None)
    #: Told of every call the moment it ends (the endpoint's live layer events); None: nobody listens.
    _listener: Callable[[CallRecord], None] | None = PrivateAttr(default=None)

    def listen(self, listener: Callable[[CallRecord], None] | None) -> None:
        self._listener = listener

    def call_ended(self, record: CallRecord) -> None:
        """Count ``record`` in the metrics, and tell the listener, if any, that it is final."""
        record_call(record)
        if self._listener is not None:
            self._listener(record)

    def set_deadline(self, timeout_s: float | None) -> None:
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def time_left_s(self) -> float | None:
        """Seconds until the request's deadline (negative once passed); None without a deadline."""
        return None if self._deadline is None else self._deadline - time.monotonic()

    @property
    def deadline(self) -> float | None:
        """The request's deadline (``time.monotonic()``), None without one."""
        return self._deadline

    def excuse_wait(self, deadline_then: float | None, waited_s: float) -> None:
        """Move the deadline back by a wait that does not count against it (an evaluation's wait for rate-limit
        room): to ``deadline_then`` (the deadline when the wait began) + ``waited_s``, so calls that waited side by
        side move it once, and waits one after another add up."""
        if deadline_then is not None and self._deadline is not None and waited_s > 0:
            self._deadline = max(self._deadline, deadline_then + waited_s)

    def calls_in(self, layer: int) -> list[CallRecord]:
        return [c for c in self.calls if c.layer == layer]

    def tokens_by_role(self) -> dict[str, TokenTotals]:
        out: dict[str, TokenTotals] = {}
        for call in self.calls:
            out.setdefault(call.role, TokenTotals()).add(call)
        return out

    def tokens_by_layer(self) -> dict[int, TokenTotals]:
        out: dict[int, TokenTotals] = {}
        for call in self.calls:
            out.setdefault(call.layer, TokenTotals()).add(call)
        return out

    def totals(self) -> TokenTotals:
        total = TokenTotals()
        for call in self.calls:
            total.add(call)
        return total

    @property
    def layers_run(self) -> int:
        return len(self.layers)

    @property
    def critical_path_s(self) -> float:
        """Sum over sequential steps of the slowest call: the latency with perfect parallelism and no overhead.

        A step is a layer's parallel calls; the SMoA judge/moderator run after their layer's
        proposers, so they are a step of their own, as is role generation (layer 0).
        """
        slowest: dict[tuple[int, int], float] = {}
        for c in self.calls:
            step = (c.layer, 1 if c.role in SEQUENTIAL_AFTER_LAYER else 0)
            slowest[step] = max(slowest.get(step, 0.0), c.latency_s)
        return sum(slowest.values())

    @property
    def retries(self) -> int:
        """Failed attempts behind the calls (retried by a backend or on another replica): the reliability cost."""
        return sum(len(c.retries) for c in self.calls)

    @property
    def sum_latency_s(self) -> float:
        """Sum of all call latencies: the latency if every call ran one after another."""
        return sum(c.latency_s for c in self.calls)

    def summary(self) -> dict[str, Any]:
        """Totals for JSON output and Parquet rows."""
        return {
            "layers_run": self.layers_run,
            "stopped_at_layer": self.stopped_at_layer,
            "wall_s": round(self.wall_s, 4),
            "critical_path_s": round(self.critical_path_s, 4),
            "sum_latency_s": round(self.sum_latency_s, 4),
            "tokens": self.totals().model_dump(),
            "retries": self.retries,
            "tokens_by_role": {k: v.model_dump() for k, v in self.tokens_by_role().items()},
            "tokens_by_layer": {str(k): v.model_dump() for k, v in self.tokens_by_layer().items()},
        }

    def to_json_dict(self, detail: TraceDetail = "summary") -> dict[str, Any]:
        """The ``trace`` object of ``moa-ray run --json``; ``full`` adds each call's text."""
        exclude = None if detail == "full" else {"calls": {"__all__": set(FULL_ONLY_FIELDS)}}
        data = self.model_dump(mode="json", exclude=exclude)
        data.update(self.summary())
        return data
