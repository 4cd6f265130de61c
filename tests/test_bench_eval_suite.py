"""bench.eval_suite's bookkeeping: judge calls counted from the tables a run wrote, and what makes a benchmark ok."""

from __future__ import annotations

import json
from pathlib import Path

from bench.eval_suite import BenchmarkResult, Stage, judge_calls
from moa_ray.eval.benchmarks.alpaca_eval import pairwise_table
from moa_ray.eval.benchmarks.mt_bench import single_table
from moa_ray.eval.benchmarks.rubric import rubric_table
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


def test_gsm8k_is_scored_by_exact_match_and_reported_without_a_judge(tmp_path: Path) -> None:
    from bench.eval_suite import judge_stage, report_stage
    from moa_ray.eval.benchmarks.registry import load_dataset
    from moa_ray.eval.schema import GenerationRow
    from moa_ray.eval.store import RowTable

    gen, judged, report = (str(tmp_path / p) for p in ("gen", "judged", "report"))
    problems = load_dataset("gsm8k", limit=2).prompts
    rows = [
        GenerationRow(
            run_id="g",
            prompt_id=p.prompt_id,
            pipeline="embedded",
            turn=1,
            dataset="gsm8k",
            instruction=p.turns[0],
            output=f"So the answer is {p.metadata['answer'] if n == 0 else 'unknown, maybe 123456'}.",
            reference=p.references[0],
            config_hash="h",
        )
        for n, p in enumerate(problems)
    ]
    RowTable(gen, GenerationRow).write_part(rows, "1")
    stage = judge_stage("gsm8k", gen, judged, "smollm2", None, judge_max_tokens=8)
    assert (stage.calls, stage.ok, stage.failed) == (0, 2, 0)
    assert report_stage(gen, judged, report).ok >= 4  # report.md/csv/json and gsm8k_accuracy.png at least
    (row,) = json.loads((tmp_path / "report" / "report.json").read_text())
    assert (row["gsm8k_accuracy"], row["gsm8k_n"]) == (0.5, 2)
    assert (tmp_path / "report" / "gsm8k_accuracy.png").is_file()


def test_judge_calls_count_every_repeat_of_a_grade(tmp_path: Path) -> None:
    out = str(tmp_path)
    row = {"prompt_id": "a", "pipeline": "p", "turn": 1, "judge": "j", "judge_prompt": "single-v1", "judgment": "[[5]]"}
    single_table(out).write_part([GradeRow(run_id="run", scores=[5.0, None, 6.0], judgments=["[[5]]", "x", "[[6]]"], **row)], "1")
    assert judge_calls(out, "run") == 3
