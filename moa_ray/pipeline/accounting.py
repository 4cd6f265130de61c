"""Cost accounting of one request: tokens, latency, TFLOPs and USD per call, layer, role and model.

Users pick a pipeline on quality, cost and latency, so every trace carries its
cost. Everything is derived from the trace's calls and the models' config facts
(``parameters_b``, ``pricing``): per-layer, per-role, per-model and total buckets
are sums of the same per-call numbers and cannot disagree. A fact the config
does not give is *unknown* (``None``), never a silent zero: a bucket that
contains tokens of a model without ``parameters_b`` has unknown TFLOPs, one with
tokens of an unpriced model has unknown cost.

Estimates: TFLOPs = 2 x parameters x (prompt + completion tokens) / 1e12 (the
usual forward-pass estimate; active parameters for MoE models); cost = prompt
tokens x input price + completion tokens x output price (USD per million
tokens). Failed or cut calls count the tokens their backend reported (none). A call answered from the call
store (``reused``) keeps the tokens the original call took but costs nothing: its would-be cost is counted as
``saved_cost_usd`` instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field, computed_field

from moa_ray.config import ModelSpecBase

if TYPE_CHECKING:  # the trace holds an Accounting (pipeline/trace.py imports this module), so only for types here
    from moa_ray.pipeline.trace import CallRecord, Trace


class CallCost(BaseModel):
    """The estimates of one call (same order as ``Trace.calls``)."""

    layer: int
    index: int
    role: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    tflops: float | None
    cost_usd: float | None
    reused: bool = False
    saved_cost_usd: float | None = Field(default=0.0, description="What a reused call would have cost (0 for a call made).")


class CostBucket(BaseModel):
    """Sums over a set of calls; ``None`` where a model's parameters or prices are unknown."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = Field(default=0.0, description="Sum of the calls' latencies.")
    tflops: float | None = 0.0
    cost_usd: float | None = 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, call: CallRecord, cost: CallCost) -> None:
        self.calls += 1
        self.prompt_tokens += call.prompt_tokens
        self.completion_tokens += call.completion_tokens
        self.latency_s += call.latency_s
        self.tflops = None if self.tflops is None or cost.tflops is None else self.tflops + cost.tflops
        self.cost_usd = None if self.cost_usd is None or cost.cost_usd is None else self.cost_usd + cost.cost_usd


class Accounting(BaseModel):
    """What a request cost, broken down every way a user compares pipelines (``Trace.accounting``).

    Its JSON is the ``accounting`` object of ``moa-ray run --json``, of the endpoint's ``moa.trace`` and of eval's
    ``trace`` column. The defaults are the accounting of a request that made no call, so a partial record reads as
    one (unknown facts stay ``None``).
    """

    totals: CostBucket = Field(default_factory=CostBucket)
    by_role: dict[str, CostBucket] = Field(default_factory=dict)
    by_layer: dict[str, CostBucket] = Field(default_factory=dict, description="Keyed by layer number (0 = role generation).")
    by_model: dict[str, CostBucket] = Field(default_factory=dict)
    calls: list[CallCost] = Field(default_factory=list)
    layers_run: int = Field(default=0, description="Layers that ran: proposer layers plus the final call.")
    proposer_layers_run: int = 0
    stopped_at_layer: int | None = None
    critical_path_s: float = Field(default=0.0, description="Sum over sequential steps of the slowest call.")
    sum_latency_s: float = Field(default=0.0, description="Sum of every call's latency (the cost of running them one by one).")
    wall_s: float = 0.0
    unknown_parameters: list[str] = Field(default_factory=list, description="Models called without parameters_b: their TFLOPs are unknown.")
    unknown_pricing: list[str] = Field(default_factory=list, description="Models called without pricing: their cost is unknown.")
    reused_calls: int = Field(default=0, description="Calls answered from the call store (no model call, no cost).")
    saved_cost_usd: float | None = Field(default=0.0, description="What the reused calls would have cost; None where a price is unknown.")


def call_cost(call: CallRecord, spec: ModelSpecBase | None) -> CallCost:
    """TFLOPs and USD of one call; zero tokens cost zero even for a model with unknown facts."""
    tokens = call.prompt_tokens + call.completion_tokens
    tflops: float | None
    cost: float | None
    if tokens == 0:
        tflops, cost = 0.0, 0.0
    else:
        params = spec.parameters_b if spec is not None else None
        tflops = None if params is None else 2.0 * params * 1e9 * tokens / 1e12
        pricing = spec.pricing if spec is not None else None
        cost = (
            None
            if pricing is None
            else (call.prompt_tokens * pricing.input_per_mtok + call.completion_tokens * pricing.output_per_mtok) / 1e6
        )
    saved: float | None = 0.0
    if call.reused:  # answered from the store: nothing was computed or paid this time
        saved, tflops, cost = cost, 0.0, 0.0
    return CallCost(
        layer=call.layer,
        index=call.index,
        role=call.role,
        model=call.model,
        prompt_tokens=call.prompt_tokens,
        completion_tokens=call.completion_tokens,
        tflops=tflops,
        cost_usd=cost,
        reused=call.reused,
        saved_cost_usd=saved,
    )


def account(trace: Trace, models: Mapping[str, ModelSpecBase] | None = None) -> Accounting:
    """The accounting of ``trace``; ``models`` maps config model names to their specs (None: all unknown)."""
    models = models or {}
    totals = CostBucket()
    by_role: dict[str, CostBucket] = {}
    by_layer: dict[str, CostBucket] = {}
    by_model: dict[str, CostBucket] = {}
    costs = []
    for call in trace.calls:
        cost = call_cost(call, models.get(call.model))
        costs.append(cost)
        for bucket in (
            totals,
            by_role.setdefault(call.role, CostBucket()),
            by_layer.setdefault(str(call.layer), CostBucket()),
            by_model.setdefault(call.model, CostBucket()),
        ):
            bucket.add(call, cost)
    called = list(by_model)
    return Accounting(
        totals=totals,
        by_role=by_role,
        by_layer=by_layer,
        by_model=by_model,
        calls=costs,
        layers_run=trace.layers_run,
        proposer_layers_run=sum(1 for layer in trace.layers if layer.role == "proposer"),
        stopped_at_layer=trace.stopped_at_layer,
        critical_path_s=trace.critical_path_s,
        sum_latency_s=trace.sum_latency_s,
        wall_s=trace.wall_s,
        unknown_parameters=[m for m in called if m not in models or models[m].parameters_b is None],
        unknown_pricing=[m for m in called if m not in models or models[m].pricing is None],
        reused_calls=sum(1 for c in costs if c.reused),
        saved_cost_usd=None if any(c.saved_cost_usd is None for c in costs) else sum(c.saved_cost_usd or 0.0 for c in costs),
    )


def fill_accounting(trace: Trace, models: Mapping[str, ModelSpecBase] | None = None) -> Trace:
    """Store the accounting in ``trace.accounting`` (its JSON travels with the trace through Serve and Parquet)."""
    trace.accounting = account(trace, models)
    return trace
