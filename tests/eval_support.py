"""Shared by the eval tests: configs whose models are served by the LLM simulator (bench/simulator.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from bench.simulator import Behaviour, SimulatorConfig
from moa_ray.config import MoARayConfig, parse_config
from moa_ray.eval.generate import GenerateOptions
from moa_ray.eval.judging import JudgeOptions
from moa_ray.eval.runner import PoolKind
from moa_ray.eval.schema import GenerationRow, _Row

R = TypeVar("R", bound=_Row)

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


# --------------------------------------------------------------------------- generate / judge end to end

#: A provider model failing half its calls (HTTP 503): the rows it fails are retried by the next run.
FLAKY = "flaky-half"


def flaky_simulator_config() -> SimulatorConfig:
    """:func:`simulator_config` (seeded) plus the half-failing model."""
    config = simulator_config(seed=3)
    config.models[FLAKY] = Behaviour(latency_ms=30, failure_rate=0.5, failure_status=503)
    return config


def flaky_eval_config(base_url: str, **hosting: str) -> MoARayConfig:
    """:func:`eval_config` plus the pipeline ``flaky`` (its aggregator fails half the time); ``hosting`` per model
    name (``a="deployment"``) gives a model its own Serve deployment instead of in-process calls."""
    raw = eval_config(base_url)
    raw["models"]["flaky"] = model(base_url, FLAKY)
    raw["pipelines"]["flaky"] = {"kind": "moa", "layers": [["a"]], "aggregator": "flaky"}
    for name, where in hosting.items():
        raw["models"][name]["hosting"] = where
    return parse_config(raw)


def generate_options(out: Path, pipelines: list[str], *, pool: PoolKind = "in_process", **kw: Any) -> GenerateOptions:
    """Small, quiet generation options: 4 prompts in flight over 2 workers (Ray) or one loop (in process)."""
    defaults = {"concurrency": 4, "workers": 2, "worker_cpus": 0.01, "progress": False}
    return GenerateOptions.model_validate({**defaults, "pipelines": pipelines, "out": str(out), "pool": pool, **kw})


def judge_options(generations: Path, out: Path, judge: str, mode: str, *, pool: PoolKind = "in_process", **kw: Any) -> JudgeOptions:
    return JudgeOptions.model_validate(
        {
            "judge": judge,
            "generations": str(generations),
            "out": str(out),
            "mode": mode,
            "concurrency": 4,
            "workers": 1,
            "worker_cpus": 0.01,
            "run_id": kw.pop("run_id", f"j-{judge}-{mode}"),
            "progress": False,
            "pool": pool,
            **kw,
        }
    )


# --------------------------------------------------------------------------- stored rows

#: Placeholders for the required fields a test's stored row does not care about (what planning reads is given).
_PLACEHOLDERS: dict[str, Any] = {
    "run_id": "stored",
    "judge_prompt": "prompt",
    "instruction": "question",
    "output_1": "reference answer",
    "generator_1": "reference",
    "output_2": "pipeline answer",
    "generator_2": "pipeline",
    "dataset": "dataset",
    "config_hash": "h",
}


def stored_row(row_type: type[R], key: tuple[Any, ...], **fields: Any) -> R:
    """A whole row of ``row_type`` as a table gives it back: ``key`` (its KEY columns' values) and ``fields``, every
    other required field a placeholder; what a test's partial row (``{"status": "ok", "attempt": 1}``) stands for."""
    values = dict(zip(row_type.KEY, key, strict=True))
    required = {n: _PLACEHOLDERS[n] for n, f in row_type.model_fields.items() if f.is_required() and n not in values}
    return row_type(**{**required, **values, **fields})


def stored_rows(*rows: R) -> dict[tuple[Any, ...], R]:
    """Rows by key, as :meth:`~moa_ray.eval.store.RowTable.latest` gives them."""
    return {r.row_key(): r for r in rows}


def generations(rows: list[GenerationRow]) -> dict[tuple[Any, ...], GenerationRow]:
    """Answers by key, as judging reads them."""
    return stored_rows(*rows)


def answer_records(rows: list[GenerationRow]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Answers by key as dicts: what a test hands the report (which reads records, not row models)."""
    return {r.row_key(): r.model_dump() for r in rows}
