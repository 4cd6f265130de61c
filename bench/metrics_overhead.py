"""CPU that the endpoint's metrics and access log add per agent call, measured where they run: in a Ray process.

The endpoint records, in its ingress replica, one :func:`moa_ray.metrics.record_call` per call, one
:func:`~moa_ray.metrics.record_trace` and one :func:`~moa_ray.metrics.record_request` per request, and one access-log
line per request. This times each of them (``time.process_time``: every thread of this process, Ray's metric
recording included) on a local Ray, for a request of ``--calls`` calls (a 2-layer MoA of 3 proposers: 7), and spreads
the per-request part over its calls. The access log is formatted and written through a real ``logging`` handler (to
``/dev/null``), as Serve's replica logger would. Ray's metrics agent exports the aggregated series every few seconds,
once per process, not per call.

    python -m bench.metrics_overhead --calls 7 --requests 5000

The last line is ``cpu_us_per_agent_call <value>`` (goal: <= 200, issue 21's 0.2 ms).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable

from moa_ray import metrics
from moa_ray.pipeline.accounting import fill_accounting
from moa_ray.pipeline.trace import CallRecord, LayerRecord, Trace
from moa_ray.serve.access_log import RequestOutcome
from moa_ray.serve.access_log import log as access_log


def sample_trace(calls: int) -> Trace:
    """A finished MoA request: ``calls - 1`` proposers over two layers, then the aggregator; priced models."""
    from moa_ray.config import parse_config

    models = {
        f"m{i}": {
            "backend": "openai",
            "model": f"m{i}",
            "base_url": "http://x.test/v1",
            "pricing": {"input_per_mtok": 3, "output_per_mtok": 15},
        }
        for i in range(4)
    }
    config = parse_config({"models": models, "pipelines": {}})
    trace = Trace(pipeline="moa", kind="moa", layers=[LayerRecord(layer=1, role="proposer"), LayerRecord(layer=3, role="aggregator")])
    for i in range(calls):
        last = i == calls - 1
        trace.calls.append(
            CallRecord(
                layer=3 if last else 1 + i % 2,
                index=i,
                role="aggregator" if last else "proposer",
                model=f"m{i % 4}",
                prompt_tokens=420,
                completion_tokens=180,
                latency_s=0.8,
            )
        )
    return fill_accounting(trace, config.models)


def cpu_us(work: Callable[[], None], repeat: int) -> float:
    """Microseconds of this process's CPU per ``work()``."""
    start = time.process_time()
    for _ in range(repeat):
        work()
    return (time.process_time() - start) / repeat * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=7, help="Calls per request (a 2-layer MoA of 3 proposers: 7).")
    parser.add_argument("--requests", type=int, default=5000, help="Requests timed per measurement.")
    args = parser.parse_args()

    from moa_ray.runtime import init_ray

    init_ray(num_cpus=2)
    import ray

    trace = sample_trace(args.calls)
    records = trace.calls
    handler = logging.FileHandler(os.devnull)
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False
    try:
        metrics.record_call(records[0])  # the metrics are created on first use: not timed

        def every_call() -> None:
            for record in records:
                metrics.record_call(record)

        calls_us = cpu_us(every_call, args.requests) / len(records)
        trace_us = cpu_us(lambda: metrics.record_trace(trace), args.requests)
        request_us = cpu_us(lambda: metrics.record_request("moa", 200, 2.4, 1.7), args.requests)
        outcome = RequestOutcome(request_id="0" * 32, started=time.perf_counter(), pipeline="moa", trace=trace)
        line_us = cpu_us(lambda: access_log.info("%s", _line(outcome)), args.requests)
    finally:
        access_log.removeHandler(handler)
        ray.shutdown()
    per_request = trace_us + request_us + line_us
    total = calls_us + per_request / len(records)
    print(f"record_call: {calls_us:.1f} us per call")
    print(f"record_trace: {trace_us:.1f} us, record_request: {request_us:.1f} us, access-log line: {line_us:.1f} us per request")
    print(f"per request of {len(records)} calls: {calls_us * len(records) + per_request:.1f} us")
    print(f"cpu_us_per_agent_call {total:.1f}")


def _line(outcome: RequestOutcome) -> str:
    import json

    return json.dumps(outcome.line("POST", "/v1/chat/completions", 200, 2.4), separators=(",", ":"))


if __name__ == "__main__":
    main()
