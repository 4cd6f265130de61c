"""LLM-as-judge over a generation table: AlpacaEval pairwise preferences and MT-Bench grades.

* **pairwise** (rows with a reference answer, e.g. AlpacaEval): the judge compares the
  pipeline's answer with the reference twice, once in each position, and the
  preference is the mean of the two verdicts (1 = reference wins, 2 = pipeline wins),
  which cancels the judge's position bias. Rows go to ``OUT/pairwise``.
* **single** (MT-Bench): each turn is graded 1-10; math, reasoning and coding are
  graded against the reference answers, turn 2 with the whole conversation. Rows go
  to ``OUT/single``.
* **rubric** (FLASK, Just-Eval, CEB; see :mod:`moa_ray.eval.rubric`): the benchmark's
  official prompt and parser, picked from the generations' dataset. Rows go to ``OUT/rubric``.

The judge is any model of the config, deployed on Ray Serve like the agents; work is
sharded across the same kind of actor pool as generation and is resumable the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field

from moa_ray.chat import ChatParams, Completion
from moa_ray.eval.datasets import MT_BENCH
from moa_ray.eval.judge_prompts import (
    PAIRWISE_PROMPT,
    pairwise_messages,
    parse_rating,
    parse_verdict,
    single_grade_messages,
    single_prompt_name,
    verdict_preference,
)
from moa_ray.eval.lease import WriterLease
from moa_ray.eval.progress import EvalProgress
from moa_ray.eval.rubric.base import RubricItem
from moa_ray.eval.rubric.plan import judge_rubric, plan_rubric, rubric_failed, rubric_table, uses_rubric
from moa_ray.eval.runner import WorkerPool, count_rows
from moa_ray.eval.schema import GenerationRow, GradeRow, PairwiseRow
from moa_ray.eval.store import RowTable, join
from moa_ray.pipeline.agents import Agent

JudgeMode = Literal["auto", "pairwise", "single", "rubric"]
PAIRWISE_DIR = "pairwise"
SINGLE_DIR = "single"


def pairwise_table(out: str) -> RowTable[PairwiseRow]:
    return RowTable(join(out, PAIRWISE_DIR), PairwiseRow)


def single_table(out: str) -> RowTable[GradeRow]:
    return RowTable(join(out, SINGLE_DIR), GradeRow)


class JudgeOptions(BaseModel):
    judge: str = Field(min_length=1, description="Config name of the judge model.")
    generations: str = Field(min_length=1)
    out: str = Field(min_length=1)
    mode: JudgeMode = "auto"
    pipelines: list[str] | None = None
    limit: int | None = Field(default=None, ge=1, description="Judge at most this many prompts per pipeline.")
    concurrency: int = Field(default=16, ge=1)
    workers: int | None = Field(default=None, ge=1)
    worker_cpus: float = Field(default=0.25, ge=0)
    max_tokens: int = Field(default=1024, ge=1)
    temperature: float = Field(default=0.0, ge=0, le=2)
    run_id: str
    flush_rows: int = Field(default=256, ge=1, description="Most rows per part file.")
    flush_s: float = Field(default=0.0, ge=0, description="0: write each batch of results as it arrives.")
    progress: bool = True


class PairwiseItem(BaseModel):
    kind: Literal["pairwise"] = "pairwise"
    prompt_id: str
    pipeline: str
    instruction: str
    category: str | None
    reference: str
    reference_generator: str
    output: str
    attempt: int = 1


class GradeItem(BaseModel):
    kind: Literal["single"] = "single"
    prompt_id: str
    pipeline: str
    turn: int
    category: str | None
    questions: list[str]
    answers: list[str]
    references: list[str | None]
    attempt: int = 1


JudgeItem = PairwiseItem | GradeItem | RubricItem


def plan_judging(
    generations: Mapping[tuple[Any, ...], dict[str, Any]],
    judge: str,
    pairwise_done: Mapping[tuple[Any, ...], dict[str, Any]],
    single_done: Mapping[tuple[Any, ...], dict[str, Any]],
    *,
    mode: JudgeMode = "auto",
    pipelines: list[str] | None = None,
    limit: int | None = None,
    rubric_done: Mapping[tuple[Any, ...], dict[str, Any]] | None = None,
) -> list[JudgeItem]:
    """Judge items for the finished generations that this judge has not judged yet (failed ones again)."""
    rubric_items = plan_rubric(generations, judge, rubric_done or {}, mode=mode, pipelines=pipelines, limit=limit)
    if mode == "rubric":
        return list(rubric_items)
    convo: dict[tuple[str, str], dict[int, dict[str, Any]]] = defaultdict(dict)
    for (prompt_id, pipeline, turn), row in generations.items():
        if mode == "auto" and uses_rubric(row["dataset"]):
            continue  # planned by plan_rubric
        if row["status"] == "ok" and (pipelines is None or pipeline in pipelines):
            convo[(prompt_id, pipeline)][turn] = row
    per_pipeline: dict[str, int] = defaultdict(int)
    items: list[JudgeItem] = []
    for (prompt_id, pipeline), turns in sorted(convo.items()):
        if limit is not None and per_pipeline[pipeline] >= limit:
            continue
        per_pipeline[pipeline] += 1
        first = turns.get(1)
        if first is None:
            continue
        use_pairwise = mode == "pairwise" or (mode == "auto" and first["dataset"] != MT_BENCH and first["reference"] is not None)
        if use_pairwise:
            if first["reference"] is None:
                continue  # nothing to compare with
            prev = pairwise_done.get((prompt_id, pipeline, 1, judge))
            if prev is not None and prev["status"] == "ok":
                continue
            items.append(
                PairwiseItem(
                    prompt_id=prompt_id,
                    pipeline=pipeline,
                    instruction=first["instruction"],
                    category=first["category"],
                    reference=first["reference"],
                    reference_generator=first["reference_generator"] or "reference",
                    output=first["output"],
                    attempt=prev["attempt"] + 1 if prev else 1,
                )
            )
            continue
        questions: list[str] = []
        answers: list[str] = []
        references: list[str | None] = []
        for turn in sorted(turns):
            if turn != len(questions) + 1 or turn > 2:
                break  # a gap (turn 1 missing) or beyond MT-Bench's two turns
            row = turns[turn]
            questions.append(row["instruction"])
            answers.append(row["output"])
            references.append(row["reference"])
            prev = single_done.get((prompt_id, pipeline, turn, judge))
            if prev is not None and prev["status"] == "ok":
                continue
            items.append(
                GradeItem(
                    prompt_id=prompt_id,
                    pipeline=pipeline,
                    turn=turn,
                    category=first["category"],
                    questions=list(questions),
                    answers=list(answers),
                    references=list(references),
                    attempt=prev["attempt"] + 1 if prev else 1,
                )
            )
    return items + rubric_items


class JudgeHandler:
    """Runs judge items in a worker; rows of both kinds are returned as one list."""

    def __init__(self, agent: Agent, judge: str, run_id: str, params: ChatParams) -> None:
        self.agent = agent
        self.judge = judge
        self.run_id = run_id
        self.params = params

    async def setup(self) -> None:
        return None

    async def _ask(self, messages: list[Any]) -> tuple[Completion, float]:
        start = time.perf_counter()
        completion = await self.agent.chat(messages, self.params)
        return completion, time.perf_counter() - start

    async def handle(self, item: JudgeItem) -> list[Any]:
        try:
            if isinstance(item, PairwiseItem):
                return [await self._pairwise(item)]
            if isinstance(item, RubricItem):
                return [await judge_rubric(item, self.agent, self.params, judge=self.judge, run_id=self.run_id)]
            return [await self._grade(item)]
        except Exception as err:  # noqa: BLE001 - a failed judgment is a row, retried next run
            return self.failed(item, f"{type(err).__name__}: {err}")

    async def _pairwise(self, item: PairwiseItem) -> PairwiseRow:
        (ref_first, t1), (pipe_first, t2) = await asyncio.gather(
            self._ask(pairwise_messages(item.instruction, item.reference, item.output)),
            self._ask(pairwise_messages(item.instruction, item.output, item.reference)),
        )
        v1, v2 = parse_verdict(ref_first.text), parse_verdict(pipe_first.text)
        error = None
        preference = None
        if v1 is None or v2 is None:
            which = " and ".join(n for n, v in (("reference-first", v1), ("pipeline-first", v2)) if v is None)
            error = f"no [[A]]/[[B]]/[[C]] verdict in the {which} judgment"
        else:
            preference = (verdict_preference(v1, pipeline_is_a=False) + verdict_preference(v2, pipeline_is_a=True)) / 2
        return PairwiseRow(
            **self._pairwise_base(item),
            preference=preference,
            verdict_reference_first=v1,
            verdict_pipeline_first=v2,
            judgment_reference_first=ref_first.text,
            judgment_pipeline_first=pipe_first.text,
            judge_prompt_tokens=ref_first.usage.prompt_tokens + pipe_first.usage.prompt_tokens,
            judge_completion_tokens=ref_first.usage.completion_tokens + pipe_first.usage.completion_tokens,
            latency_s=max(t1, t2),
            status="error" if error else "ok",
            error=error,
        )

    def _pairwise_base(self, item: PairwiseItem) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "prompt_id": item.prompt_id,
            "pipeline": item.pipeline,
            "turn": 1,
            "judge": self.judge,
            "judge_prompt": PAIRWISE_PROMPT,
            "instruction": item.instruction,
            "dataset": item.category,
            "output_1": item.reference,
            "generator_1": item.reference_generator,
            "output_2": item.output,
            "generator_2": item.pipeline,
            "attempt": item.attempt,
        }

    async def _grade(self, item: GradeItem) -> GradeRow:
        name, messages = single_grade_messages(item.turn, item.questions, item.answers, item.references)
        completion, latency = await self._ask(messages)
        score = parse_rating(completion.text)
        return GradeRow(
            **self._grade_base(item, name),
            score=score,
            judgment=completion.text,
            judge_prompt_tokens=completion.usage.prompt_tokens,
            judge_completion_tokens=completion.usage.completion_tokens,
            latency_s=latency,
            status="ok" if score is not None else "error",
            error=None if score is not None else "no [[rating]] in 1-10 in the judgment",
        )

    def _grade_base(self, item: GradeItem, prompt_name: str) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "prompt_id": item.prompt_id,
            "pipeline": item.pipeline,
            "turn": item.turn,
            "judge": self.judge,
            "judge_prompt": prompt_name,
            "category": item.category,
            "attempt": item.attempt,
        }

    def failed(self, item: JudgeItem, error: str) -> list[Any]:
        if isinstance(item, PairwiseItem):
            return [PairwiseRow(**self._pairwise_base(item), status="error", error=error)]
        if isinstance(item, RubricItem):
            return [rubric_failed(item, error, judge=self.judge, run_id=self.run_id)]
        with_ref = all(r is not None for r in item.references[: item.turn])
        return [GradeRow(**self._grade_base(item, single_prompt_name(item.turn, with_ref)), status="error", error=error)]


class JudgeSummary(BaseModel):
    run_id: str
    judge: str
    out: str
    pairwise_items: int
    single_items: int
    rubric_items: int = 0
    ok_rows: int
    failed_rows: int
    elapsed_s: float


def run_judging(generations: Mapping[tuple[Any, ...], dict[str, Any]], agent: Agent, options: JudgeOptions) -> JudgeSummary:
    """Judge what is still unjudged (Ray must be up and the judge deployed), as the output's only writer."""
    with WriterLease(options.out, options.run_id):
        return _judge(generations, agent, options)


def _judge(generations: Mapping[tuple[Any, ...], dict[str, Any]], agent: Agent, options: JudgeOptions) -> JudgeSummary:
    ptable, stable, rtable = pairwise_table(options.out), single_table(options.out), rubric_table(options.out)
    items = plan_judging(
        generations,
        options.judge,
        ptable.latest(),
        stable.latest(),
        mode=options.mode,
        pipelines=options.pipelines,
        limit=options.limit,
        rubric_done=rtable.latest(),
    )
    params = ChatParams(temperature=options.temperature, max_tokens=options.max_tokens)
    handler = JudgeHandler(agent, options.judge, options.run_id, params)
    ok = failed = 0
    elapsed = 0.0
    if items:
        pwriter = ptable.writer(options.run_id, flush_rows=options.flush_rows, flush_s=options.flush_s)
        swriter = stable.writer(options.run_id, flush_rows=options.flush_rows, flush_s=options.flush_s)
        rwriter = rtable.writer(options.run_id, flush_rows=options.flush_rows, flush_s=options.flush_s)
        writers: dict[type, Any] = {PairwiseItem: pwriter, GradeItem: swriter, RubricItem: rwriter}
        progress = EvalProgress(len(items), f"judge ({options.judge})", unit="judgments", enabled=options.progress)

        def on_rows(item: JudgeItem, rows: list[Any]) -> None:
            nonlocal ok, failed
            writers[type(item)].add(rows)
            n_ok, n_failed = count_rows(rows)
            ok += n_ok
            failed += n_failed
            progress.advance(n_ok, n_failed)

        def tick() -> None:
            for writer in writers.values():
                writer.maybe_flush()

        with WorkerPool(handler, concurrency=options.concurrency, workers=options.workers, worker_cpus=options.worker_cpus) as pool:
            with pwriter, swriter, rwriter, progress:
                elapsed = pool.run(items, on_rows, tick=tick).elapsed_s
    tables: tuple[RowTable[Any], ...] = (ptable, stable, rtable)
    for table in tables:
        if table.part_files():
            table.compact(options.run_id)
    return JudgeSummary(
        run_id=options.run_id,
        judge=options.judge,
        out=options.out,
        pairwise_items=sum(isinstance(i, PairwiseItem) for i in items),
        single_items=sum(isinstance(i, GradeItem) for i in items),
        rubric_items=sum(isinstance(i, RubricItem) for i in items),
        ok_rows=ok,
        failed_rows=failed,
        elapsed_s=elapsed,
    )


def read_generations(uri: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    return RowTable(uri, GenerationRow).latest()
