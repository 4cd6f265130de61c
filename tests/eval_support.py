"""Shared by the eval tests: configs whose models are served by the LLM simulator (bench/simulator.py)."""

from __future__ import annotations

from typing import Any

from bench.simulator import Behaviour, SimulatorConfig

#: Provider model ids the simulator answers specially.
JUDGE_POSITION_A = "judge-always-a"  # a judge with a pure position bias
GRADER_SEVEN = "grader-seven"
FAILING = "always-fails"
LOGPROB_JUDGE = "logprob-judge"  # answers "M" with logprobs for "m" and "M" (AlpacaEval's official annotator)
LOGPROB_TOPS = [{"M": -0.25, "m": -1.5, "The": -6.0}]


def simulator_config(latency_ms: float = 30, **kwargs: Any) -> SimulatorConfig:
    return SimulatorConfig(
        latency_ms=latency_ms,
        output_tokens=12,
        models={
            JUDGE_POSITION_A: Behaviour(latency_ms=latency_ms, reply="Both are fine, but the first is better. [[A]]"),
            GRADER_SEVEN: Behaviour(latency_ms=latency_ms, reply="Solid answer. Rating: [[7]]"),
            FAILING: Behaviour(latency_ms=latency_ms, failure_rate=1.0, failure_status=400),
            LOGPROB_JUDGE: Behaviour(latency_ms=latency_ms, reply="M", top_logprobs=LOGPROB_TOPS),
        },
        **kwargs,
    )


def model(base_url: str, provider_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "backend": "openai",
        "model": provider_id,
        "base_url": base_url,
        "max_retries": 0,
        "max_ongoing_requests": 64,
        "num_cpus": 0.01,
        **extra,
    }


def eval_config(base_url: str) -> dict[str, Any]:
    """Two small MoA pipelines sharing models, one that always fails, and three judges."""
    return {
        "models": {
            "a": model(base_url, "sim-a", pricing={"input_per_mtok": 1.0, "output_per_mtok": 2.0}, parameters_b=7),
            "b": model(base_url, "sim-b"),
            "agg": model(base_url, "sim-agg"),
            "broken": model(base_url, FAILING),
            "judge": model(base_url, JUDGE_POSITION_A),
            "grader": model(base_url, GRADER_SEVEN),
            "official": model(base_url, LOGPROB_JUDGE),
        },
        "pipelines": {
            "one": {"kind": "moa", "layers": [["a"]], "aggregator": "agg"},
            "two": {"kind": "moa", "layers": [["a", "b"], ["a", "b"]], "aggregator": "agg"},
            "bad": {"kind": "moa", "layers": [["a"]], "aggregator": "broken"},
        },
    }
