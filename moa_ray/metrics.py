"""The endpoint's and the pipelines' Prometheus metrics, through Ray's metrics API.

Each process that runs a pipeline (the Serve ingress replica, an eval worker, a driver with Ray) records its own
calls and requests with :mod:`ray.util.metrics`; Ray's metrics agent on each node exports them, every series
labelled with the process (``WorkerId``), so a query sums over it. Ray puts its namespace in front of every name:
the metric ``moa_requests_total`` is scraped as ``ray_moa_requests_total``, beside ``ray_serve_*`` and vLLM's
``ray_vllm_*``. :data:`SCRAPED_NAMES` lists the scraped names of the ones below.

Labels stay low-cardinality: pipeline, model and role names from the config, a status, a token direction; never
a prompt, a key or a request id. Outside Ray (``moa-ray run`` of in-process models) nothing is recorded, and
the check costs one attribute read: the metrics are created the first time a process records with Ray up.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moa_ray.pipeline.trace import CallRecord, Trace

#: What Ray puts in front of every metric name it exports.
RAY_NAMESPACE = "ray_"
#: Request and call latency buckets (seconds): a single call's tenths of a second to a 10-minute request.
LATENCY_BUCKETS_S = [0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0]
#: Time-to-first-token buckets (seconds): an MoA's first token waits for its proposer layers.
TTFT_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0]
#: The ``pipeline`` label of a request that named no served pipeline (a 4xx): the client's text never becomes a label.
NO_PIPELINE = "none"


@dataclass(frozen=True)
class MetricInfo:
    """One metric: its name in Ray (scraped with :data:`RAY_NAMESPACE` in front), kind, labels and meaning."""

    name: str
    kind: str  # "counter" or "histogram"
    labels: tuple[str, ...]
    description: str
    buckets: tuple[float, ...] = ()

    @property
    def scraped(self) -> str:
        """The name a Prometheus scrape shows (a histogram adds ``_bucket``, ``_count`` and ``_sum`` to it)."""
        return RAY_NAMESPACE + self.name


REQUESTS = MetricInfo(
    "moa_requests_total",
    "counter",
    ("pipeline", "status"),
    "Requests the endpoint finished, by HTTP status (an error inside a stream counts as its status).",
)
REQUEST_LATENCY = MetricInfo(
    "moa_request_latency_seconds", "histogram", ("pipeline",), "Request latency, arrival to last byte.", tuple(LATENCY_BUCKETS_S)
)
TTFT = MetricInfo(
    "moa_time_to_first_token_seconds",
    "histogram",
    ("pipeline",),
    "Streamed requests: arrival to the answer's first token (after every proposer layer).",
    tuple(TTFT_BUCKETS_S),
)
CALLS = MetricInfo(
    "moa_calls_total", "counter", ("model", "role", "status"), "Model calls by outcome: ok, error, cut (a straggler left behind), reused."
)
CALL_LATENCY = MetricInfo("moa_call_latency_seconds", "histogram", ("model", "role"), "Model call latency.", tuple(LATENCY_BUCKETS_S))
TOKENS = MetricInfo(
    "moa_tokens_total", "counter", ("model", "role", "direction"), "Tokens of the calls made, direction prompt or completion."
)
COST = MetricInfo("moa_cost_usd_total", "counter", ("model",), "USD the calls cost, from the models' pricing (unpriced models: none).")
RETRIES = MetricInfo("moa_retries_total", "counter", ("model",), "Failed attempts that a call retried (backend or replica retries).")
FALLBACKS = MetricInfo("moa_fallbacks_total", "counter", ("model", "role"), "Calls made on a fallback model after another model failed.")
JUDGE_FALLBACKS = MetricInfo(
    "moa_judge_fallbacks_total",
    "counter",
    ("pipeline",),
    "SMoA layers whose judge's selection was replaced (its verdict failed or was unusable).",
)
EARLY_STOPS = MetricInfo(
    "moa_early_stops_total", "counter", ("pipeline",), "Requests whose SMoA moderator ended the debate before the last layer."
)

ALL_METRICS = (REQUESTS, REQUEST_LATENCY, TTFT, CALLS, CALL_LATENCY, TOKENS, COST, RETRIES, FALLBACKS, JUDGE_FALLBACKS, EARLY_STOPS)
#: Every name a scrape shows for these metrics (histograms by their three series).
SCRAPED_NAMES = frozenset(
    name
    for m in ALL_METRICS
    for name in ([m.scraped] if m.kind == "counter" else [f"{m.scraped}_bucket", f"{m.scraped}_count", f"{m.scraped}_sum"])
)


class _Metrics:
    """The Ray metric objects of this process, created once."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Histogram

        def make(info: MetricInfo) -> Any:
            if info.kind == "counter":
                return Counter(info.name, description=info.description, tag_keys=info.labels)
            return Histogram(info.name, description=info.description, boundaries=list(info.buckets), tag_keys=info.labels)

        self.requests = make(REQUESTS)
        self.request_latency = make(REQUEST_LATENCY)
        self.ttft = make(TTFT)
        self.calls = make(CALLS)
        self.call_latency = make(CALL_LATENCY)
        self.tokens = make(TOKENS)
        self.cost = make(COST)
        self.retries = make(RETRIES)
        self.fallbacks = make(FALLBACKS)
        self.judge_fallbacks = make(JUDGE_FALLBACKS)
        self.early_stops = make(EARLY_STOPS)


_metrics: _Metrics | None = None


def _active() -> _Metrics | None:
    """This process's metrics, or None where Ray is not running here (nothing to export them)."""
    global _metrics
    ray = sys.modules.get("ray")  # never imported: certainly not initialized (and no import cost)
    if ray is None or not ray.is_initialized():
        return None
    if _metrics is None:
        _metrics = _Metrics()
    return _metrics


def record_call(record: CallRecord) -> None:
    """Count one finished call: its outcome, latency, tokens, retries, and whether it was a fallback."""
    metrics = _active()
    if metrics is None:
        return
    model, role = record.model, record.role
    status = "reused" if record.reused else record.status
    metrics.calls.inc(1, tags={"model": model, "role": role, "status": status})
    if record.reused:
        return  # answered from the call store: no model ran, no tokens were spent, no latency was the model's
    metrics.call_latency.observe(record.latency_s, tags={"model": model, "role": role})
    if record.prompt_tokens:
        metrics.tokens.inc(record.prompt_tokens, tags={"model": model, "role": role, "direction": "prompt"})
    if record.completion_tokens:
        metrics.tokens.inc(record.completion_tokens, tags={"model": model, "role": role, "direction": "completion"})
    if record.retries:
        metrics.retries.inc(len(record.retries), tags={"model": model})
    if getattr(record, "fallback_of", None):
        metrics.fallbacks.inc(1, tags={"model": model, "role": role})


def record_trace(trace: Trace) -> None:
    """Count what a finished request's trace knows as a whole: its cost per model (from its accounting), the
    judge's replaced selections, and a moderator's early stop."""
    metrics = _active()
    if metrics is None:
        return
    by_model = trace.accounting.by_model if trace.accounting is not None else {}
    for model, bucket in by_model.items():
        cost = bucket.cost_usd
        if cost:  # None: unpriced; 0: nothing spent (a counter only grows)
            metrics.cost.inc(cost, tags={"model": model})
    tags = {"pipeline": trace.pipeline}
    judge_fallbacks = sum(1 for layer in trace.layers if layer.judge_fallback)
    if judge_fallbacks:
        metrics.judge_fallbacks.inc(judge_fallbacks, tags=tags)
    if trace.stopped_at_layer is not None:
        metrics.early_stops.inc(1, tags=tags)


def record_request(pipeline: str | None, status: int, latency_s: float, ttft_s: float | None = None) -> None:
    """Count one request the endpoint finished (``pipeline`` None: it named no served pipeline)."""
    metrics = _active()
    if metrics is None:
        return
    name = pipeline or NO_PIPELINE
    metrics.requests.inc(1, tags={"pipeline": name, "status": str(status)})
    metrics.request_latency.observe(latency_s, tags={"pipeline": name})
    if ttft_s is not None:
        metrics.ttft.observe(ttft_s, tags={"pipeline": name})
