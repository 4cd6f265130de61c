"""What sparsity saves: MoA vs SMoA (moderator on and off) on AlpacaEval instructions with real models.

The same model (by default the embedded SmolLM2-135M-Instruct through llama.cpp;
``--config FILE --model NAME`` takes any configured model, e.g. a vLLM server or a
hosted API) with four proposer personas runs three pipelines on the first N
AlpacaEval instructions:

- ``moa``: n = 4 proposers x 3 layers, then the aggregator;
- ``smoa``: n = 4, k = 2, moderator on, up to 3 proposer layers;
- ``smoa-nomod``: the same SMoA with the moderator off (always 3 layers).

It prints, per prompt, the tokens, critical-path latency, the judge's selections
and where the moderator stopped; then totals by role (proposer, judge,
aggregator) and the ratio split into its three causes: fewer references, judge
calls, early stops. The last line is ``token_ratio <smoa tokens / moa tokens>``
(moderator on). The moderator decides on the real responses; nothing forces or
biases a stop.

Models run in-process (LocalAgent; the embedded model serialises its calls), so
latencies are per-call generation times and the critical path is what a
parallel deployment would see; wall time is the serial sum.

    python -m bench.sparsity --prompts 20 --out run.json
    python -m bench.sparsity --prompts 20 --config my.yaml --model qwen-72b   # a strong judge
    python -m bench.sparsity --report run.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from moa_ray.config import MoARayConfig, load_config, parse_config
from moa_ray.pipeline import build_pipeline
from moa_ray.pipeline.agents import LocalAgent
from moa_ray.pipeline.trace import Trace

PIPELINES = ("moa", "smoa", "smoa-nomod")

PERSONAS = [
    {"temperature": 0.7},
    {"temperature": 1.0, "system": "You are a careful fact checker. Answer precisely and point out common misconceptions."},
    {"temperature": 0.4, "system": "You are a patient teacher. Explain the answer step by step with a short example."},
    {"temperature": 0.9, "system": "You are a concise expert. Give the key facts first, then brief details."},
]


def model_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The one model every role uses: embedded SmolLM2, or ``--model`` of ``--config`` (e.g. a vLLM or hosted one)."""
    if args.config is None:
        return {
            "backend": "llamacpp",
            "model": "smollm2-135m-instruct",
            "n_threads": args.threads,
            "n_ctx": 8192,
            "temperature": 0.7,
            "max_tokens": args.max_tokens,
            "parameters_b": 0.135,
        }
    models = load_config(args.config).models
    if args.model not in models:
        sys.exit(f"--model {args.model!r} is not a model of {args.config} (models: {', '.join(models)})")
    return {**models[args.model].model_dump(), "max_tokens": args.max_tokens}


def bench_config(model: dict[str, Any], judge_max_tokens: int, layers: int, k: int, shuffle: bool = False) -> MoARayConfig:
    """MoA and SMoA over the same model and proposers."""
    layer = [{"model": "bench", **p} for p in PERSONAS]
    aggregator = {"model": "bench", "temperature": 0.3}
    judge = {"model": "bench", "temperature": 0.3, "max_tokens": judge_max_tokens}
    smoa = {
        "kind": "smoa",
        "layers": [layer] * layers,
        "aggregator": aggregator,
        "judge": judge,
        "k": k,
        "shuffle_responses": shuffle,
    }
    return parse_config(
        {
            "models": {"bench": model},
            "pipelines": {
                "moa": {"kind": "moa", "layers": [layer] * layers, "aggregator": aggregator},
                "smoa": {**smoa, "moderator": True},
                "smoa-nomod": {**smoa, "moderator": False},
            },
        },
        "<bench.sparsity>",
    )


def load_prompts(dataset: str, n: int, offset: int) -> list[dict[str, str]]:
    """AlpacaEval instructions ``offset`` .. ``offset + n`` (the packaged copy, or any dataset file moa-ray reads)."""
    from moa_ray.eval.benchmarks.registry import load_dataset
    from moa_ray.eval.datasets import DatasetError

    try:
        prompts = load_dataset(dataset).prompts[offset : offset + n]
    except DatasetError as err:
        sys.exit(f"--dataset {dataset}: {err}")
    return [{"id": p.prompt_id, "instruction": p.turns[0]} for p in prompts]


def describe(trace: Trace) -> str:
    tokens = trace.totals().total_tokens
    parts = [f"{tokens:6d} tok", f"{trace.critical_path_s:6.1f}s cp"]
    picks = [layer.selected for layer in trace.layers if layer.role == "proposer" and layer.selected is not None]
    if picks:
        parts.append("kept " + " ".join(str(p) for p in picks))
    if trace.stopped_at_layer is not None:
        parts.append(f"stop@{trace.stopped_at_layer}")
    fallbacks = [layer.judge_fallback for layer in trace.layers if layer.judge_fallback]
    if fallbacks:
        parts.append(f"fallbacks={len(fallbacks)}")
    return " ".join(parts)


def summarise(name: str, traces: list[Trace]) -> dict[str, Any]:
    by_role: dict[str, int] = {}
    for t in traces:
        for role, totals in t.tokens_by_role().items():
            by_role[role] = by_role.get(role, 0) + totals.total_tokens
    proposer_layers = [sum(1 for layer in t.layers if layer.role == "proposer") for t in traces]
    stops = [t.stopped_at_layer for t in traces if t.stopped_at_layer is not None]
    return {
        "pipeline": name,
        "prompts": len(traces),
        "total_tokens": sum(t.totals().total_tokens for t in traces),
        "prompt_tokens": sum(t.totals().prompt_tokens for t in traces),
        "completion_tokens": sum(t.totals().completion_tokens for t in traces),
        "tokens_by_role": by_role,
        "calls": sum(len(t.calls) for t in traces),
        "critical_path_s_mean": statistics.fmean(t.critical_path_s for t in traces),
        "critical_path_s_total": sum(t.critical_path_s for t in traces),
        "proposer_layers_mean": statistics.fmean(proposer_layers),
        "stops": {str(layer): stops.count(layer) for layer in sorted(set(stops))},
        "judge_fallbacks": sum(1 for t in traces for layer in t.layers if layer.judge_fallback),
        "tflops": sum((t.accounting.totals.tflops if t.accounting else None) or 0.0 for t in traces),
    }


async def run(args: argparse.Namespace) -> None:
    from moa_ray.backends import create_backend

    prompts = load_prompts(args.dataset, args.prompts, args.offset)
    config = bench_config(model_spec(args), args.judge_max_tokens, args.layers, args.k, args.shuffle_responses)
    spec = config.models["bench"]
    print(f"model {spec.model} ({spec.backend}, max_tokens={args.max_tokens}); transport: in-process LocalAgent", flush=True)
    backend = create_backend(spec)
    agents = {"bench": LocalAgent(backend)}
    pipelines = {name: build_pipeline(config, name, agents) for name in PIPELINES}
    traces: dict[str, list[Trace]] = {name: [] for name in PIPELINES}
    rows = []
    start = time.perf_counter()
    try:
        for i, prompt in enumerate(prompts, start=1):
            line = [f"[{i}/{len(prompts)}] {prompt['id']}"]
            row: dict[str, Any] = {"id": prompt["id"]}
            for name, pipeline in pipelines.items():
                result = await pipeline.run(prompt["instruction"])
                traces[name].append(result.trace)
                line.append(f"{name}: {describe(result.trace)}")
                row[name] = result.trace.to_json_dict()
            rows.append(row)
            print(" | ".join(line) + f"  ({time.perf_counter() - start:.0f}s)", flush=True)
    finally:
        await backend.aclose()

    summaries = {name: summarise(name, traces[name]) for name in PIPELINES}
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "summaries": summaries, "rows": rows}, indent=1))
        print(f"traces written to {args.out}")
    report(summaries)


def drivers(summaries: dict[str, dict[str, Any]]) -> dict[str, float]:
    """SMoA's token change against MoA, split into its three causes (each a signed share of MoA's tokens).

    - fewer references: proposer + aggregator tokens of MoA minus those of SMoA
      without the moderator (same layers, so only the k-of-n references differ);
    - judge/moderator: every other SMoA call (judge, moderator, roles), moderator off;
    - early stops: SMoA with the moderator off minus SMoA with it on.

    The three add up to ``smoa / moa - 1`` exactly; the runs sample separately, so
    each part also carries some sampling noise.
    """
    moa, smoa, nomod = (summaries[n] for n in PIPELINES)

    def work(s: dict[str, Any]) -> int:
        return s["tokens_by_role"].get("proposer", 0) + s["tokens_by_role"].get("aggregator", 0)

    total = moa["total_tokens"]
    return {
        "fewer_references": (work(nomod) - work(moa)) / total,
        "judge_overhead": (nomod["total_tokens"] - work(nomod)) / total,
        "early_stops": (smoa["total_tokens"] - nomod["total_tokens"]) / total,
    }


def report(summaries: dict[str, dict[str, Any]]) -> None:
    """The per-pipeline table, the ratios, what drives them; the last line is ``token_ratio``."""
    print("\npipeline     tokens  (prompt/compl)  proposer  judge  aggregator  calls  layers  cp_mean_s  stops  fallbacks")
    for s in summaries.values():
        r = s["tokens_by_role"]
        print(
            f"{s['pipeline']:<11} {s['total_tokens']:7d}  ({s['prompt_tokens']}/{s['completion_tokens']})  "
            f"{r.get('proposer', 0):8d}  {r.get('judge', 0):5d}  {r.get('aggregator', 0):10d}  {s['calls']:5d}  "
            f"{s['proposer_layers_mean']:6.2f}  {s['critical_path_s_mean']:9.2f}  {s['stops'] or '-'}  {s['judge_fallbacks']}"
        )
    moa = summaries["moa"]["total_tokens"]
    for name in ("smoa", "smoa-nomod"):
        s = summaries[name]
        print(
            f"{name}/moa: tokens {s['total_tokens'] / moa:.3f}, critical path "
            f"{s['critical_path_s_total'] / summaries['moa']['critical_path_s_total']:.3f}"
        )
    parts = drivers(summaries)
    print("what drives smoa/moa (share of MoA tokens):")
    print(f"  fewer references (k of n)     {parts['fewer_references']:+7.1%}")
    print(f"  judge/moderator calls         {parts['judge_overhead']:+7.1%}")
    print(f"  early stops (moderator)       {parts['early_stops']:+7.1%}")
    print(f"token_ratio {summaries['smoa']['total_tokens'] / moa:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=20, help="First N AlpacaEval instructions (after --offset).")
    parser.add_argument("--offset", type=int, default=0, help="Skip this many instructions (e.g. a held-out set).")
    parser.add_argument("--dataset", default="alpaca_eval", help="alpaca_eval (packaged copy of the 805), or a file.")
    parser.add_argument("--max-tokens", type=int, default=96, help="max_tokens of proposers and aggregator.")
    parser.add_argument("--judge-max-tokens", type=int, default=160, help="max_tokens of the judge (room for its JSON).")
    parser.add_argument("--layers", type=int, default=3, help="Proposer layers (SMoA: at most).")
    parser.add_argument("--k", type=int, default=2, help="Responses the SMoA judge keeps.")
    parser.add_argument("--shuffle-responses", action="store_true", help="Show the judge responses in a seeded random order.")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (embedded model).")
    parser.add_argument("--config", default=None, help="A moa-ray config whose --model every role uses instead.")
    parser.add_argument("--model", default=None, help="The model of --config (any backend: llamacpp, openai, vllm).")
    parser.add_argument("--out", default=None, help="Write summaries and every trace as JSON here.")
    parser.add_argument("--report", default=None, metavar="JSON", help="Only print the report of a run saved by --out.")
    args = parser.parse_args()
    if args.report:
        report(json.loads(Path(args.report).read_text())["summaries"])
        return
    if (args.config is None) != (args.model is None):
        parser.error("--config and --model go together")
    if args.offset < 0:
        parser.error("--offset must be at least 0")
    if args.prompts < 1 or args.max_tokens < 1 or not 1 <= args.k < 4:
        parser.error("--prompts and --max-tokens must be positive and 1 <= --k < 4")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
