"""A benchmark defined only here, registered through the public registry, runs through generate, judge and report.

It is what adding a benchmark takes: a loader, a row model (its table's schema derived from it), and a judgment
kind with plan / judge / failed / aggregate; no stage of eval names it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from eval_support import eval_config, generate_options, judge_options, simulator_config
from pydantic import BaseModel

from moa_ray.chat import ChatMessage
from moa_ray.cli import main
from moa_ray.config import parse_config
from moa_ray.eval.benchmarks.base import (
    Aggregate,
    Benchmark,
    BenchmarkTable,
    Generations,
    JudgeContext,
    JudgmentKind,
    Key,
    PlanRequest,
    ReportScope,
    is_done,
    next_attempt,
)
from moa_ray.eval.benchmarks.registry import load_dataset, register, unregister
from moa_ray.eval.datasets import EvalDataset, EvalPrompt
from moa_ray.eval.generate import run_generation
from moa_ray.eval.judge_prompts import parse_rating
from moa_ray.eval.judging import read_generations, run_judging
from moa_ray.eval.schema import Int32, _Row
from moa_ray.pipeline.agents import in_process_agents

TINY = "tiny-count"
QUESTIONS = ["Count to three.", "Name two colours.", "Say one word."]


def load_tiny() -> EvalDataset:
    prompts = [EvalPrompt(prompt_id=f"tiny-{n}", turns=[q], metadata={"words": n + 1}) for n, q in enumerate(QUESTIONS)]
    return EvalDataset(name=TINY, kind=TINY, prompts=prompts)


class CountItem(BaseModel):
    kind: Literal["word-grade"] = "word-grade"
    prompt_id: str
    pipeline: str
    question: str
    answer: str
    attempt: int = 1


class CountRow(_Row):
    KEY: ClassVar[tuple[str, ...]] = ("prompt_id", "pipeline", "turn", "judge")

    prompt_id: str
    pipeline: str
    turn: Int32 = 1
    judge: str
    grade: float | None = None
    words: int = 0


class WordGrade(JudgmentKind[CountItem, CountRow]):
    """The judge's [[rating]] of each answer, beside the answer's word count."""

    mode: ClassVar[str] = "word-grade"
    table_dir: ClassVar[str] = "word_grade"
    row_type: ClassVar[type[CountRow]] = CountRow

    def plan(self, answers: Generations, done: Mapping[Key, CountRow], request: PlanRequest) -> list[CountItem]:
        items = []
        for (prompt_id, pipeline, turn), row in sorted(answers.items()):
            prev = done.get((prompt_id, pipeline, turn, request.judge))
            if row.status == "ok" and request.wants(pipeline) and not is_done(prev):
                items.append(
                    CountItem(
                        prompt_id=prompt_id,
                        pipeline=pipeline,
                        question=row.instruction,
                        answer=row.output,
                        attempt=next_attempt(prev),
                    )
                )
        return items

    async def judge(self, item: CountItem, ctx: JudgeContext) -> CountRow:
        completion, _ = await ctx.ask([ChatMessage(role="user", content=f"Grade 1-10: {item.question}\n{item.answer}")])
        grade = parse_rating(completion.text)
        return CountRow(
            **self._base(item, ctx),
            grade=grade,
            words=len(item.answer.split()),
            status="ok" if grade is not None else "error",
            error=None if grade is not None else "no rating",
        )

    def failed(self, item: CountItem, error: str, ctx: JudgeContext) -> CountRow:
        return CountRow(**self._base(item, ctx), status="error", error=error)

    def aggregate(self, rows: pa.Table, scope: ReportScope) -> Aggregate:
        """The report hands a kind an Arrow table of its rows: Arrow's group_by sums them."""
        finished = rows.filter(pc.equal(rows.column("status"), "ok"))
        if scope.pipelines is not None:
            finished = finished.filter(pc.is_in(finished.column("pipeline"), value_set=pa.array(scope.pipelines)))
        means = finished.group_by("pipeline").aggregate([("grade", "mean"), ("words", "mean"), ([], "count_all")])
        table = BenchmarkTable(
            name=f"{TINY}_grades",
            title="Tiny: mean grade",
            columns=["grade", "words", "n"],
            rows=[
                {"pipeline": g["pipeline"], "grade": g["grade_mean"], "words": g["words_mean"], "n": g["count_all"]}
                for g in sorted(means.to_pylist(), key=lambda g: g["pipeline"])
            ],
            plot_columns=["grade"],
            ylabel="grade",
        )
        return Aggregate(tables=[table])

    def _base(self, item: CountItem, ctx: JudgeContext) -> dict[str, Any]:
        return {"run_id": ctx.run_id, "prompt_id": item.prompt_id, "pipeline": item.pipeline, "judge": ctx.judge, "attempt": item.attempt}


BENCHMARK = Benchmark(name=TINY, load=load_tiny, auto_kind=WordGrade.mode)
KIND = WordGrade()


@pytest.fixture
def tiny() -> Iterator[None]:
    register(BENCHMARK, KIND)
    try:
        yield
    finally:
        unregister(BENCHMARK, KIND)


def test_the_row_models_schema_is_derived_from_its_fields() -> None:
    assert CountRow.SCHEMA.names == [
        "run_id",
        "prompt_id",
        "pipeline",
        "turn",
        "judge",
        "grade",
        "words",
        "status",
        "error",
        "attempt",
        "created_at",
    ]
    types = {f.name: (f.type, f.nullable) for f in CountRow.SCHEMA}
    assert types["turn"] == (pa.int32(), False) and types["words"] == (pa.int64(), False)
    assert types["grade"] == (pa.float64(), True) and types["created_at"] == (pa.timestamp("us", tz="UTC"), False)


def test_a_registered_benchmark_runs_through_generate_judge_and_report(tiny: None, simulator: Any, tmp_path: Path) -> None:
    sim = simulator(simulator_config(latency_ms=5))
    config = parse_config(eval_config(sim.base_url))
    agents = in_process_agents(config, list(config.models))
    gen, judged, report = tmp_path / "gen", tmp_path / "judged", tmp_path / "report"

    data = load_dataset(TINY, limit=2)  # a --dataset name now
    summary = run_generation(config, data, agents, generate_options(gen, ["one", "two"]))
    assert (summary.ok_rows, summary.failed_rows) == (4, 0)

    gens = read_generations(str(gen))
    judged_summary = run_judging(gens, agents["grader"], judge_options(gen, judged, "grader", "auto"))  # auto: the tiny kind
    assert judged_summary.items == {"word-grade": 4} and (judged_summary.ok_rows, judged_summary.failed_rows) == (4, 0)
    assert judged_summary.pairwise_items == judged_summary.single_items == 0
    rows = pq.read_table(judged / "word_grade").to_pylist()
    assert {(r["prompt_id"], r["pipeline"], r["grade"], r["status"]) for r in rows} == {
        (p, q, 7.0, "ok") for p in ("tiny-0", "tiny-1") for q in ("one", "two")
    }
    assert run_judging(gens, agents["grader"], judge_options(gen, judged, "grader", "auto")).items == {}  # resumed: nothing left

    result = CliRunner().invoke(main, ["eval", "report", "--generations", str(gen), "--judgments", str(judged), "--out", str(report)])
    assert result.exit_code == 0, result.output
    table = (report / f"{TINY}_grades.csv").read_text().splitlines()
    assert table[0] == "pipeline,grade,words,n" and [line.split(",")[0] for line in table[1:]] == ["one", "two"]
    assert all(line.split(",")[1] == "7.0" and line.endswith(",2") for line in table[1:])
    assert "### Tiny: mean grade" in (report / "rubric.md").read_text()


def test_an_unregistered_benchmark_is_no_dataset_name(tiny: None) -> None:
    unregister(BENCHMARK, KIND)
    from moa_ray.eval.datasets import DatasetError

    with pytest.raises(DatasetError, match=f"unknown dataset '{TINY}'"):
        load_dataset(TINY)
    register(BENCHMARK, KIND)  # the fixture unregisters it again
