"""Every benchmark end to end: generate -> judge -> report, with the embedded model as pipeline and judge.

For each of alpaca_eval, mt_bench, flask, flask-hard, just-eval, ceb-s, ceb-t and
gsm8k, the first ``--limit`` prompts are answered by the ``embedded`` pipeline
(SmolLM2-135M through llama.cpp), judged by the same model in the mode ``eval judge``
picks for the dataset (pairwise, MT-Bench grades, the FLASK / Just-Eval / CEB rubric,
GSM8K's exact match), and reported. Each stage prints its wall time, its model calls
(generation: the traces' calls; judging: 2 per pairwise row, 1 per grade, the attempts
of each rubric row) and its ok / failed rows. A benchmark is ok when all three stages
ran and its report was written; a 135M judge often answers out of format, so failed
judgments are counted, not fatal. The last line is ``benchmarks_ok <n>/<total>``.

    python -m bench.eval_suite --limit 5
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from bench.embedded import bench_config
from moa_ray.config import MoARayConfig
from moa_ray.eval.store import RowTable, join
from moa_ray.pipeline.agents import Agent

BENCHMARKS = ("alpaca_eval", "mt_bench", "flask", "flask-hard", "just-eval", "ceb-s", "ceb-t", "gsm8k")
APP_NAME = "bench-eval-suite"


class Stage(BaseModel):
    """What one stage of one benchmark did."""

    name: str
    wall_s: float
    calls: int
    ok: int
    failed: int


class BenchmarkResult(BaseModel):
    benchmark: str
    stages: list[Stage]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and [s.name for s in self.stages] == ["generate", "judge", "report"]


def judge_calls(judged: str, run_id: str) -> int:
    """Judge calls a run made, from what it wrote: each judgment text of pairwise rows, each repeat of a grade, each attempt of a rubric row."""
    from moa_ray.eval.benchmarks.alpaca_eval import pairwise_table
    from moa_ray.eval.benchmarks.mt_bench import single_table
    from moa_ray.eval.benchmarks.rubric import rubric_table

    def mine(table: RowTable[Any]) -> list[Any]:
        return [r for r in table.latest().values() if r.run_id == run_id]

    pairwise = sum((r.judgment_reference_first is not None) + (r.judgment_pipeline_first is not None) for r in mine(pairwise_table(judged)))
    grades = sum(len(r.scores) if r.scores else r.judgment is not None for r in mine(single_table(judged)))
    return pairwise + grades + sum(r.judge_attempts for r in mine(rubric_table(judged)))


def judge_stage(name: str, gen: str, judged: str, judge: str, agent: Agent | None, *, judge_max_tokens: int) -> Stage:
    """Judge one benchmark's answers as ``eval judge`` does in auto mode: GSM8K by exact match (no calls), the rest by ``agent``."""
    from moa_ray.eval.benchmarks.gsm8k import GSM8K
    from moa_ray.eval.judging import JudgeOptions, read_generations, run_exact, run_judging

    start = time.perf_counter()
    gens = read_generations(gen)
    run_id = f"suite-{name}-{int(time.time())}"
    if name == GSM8K:
        exact = run_exact(gens, judged, run_id)
        return Stage(name="judge", wall_s=time.perf_counter() - start, calls=0, ok=exact.scored, failed=exact.failed)
    if agent is None:
        raise ValueError(f"{name} needs a judge model")
    options = JudgeOptions(
        judge=judge,
        generations=gen,
        out=judged,
        concurrency=4,
        workers=1,
        worker_cpus=0.01,
        max_tokens=judge_max_tokens,
        run_id=run_id,
        progress=False,
    )
    summary = run_judging(gens, agent, options)
    return Stage(
        name="judge", wall_s=time.perf_counter() - start, calls=judge_calls(judged, run_id), ok=summary.ok_rows, failed=summary.failed_rows
    )


def report_stage(gen: str, judged: str, report: str) -> Stage:
    """``eval report`` over every judgment table: the main table and plots, and the rubric tables; ok = files written."""
    from moa_ray.eval.judging import read_judgments, read_report_answers
    from moa_ray.eval.report import build_report, build_rubric_tables, write_report
    from moa_ray.eval.tables import write_benchmark_tables

    start = time.perf_counter()
    gens = read_report_answers(gen)  # what eval report reads: the answers' numbers as Arrow
    found = read_judgments(judged)
    rows = build_report(gens, found.pairwise, found.grades, exact=found.exact, baseline_pairs=found.baseline_pairs)
    written = write_report(rows, report) + write_benchmark_tables(build_rubric_tables(gens, found.rubric), report)
    return Stage(name="report", wall_s=time.perf_counter() - start, calls=0, ok=len(written), failed=0)


def run_benchmark(
    name: str,
    config: MoARayConfig,
    agents: Mapping[str, Agent],
    *,
    pipeline: str,
    judge: str,
    root: Path,
    limit: int,
    judge_max_tokens: int,
) -> BenchmarkResult:
    """generate -> judge -> report for one benchmark under ``root/<name>``; a stage that raises ends the benchmark."""
    from moa_ray.eval.benchmarks.registry import load_dataset
    from moa_ray.eval.generate import GenerateOptions, run_generation
    from moa_ray.eval.judging import read_generations

    gen, judged, report = (str(root / name / part) for part in ("generations", "judgments", "report"))
    stages: list[Stage] = []
    try:
        start = time.perf_counter()
        dataset = load_dataset(name, limit=limit)
        options = GenerateOptions(pipelines=[pipeline], out=gen, concurrency=4, workers=1, worker_cpus=0.01, progress=False)
        summary = run_generation(config, dataset, agents, options)
        calls = sum(r.calls for r in read_generations(gen).values() if r.run_id == options.run_id)
        stages.append(
            Stage(name="generate", wall_s=time.perf_counter() - start, calls=calls, ok=summary.ok_rows, failed=summary.failed_rows)
        )
        stages.append(judge_stage(name, gen, judged, judge, agents.get(judge), judge_max_tokens=judge_max_tokens))
        stages.append(report_stage(gen, judged, report))
    except Exception as err:  # noqa: BLE001 - one benchmark's failure is reported, the others still run
        return BenchmarkResult(benchmark=name, stages=stages, error=f"{type(err).__name__}: {err}")
    return BenchmarkResult(benchmark=name, stages=stages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=5, help="First N prompts of every benchmark.")
    parser.add_argument("--benchmarks", default=",".join(BENCHMARKS), help="Comma separated subset (default: all).")
    parser.add_argument("--pipeline", default="embedded")
    parser.add_argument("--judge", default="smollm2", help="Config name of the judge model.")
    parser.add_argument("--config", default=None, help="YAML config (default: the shipped presets).")
    parser.add_argument("--max-tokens", type=int, default=64, help="Completion cap of every generation call.")
    parser.add_argument("--judge-max-tokens", type=int, default=256, help="Completion cap of every judge call.")
    parser.add_argument("--out", default=None, help="Keep the tables here (default: a temporary directory).")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: a local Ray).")
    args = parser.parse_args()
    names = [n.strip() for n in args.benchmarks.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if args.limit < 1:
        raise SystemExit("--limit must be at least 1")
    if not names or unknown:
        raise SystemExit(f"--benchmarks must name some of {', '.join(BENCHMARKS)} (unknown: {', '.join(unknown) or 'none given'})")

    from moa_ray.runtime import ray_session
    from moa_ray.serve.deploy import deploy_agents, deploy_models

    config = bench_config(args.pipeline, args.max_tokens, args.config)
    if args.judge not in config.models:
        raise SystemExit(f"unknown judge model {args.judge!r} (models: {', '.join(sorted(config.models))})")
    with tempfile.TemporaryDirectory(prefix="moa-suite-") as tmp, ray_session(args.address, apps=[APP_NAME, f"{APP_NAME}-judge"]):
        root = Path(args.out or tmp)
        t = time.perf_counter()
        agents = dict(deploy_agents(config, [args.pipeline], app_name=APP_NAME))
        if args.judge not in agents:
            agents |= deploy_models(config, [args.judge], app_name=f"{APP_NAME}-judge")
        print(
            f"ray up, {args.pipeline!r} and judge {args.judge!r} deployed in {time.perf_counter() - t:.1f}s -> {join(str(root), '')}",
            flush=True,
        )
        print(f"{'benchmark':<12} {'stage':<9} {'wall s':>8} {'calls':>6} {'ok':>5} {'failed':>6}", flush=True)
        results = []
        for name in names:
            result = run_benchmark(
                name,
                config,
                agents,
                pipeline=args.pipeline,
                judge=args.judge,
                root=root,
                limit=args.limit,
                judge_max_tokens=args.judge_max_tokens,
            )
            for s in result.stages:
                print(f"{name:<12} {s.name:<9} {s.wall_s:>8.1f} {s.calls:>6} {s.ok:>5} {s.failed:>6}", flush=True)
            if result.error:
                print(f"{name:<12} FAILED: {result.error}", flush=True)
            results.append(result)
        total = sum(s.wall_s for r in results for s in r.stages)
        calls = sum(s.calls for r in results for s in r.stages)
        print(f"all stages: {total:.1f}s, {calls} model calls")
    print(f"benchmarks_ok {sum(r.ok for r in results)}/{len(results)}")


if __name__ == "__main__":
    main()
