"""The Grafana dashboard of a moa-ray endpoint: what an operator watches, as PromQL over the metrics it exports.

Requests (rate, errors by status, p50/p95 latency and time to first token per pipeline), calls and tokens per model
and role, cost per hour, reliability (retries, fallbacks, judge fallbacks, early stops), and the vLLM engines (time to
first token, time per output token, KV-cache use, queue). Every name queried is one :mod:`moa_ray.metrics` or Ray
Serve LLM's vLLM engine exports (scraped with Ray's ``ray_`` namespace); each series is per process, so every query
sums over ``WorkerId``. ``moa-ray serve k8s`` writes it as ``grafana-dashboard.json`` (import it in Grafana, or load
it from a ConfigMap with Grafana's dashboard sidecar); the datasource is a variable, chosen on import.
"""

from __future__ import annotations

from typing import Any

UID = "moa-ray-endpoint"
TITLE = "moa-ray endpoint"
#: Grafana's own window for rates: at least four scrape intervals.
RATE = "$__rate_interval"
PIPELINES = 'pipeline=~"$pipeline"'
MODELS = 'model=~"$model"'
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
#: Panel size on Grafana's 24-column grid.
WIDTH, HEIGHT = 12, 8


def _target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def _quantiles(metric: str, by: str, selector: str, legend: str) -> list[tuple[str, str]]:
    """p50 and p95 of a histogram, by ``by``."""
    series = f"{metric}_bucket{{{selector}}}" if selector else f"{metric}_bucket"
    return [(f"histogram_quantile({q}, sum by (le, {by}) (rate({series}[{RATE}])))", f"p{round(q * 100)} {legend}") for q in (0.5, 0.95)]


def _panel(title: str, description: str, unit: str, queries: list[tuple[str, str]], *, kind: str = "timeseries") -> dict[str, Any]:
    refs = "ABCDEFGH"
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {"unit": unit, "min": 0}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [_target(expr, legend, refs[i]) for i, (expr, legend) in enumerate(queries)],
    }


def _row(title: str) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def _sections() -> list[tuple[str, list[dict[str, Any]]]]:
    requests = [
        _panel(
            "Requests per second",
            "Completion requests the endpoint finished, by pipeline.",
            "reqps",
            [(f"sum by (pipeline) (rate(ray_moa_requests_total{{{PIPELINES}}}[{RATE}]))", "{{pipeline}}")],
        ),
        _panel(
            "Errors by status",
            "Requests that did not end in 200, by pipeline and HTTP status (an error inside a started stream counts as its "
            "status; 499: the client went away).",
            "reqps",
            [
                (
                    f'sum by (pipeline, status) (rate(ray_moa_requests_total{{{PIPELINES}, status!="200"}}[{RATE}]))',
                    "{{pipeline}} {{status}}",
                )
            ],
        ),
        _panel(
            "Request latency p50 / p95",
            "Arrival to the response's last byte.",
            "s",
            _quantiles("ray_moa_request_latency_seconds", "pipeline", PIPELINES, "{{pipeline}}"),
        ),
        _panel(
            "Time to first token p50 / p95",
            "Streamed requests: arrival to the answer's first token, after every proposer layer.",
            "s",
            _quantiles("ray_moa_time_to_first_token_seconds", "pipeline", PIPELINES, "{{pipeline}}"),
        ),
    ]
    calls = [
        _panel(
            "Calls per second by model and role",
            "Model calls the pipelines made (proposers, aggregators, judges, moderators), by outcome.",
            "reqps",
            [(f"sum by (model, role, status) (rate(ray_moa_calls_total{{{MODELS}}}[{RATE}]))", "{{model}} {{role}} {{status}}")],
        ),
        _panel(
            "Tokens per second by model and role",
            "Prompt and completion tokens of the calls made.",
            "short",
            [(f"sum by (model, role, direction) (rate(ray_moa_tokens_total{{{MODELS}}}[{RATE}]))", "{{model}} {{role}} {{direction}}")],
        ),
        _panel(
            "Call latency p50 / p95 by model and role",
            "One model call, retries included.",
            "s",
            _quantiles("ray_moa_call_latency_seconds", "model, role", MODELS, "{{model}} {{role}}"),
        ),
        _panel(
            "Cost per hour",
            "USD per hour at the current rate, from the models' pricing (unpriced models count nothing).",
            "currencyUSD",
            [(f"sum by (model) (rate(ray_moa_cost_usd_total{{{MODELS}}}[{RATE}])) * 3600", "{{model}}")],
        ),
    ]
    reliability = [
        _panel(
            "Failed and cut calls",
            "Calls that errored (after their retries) or were cut as stragglers, by model and role.",
            "reqps",
            [
                (
                    f'sum by (model, role, status) (rate(ray_moa_calls_total{{{MODELS}, status=~"error|cut"}}[{RATE}]))',
                    "{{model}} {{role}} {{status}}",
                )
            ],
        ),
        _panel(
            "Retries and fallbacks",
            "Failed attempts a call retried, and calls made on a fallback model, by model.",
            "reqps",
            [
                (f"sum by (model) (rate(ray_moa_retries_total{{{MODELS}}}[{RATE}]))", "retries {{model}}"),
                (f"sum by (model, role) (rate(ray_moa_fallbacks_total{{{MODELS}}}[{RATE}]))", "fallback {{model}} {{role}}"),
            ],
        ),
        _panel(
            "SMoA judge fallbacks and early stops",
            "Layers whose judge's selection was repaired, and requests the moderator ended early, by pipeline.",
            "reqps",
            [
                (f"sum by (pipeline) (rate(ray_moa_judge_fallbacks_total{{{PIPELINES}}}[{RATE}]))", "judge fallback {{pipeline}}"),
                (f"sum by (pipeline) (rate(ray_moa_early_stops_total{{{PIPELINES}}}[{RATE}]))", "early stop {{pipeline}}"),
            ],
        ),
    ]
    engines = [
        _panel(
            "vLLM time to first token p50 / p95",
            "Inside the engine: a request's arrival at vLLM to its first token.",
            "s",
            _quantiles("ray_vllm_time_to_first_token_seconds", "model_name", "", "{{model_name}}"),
        ),
        _panel(
            "vLLM time per output token p50 / p95",
            "Decode speed of each vLLM engine.",
            "s",
            _quantiles("ray_vllm_request_time_per_output_token_seconds", "model_name", "", "{{model_name}}"),
        ),
        _panel(
            "vLLM KV-cache use",
            "Fraction of each engine's KV cache in use (the fullest replica).",
            "percentunit",
            [("max by (model_name) (ray_vllm_kv_cache_usage_perc)", "{{model_name}}")],
        ),
        _panel(
            "vLLM requests running and waiting",
            "Requests each model's engines are running, and those queued for room.",
            "short",
            [
                ("sum by (model_name) (ray_vllm_num_requests_running)", "running {{model_name}}"),
                ("sum by (model_name) (ray_vllm_num_requests_waiting)", "waiting {{model_name}}"),
            ],
        ),
        _panel(
            "vLLM tokens per second",
            "Prompt and generated tokens the engines processed.",
            "short",
            [
                (f"sum by (model_name) (rate(ray_vllm_prompt_tokens_total[{RATE}]))", "prompt {{model_name}}"),
                (f"sum by (model_name) (rate(ray_vllm_generation_tokens_total[{RATE}]))", "generated {{model_name}}"),
            ],
        ),
    ]
    return [("Requests", requests), ("Calls, tokens and cost", calls), ("Reliability", reliability), ("vLLM engines", engines)]


def _variable(name: str, label: str, metric: str) -> dict[str, Any]:
    query = f"label_values({metric}, {name})"
    return {
        "type": "query",
        "name": name,
        "label": label,
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-values"},
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def grafana_dashboard() -> dict[str, Any]:
    """The dashboard's JSON model (Grafana's import format), panels laid out two per row under section rows."""
    panels: list[dict[str, Any]] = []
    y = 0
    for title, section in _sections():
        panels.append({**_row(title), "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}})
        y += 1
        for i, panel in enumerate(section):
            panels.append({**panel, "gridPos": {"x": (i % 2) * WIDTH, "y": y + (i // 2) * HEIGHT, "w": WIDTH, "h": HEIGHT}})
        y += ((len(section) + 1) // 2) * HEIGHT
    for number, panel in enumerate(panels, start=1):
        panel["id"] = number
    return {
        "uid": UID,
        "title": TITLE,
        "description": "Requests, calls, tokens, cost and engines of moa-ray's OpenAI-compatible endpoint (generated by moa-ray).",
        "tags": ["moa-ray", "ray", "llm"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "templating": {
            "list": [
                {"type": "datasource", "name": "datasource", "label": "Prometheus", "query": "prometheus", "current": {}},
                _variable("pipeline", "Pipeline", "ray_moa_requests_total"),
                _variable("model", "Model", "ray_moa_calls_total"),
            ]
        },
        "panels": panels,
    }


def queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard: its panels' targets and its variables' queries."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs
