"""The rubric kind (FLASK, Just-Eval, CEB): build the official messages, ask, parse, ask again on malformed output.

A benchmark's judge (:class:`RubricJudge`, in :mod:`.flask`, :mod:`.just_eval`, :mod:`.ceb`) only says how
its prompt is built, how its judge's answer is parsed and which tables its report has; the retry policy and the row
live here, so the three behave alike: a judgment the parser rejects is asked again up
to ``max_attempts`` calls in all, each rejection is recorded, and when none parses the
row is an error that names the reason, never a score.

The benchmark follows from the generation rows' ``dataset``: ``eval judge`` picks the rubric by itself, ``--mode
rubric`` forces it (and refuses a dataset that has none). Each item carries its prompt's metadata (skills, aspects,
axis...) looked up in the dataset at planning time, so a bad prompt fails before Ray starts and workers load no data.
Rows go to ``OUT/rubric``.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field

from moa_ray.chat import ChatMessage, ChatParams
from moa_ray.errors import MoARayError
from moa_ray.eval.benchmarks.base import (
    Aggregate,
    BenchmarkTable,
    Cell,
    Generations,
    JudgeContext,
    JudgmentKind,
    Key,
    PlanRequest,
    PromptLookup,
    Record,
    ReportScope,
    is_done,
    next_attempt,
)
from moa_ray.eval.report_data import is_ok, of_pipelines, unique
from moa_ray.eval.schema import AspectScore, RubricLabel, RubricRow
from moa_ray.eval.store import RowTable, join

if TYPE_CHECKING:
    from moa_ray.pipeline.agents import Agent

RUBRIC_DIR = "rubric"
RUBRIC_MODE = "rubric"

#: One call plus two more when the judge's output cannot be parsed.
DEFAULT_MAX_ATTEMPTS = 3


class MalformedJudgment(ValueError):
    """The judge answered, but not in the form the benchmark's parser accepts."""


def rubric_score(aspect: str, value: Any) -> AspectScore:
    """One aspect's 1-5 score as a judge wrote it: a number, or ``N/A`` (any case) where the aspect does not apply;
    anything else is a :class:`MalformedJudgment`, as is a number outside 1-5."""
    if isinstance(value, str) and value.strip().upper() == "N/A":
        return AspectScore(aspect=aspect, na=True)
    if isinstance(value, bool):
        raise MalformedJudgment(f"{aspect}: score {value!r} is not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MalformedJudgment(f"{aspect}: score {value!r} is not a number") from None
    if not 1.0 <= number <= 5.0:
        raise MalformedJudgment(f"{aspect}: score {number:g} is outside 1-5")
    return AspectScore(aspect=aspect, score=number)


class RubricInputError(MoARayError):
    """A prompt lacks what its benchmark's judge needs (reference answer, skills, template kind...)."""


class RubricItem(BaseModel):
    """One answer to judge with a rubric, carrying the dataset metadata its prompt needs (workers load no data)."""

    kind: Literal["rubric"] = "rubric"
    prompt_id: str = Field(min_length=1)
    pipeline: str = Field(min_length=1)
    turn: int = Field(default=1, ge=1)
    benchmark: str = Field(min_length=1)
    instruction: str
    output: str
    reference: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    attempt: int = Field(default=1, ge=1, description="Run attempt of this key (1 + earlier failed rows).")


class RubricJudge(ABC):
    """A benchmark's official judge: its template, its parser, and the labels its report groups by."""

    @abstractmethod
    def prompt_name(self, item: RubricItem) -> str:
        """Name of the template used for ``item`` (recorded in the row)."""

    @abstractmethod
    def messages(self, item: RubricItem) -> list[ChatMessage]:
        """The judge conversation, exactly as the official code sends it; RubricInputError if the item cannot be judged."""

    @abstractmethod
    def parse(self, item: RubricItem, judgment: str) -> list[AspectScore]:
        """Scores of every aspect the item is judged on; MalformedJudgment if any is missing or invalid."""

    def labels(self, item: RubricItem) -> list[RubricLabel]:
        """Groupings of the item for the report (none by default)."""
        return []

    def check(self, item: RubricItem) -> None:
        """Fail now, not in a worker, when the item cannot be judged."""
        self.messages(item)

    @abstractmethod
    def tables(self, benchmark: str, rows: Sequence[Record], costs: dict[str, dict[str, Cell]]) -> list[BenchmarkTable]:
        """The benchmark's report tables from its finished rows, aggregated as its own scripts do."""


def _base(item: RubricItem, rubric: RubricJudge, judge: str, run_id: str) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "prompt_id": item.prompt_id,
        "pipeline": item.pipeline,
        "turn": item.turn,
        "judge": judge,
        "benchmark": item.benchmark,
        "judge_prompt": rubric.prompt_name(item),
        "labels": rubric.labels(item),
        "attempt": item.attempt,
    }


async def judge_item(
    rubric: RubricJudge,
    item: RubricItem,
    agent: Agent,
    params: ChatParams,
    *,
    judge: str,
    run_id: str,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> RubricRow:
    """Ask until the judgment parses or ``max_attempts`` calls are spent; transport errors propagate (the run retries them)."""
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    messages = rubric.messages(item)
    rejected: list[str] = []
    prompt_tokens = completion_tokens = 0
    latency = 0.0
    text = ""
    for calls in range(1, max_attempts + 1):
        start = time.perf_counter()
        completion = await agent.chat(messages, params)
        latency += time.perf_counter() - start
        prompt_tokens += completion.usage.prompt_tokens
        completion_tokens += completion.usage.completion_tokens
        text = completion.text
        try:
            scores = rubric.parse(item, text)
        except MalformedJudgment as err:
            rejected.append(str(err))
            continue
        return RubricRow(
            **_base(item, rubric, judge, run_id),
            scores=scores,
            judgment=text,
            rejected=rejected,
            judge_attempts=calls,
            judge_prompt_tokens=prompt_tokens,
            judge_completion_tokens=completion_tokens,
            latency_s=latency,
        )
    return RubricRow(
        **_base(item, rubric, judge, run_id),
        judgment=text,
        rejected=rejected[:-1],
        judge_attempts=max_attempts,
        judge_prompt_tokens=prompt_tokens,
        judge_completion_tokens=completion_tokens,
        latency_s=latency,
        status="error",
        error=f"malformed judgment after {max_attempts} attempt(s): {rejected[-1]}",
    )


def failed_row(rubric: RubricJudge, item: RubricItem, error: str, *, judge: str, run_id: str) -> RubricRow:
    """The error row of an item whose judge call failed (its worker died, the endpoint refused...)."""
    return RubricRow(**_base(item, rubric, judge, run_id), status="error", error=error)


# --------------------------------------------------------------------------- the kind


def _no_prompts(name: str) -> Mapping[str, Mapping[str, Any]]:
    raise RubricInputError(f"no prompts of dataset {name!r} to look its metadata up in")


class RubricKind(JudgmentKind[RubricItem, RubricRow]):
    """Each answer judged by its benchmark's :class:`RubricJudge` (found through the registry's lookup)."""

    mode: ClassVar[str] = RUBRIC_MODE
    table_dir: ClassVar[str] = RUBRIC_DIR
    row_type: ClassVar[type[RubricRow]] = RubricRow
    report_columns: ClassVar[tuple[str, ...] | None] = ("prompt_id", "pipeline", "turn", "judge", "benchmark", "status", "labels", "scores")

    def plan(self, answers: Generations, done: Mapping[Key, RubricRow], request: PlanRequest) -> list[RubricItem]:
        """Finished turn-1 answers of rubric benchmarks not yet judged ok by ``request.judge`` (failed ones again)."""

        def rubric(dataset: str) -> RubricJudge | None:
            found = request.catalog.find(dataset)
            return found.rubric if found is not None else None

        lookup: PromptLookup = request.prompts or _no_prompts
        rows = sorted(
            (r for (_, pipeline, turn), r in answers.items() if turn == 1 and r.status == "ok" and request.wants(pipeline)),
            key=lambda r: (r.prompt_id, r.pipeline),
        )
        if request.mode == RUBRIC_MODE:
            other = sorted({r.dataset for r in rows if rubric(r.dataset) is None})
            if other:
                raise RubricInputError(
                    f"--mode rubric: no rubric judge for dataset(s) {', '.join(other)} (rubric benchmarks: {_names(request)})"
                )
        lookups: dict[str, Mapping[str, Mapping[str, Any]]] = {}
        per_pipeline: dict[str, int] = defaultdict(int)
        items: list[RubricItem] = []
        for row in rows:
            dataset = row.dataset
            judge = rubric(dataset)
            if judge is None:
                continue
            if request.limit is not None and per_pipeline[row.pipeline] >= request.limit:
                continue
            per_pipeline[row.pipeline] += 1
            prev = done.get((row.prompt_id, row.pipeline, 1, request.judge, dataset))
            if is_done(prev):
                continue
            if dataset not in lookups:
                lookups[dataset] = lookup(dataset)
            info = lookups[dataset].get(row.prompt_id)
            if info is None:
                raise RubricInputError(f"prompt {row.prompt_id!r} of the generations is not in dataset {dataset!r}")
            references = list(info.get("references") or [])
            item = RubricItem(
                prompt_id=row.prompt_id,
                pipeline=row.pipeline,
                benchmark=dataset,
                instruction=row.instruction,
                output=row.output or "",
                reference=row.reference if row.reference is not None else (references[0] if references else None),
                metadata=dict(info.get("metadata") or {}),
                attempt=next_attempt(prev),
            )
            judge.check(item)
            items.append(item)
        return items

    def _judge_of(self, item: RubricItem, ctx: JudgeContext) -> RubricJudge:
        found = ctx.catalog.find(item.benchmark)
        if found is None or found.rubric is None:
            raise RubricInputError(f"no rubric judge for dataset {item.benchmark!r}")
        return found.rubric

    async def judge(self, item: RubricItem, ctx: JudgeContext) -> RubricRow:
        return await judge_item(self._judge_of(item, ctx), item, ctx.model(), ctx.params, judge=ctx.judge, run_id=ctx.run_id)

    def failed(self, item: RubricItem, error: str, ctx: JudgeContext) -> RubricRow:
        return failed_row(self._judge_of(item, ctx), item, error, judge=ctx.judge, run_id=ctx.run_id)

    def aggregate(self, rows: pa.Table, scope: ReportScope) -> Aggregate:
        """Every table the finished rows support, benchmark by benchmark (in the order they are registered).

        Each benchmark's rows become dicts for its judge's :meth:`RubricJudge.tables` (nested scores and labels): one
        benchmark's at a time, and a rubric benchmark is a fixed dataset (FLASK's 1,740 prompts at most), so this
        does not grow with a run the way the answers do."""
        rows = of_pipelines(rows.filter(is_ok(rows)), scope.pipelines)
        left = set(unique(rows.column("benchmark")))
        tables: list[BenchmarkTable] = []
        for benchmark in scope.catalog.benchmarks():
            left.discard(benchmark.name)
            mine = rows.filter(pc.equal(rows.column("benchmark"), benchmark.name))
            if benchmark.rubric is not None and mine.num_rows:
                tables += benchmark.rubric.tables(benchmark.name, mine.to_pylist(), scope.costs(benchmark.name))
        if left:
            raise ValueError(f"rubric rows of unknown benchmarks: {', '.join(sorted(left))}")
        return Aggregate(tables=tables)


def _names(request: PlanRequest) -> str:
    return ", ".join(b.name for b in request.catalog.benchmarks() if b.rubric is not None)


RUBRIC = RubricKind()


def rubric_table(out: str) -> RowTable[RubricRow]:
    return RowTable(join(out, RUBRIC_DIR), RubricRow)


# --------------------------------------------------------------------------- table helpers of the rubric benchmarks

#: Cost columns every rubric table ends with (from the benchmark's generations).
COST_COLUMNS = ("answers", "tokens/answer", "$/answer", "p50 s")


def mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def ordered(seen: Iterable[str], order: Sequence[str]) -> list[str]:
    """``seen`` in the benchmark's own order, unknown values after, sorted."""
    seen = set(seen)
    return [v for v in order if v in seen] + sorted(seen - set(order))


def row_scores(row: Record) -> list[AspectScore]:
    return [AspectScore.model_validate(s) for s in row["scores"]]


def row_labels(row: Record, name: str) -> list[str]:
    return [label["value"] for label in row["labels"] if label["name"] == name]


def by_pipeline(rows: Iterable[Record]) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = defaultdict(list)
    for row in rows:
        out[row["pipeline"]].append(row)
    return dict(sorted(out.items()))


def with_cost(cells: dict[str, dict[str, Cell]], costs: dict[str, dict[str, Cell]]) -> list[dict[str, Cell]]:
    return [{"pipeline": p, **c, **costs.get(p, dict.fromkeys(COST_COLUMNS))} for p, c in cells.items()]


def pipeline_rows(cells: dict[str, dict[str, Cell]]) -> list[dict[str, Cell]]:
    return [{"pipeline": p, **c} for p, c in cells.items()]
