"""bench.eval_suite's bookkeeping: judge calls counted from the tables a run wrote, and what makes a benchmark ok."""

from __future__ import annotations

from pathlib import Path

from bench.eval_suite import BenchmarkResult, Stage, judge_calls
from moa_ray.eval.judge import pairwise_table, single_table
from moa_ray.eval.rubric import rubric_table
from moa_ray.eval.schema import GradeRow, PairwiseRow, RubricRow


def test_judge_calls_counts_this_runs_judgments_only(tmp_path: Path) -> None:
    out = str(tmp_path)
    pair = {
        "pipeline": "p",
        "judge": "j",
        "judge_prompt": "pair-v2",
        "instruction": "q",
        "output_1": "r",
        "generator_1": "ref",
        "output_2": "o",
        "generator_2": "p",
    }
    pairwise_table(out).write_part(
        [
            PairwiseRow(run_id="run", prompt_id="a", judgment_reference_first="x", judgment_pipeline_first="y", **pair),
            PairwiseRow(run_id="run", prompt_id="b", status="error", error="endpoint down", **pair),
            PairwiseRow(run_id="older", prompt_id="c", judgment_reference_first="x", judgment_pipeline_first="y", **pair),
        ],
        "1",
    )
    single_table(out).write_part(
        [GradeRow(run_id="run", prompt_id="a", pipeline="p", turn=1, judge="j", judge_prompt="single-v1", judgment="[[5]]")], "1"
    )
    rubric = {"pipeline": "p", "judge": "j", "benchmark": "ceb-s", "judge_prompt": "smoa-ceb-bias"}
    rubric_table(out).write_part(
        [
            RubricRow(run_id="run", prompt_id="a", judge_attempts=3, status="error", error="malformed", **rubric),
            RubricRow(run_id="run", prompt_id="b", judge_attempts=1, **rubric),
        ],
        "1",
    )
    assert judge_calls(out, "run") == 2 + 1 + 3 + 1


def test_a_benchmark_is_ok_only_when_every_stage_ran() -> None:
    stage = {"wall_s": 1.0, "calls": 1, "ok": 1, "failed": 0}
    full = [Stage(name=n, **stage) for n in ("generate", "judge", "report")]
    assert BenchmarkResult(benchmark="flask", stages=full).ok
    assert not BenchmarkResult(benchmark="flask", stages=full[:1], error="DatasetError: dataset file not found: flask").ok
    assert not BenchmarkResult(benchmark="flask", stages=full[:2]).ok
