"""LLM-as-judge over a generation table: AlpacaEval pairwise preferences and MT-Bench grades.

* **pairwise** (rows with a reference answer, e.g. AlpacaEval): the judge compares the
  pipeline's answer with the reference twice, once in each position, and the
  preference is the mean of the two verdicts (1 = reference wins, 2 = pipeline wins),
  which cancels the judge's position bias. Rows go to ``OUT/pairwise``.
* **single** (MT-Bench): each turn is graded 1-10; math, reasoning and coding are
  graded against the reference answers, turn 2 with the whole conversation. With
  ``repeats`` K each turn is graded K times and the median kept. Rows go to ``OUT/single``.
* **pairwise-baseline** (MT-Bench, FastChat's mode of that name): each pipeline against a
  baseline pipeline of the same generation run (:mod:`moa_ray.eval.mt_bench`). Rows go to
  ``OUT/pairwise_baseline``.
* **alpaca-eval-official**: AlpacaEval 2's ``weighted_alpaca_eval_gpt4_turbo`` annotator
  (:mod:`moa_ray.eval.alpaca_eval_annotator`). Rows go to ``OUT/alpaca_eval_official``, and
  AlpacaEval's own files to ``OUT/alpaca_eval_results/<pipeline>/``.
* **rubric** (FLASK, Just-Eval, CEB; see :mod:`moa_ray.eval.rubric`): the benchmark's
  official prompt and parser, picked from the generations' dataset. Rows go to ``OUT/rubric``.

The judge is any model of the config, deployed on Ray Serve like the agents; work is
sharded across the same kind of actor pool as generation and is resumable the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from moa_ray.chat import ChatMessage, ChatParams, Completion
from moa_ray.errors import ConfigError, MoARayError
from moa_ray.eval.alpaca_eval_annotator import OfficialItem, annotate, official_row_base, write_annotations
from moa_ray.eval.datasets import MT_BENCH
from moa_ray.eval.exact import exact_table, is_exact_dataset
from moa_ray.eval.items import ReferenceComparison
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
from moa_ray.eval.mt_bench import BaselinePairItem, baseline_row_base, judge_baseline_pair, median_of_repeats, plan_pairwise_baseline
from moa_ray.eval.progress import EvalProgress
from moa_ray.eval.rubric.base import RubricItem
from moa_ray.eval.rubric.plan import judge_rubric, plan_rubric, rubric_failed, rubric_table, uses_rubric
from moa_ray.eval.runner import PoolKind, count_rows, make_pool
from moa_ray.eval.schema import BaselinePairRow, GenerationRow, GradeRow, OfficialAnnotationRow, PairwiseRow
from moa_ray.eval.store import RowTable, join
from moa_ray.pipeline.agents import Agent

JudgeMode = Literal["auto", "pairwise", "single", "pairwise-baseline", "alpaca-eval-official", "rubric"]
JUDGE_MODES: tuple[str, ...] = ("auto", "pairwise", "single", "pairwise-baseline", "alpaca-eval-official", "rubric")
PAIRWISE_DIR = "pairwise"
SINGLE_DIR = "single"
BASELINE_DIR = "pairwise_baseline"
OFFICIAL_DIR = "alpaca_eval_official"
#: AlpacaEval's results layout (<pipeline>/model_outputs.json, <pipeline>/<annotator>/annotations.json).
ALPACA_RESULTS_DIR = "alpaca_eval_results"


def pairwise_table(out: str) -> RowTable[PairwiseRow]:
    return RowTable(join(out, PAIRWISE_DIR), PairwiseRow)


def single_table(out: str) -> RowTable[GradeRow]:
    return RowTable(join(out, SINGLE_DIR), GradeRow)


def baseline_table(out: str) -> RowTable[BaselinePairRow]:
    return RowTable(join(out, BASELINE_DIR), BaselinePairRow)


def official_table(out: str) -> RowTable[OfficialAnnotationRow]:
    return RowTable(join(out, OFFICIAL_DIR), OfficialAnnotationRow)


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
    pool: PoolKind = Field(default="ray", description="Where the workers run: Ray actors, or one asyncio loop in this process.")
    max_tokens: int = Field(default=1024, ge=1)
    temperature: float = Field(default=0.0, ge=0, le=2)
    run_id: str
    flush_rows: int = Field(default=256, ge=1, description="Most rows per part file.")
    flush_s: float = Field(default=1.0, ge=0, description="Seconds of results per part file (0: each batch as it arrives).")
    progress: bool = True
    baseline: str | None = Field(default=None, description="pairwise-baseline: the pipeline every other is compared with.")
    repeats: int = Field(default=1, ge=1, le=15, description="single: grade each turn this many times, keep the median.")

    @model_validator(mode="after")
    def _mode_options(self) -> JudgeOptions:
        try:
            check_mode_options(self.mode, self.baseline, self.repeats, self.pipelines)
        except ConfigError as err:
            raise ValueError(str(err)) from None
        return self


def check_mode_options(mode: str, baseline: str | None, repeats: int, pipelines: list[str] | None) -> None:
    """The options each mode needs or allows; a ConfigError names the flag."""
    if mode not in JUDGE_MODES:
        raise ConfigError(f"unknown judge mode {mode!r} (modes: {', '.join(JUDGE_MODES)})")
    if mode == "pairwise-baseline":
        if not baseline:
            raise ConfigError("mode pairwise-baseline needs --baseline PIPELINE")
        if pipelines is not None and set(pipelines) <= {baseline}:
            raise ConfigError(f"--pipeline names only the baseline {baseline!r}: nothing to compare with it")
    elif baseline is not None:
        raise ConfigError(f"--baseline is for mode pairwise-baseline, not {mode}")
    if repeats > 1 and mode not in ("single", "auto"):
        raise ConfigError(f"--judge-repeats takes the median of 1-10 grades: use it with mode single (or auto for MT-Bench), not {mode}")


class PairwiseItem(ReferenceComparison):
    kind: Literal["pairwise"] = "pairwise"


class GradeItem(BaseModel):
    kind: Literal["single"] = "single"
    prompt_id: str
    pipeline: str
    turn: int
    category: str | None
    questions: list[str]
    answers: list[str]
    references: list[str | None]
    repeats: int = Field(default=1, ge=1)
    attempt: int = 1


JudgeItem = PairwiseItem | GradeItem | BaselinePairItem | OfficialItem | RubricItem


def plan_judging(
    generations: Mapping[tuple[Any, ...], dict[str, Any]],
    judge: str,
    pairwise_done: Mapping[tuple[Any, ...], dict[str, Any]],
    single_done: Mapping[tuple[Any, ...], dict[str, Any]],
    *,
    mode: JudgeMode = "auto",
    pipelines: list[str] | None = None,
    limit: int | None = None,
    baseline: str | None = None,
    repeats: int = 1,
    baseline_done: Mapping[tuple[Any, ...], dict[str, Any]] | None = None,
    official_done: Mapping[tuple[Any, ...], dict[str, Any]] | None = None,
    rubric_done: Mapping[tuple[Any, ...], dict[str, Any]] | None = None,
) -> list[JudgeItem]:
    """Judge items for the finished generations that this judge has not judged yet (failed ones again).

    A grade made with another number of repeats than asked is made again; ``*_done`` are the
    judgment tables' latest rows (the pairwise-baseline, official and rubric tables only matter to their modes).
    """
    check_mode_options(mode, baseline, repeats, pipelines)
    rubric_items = plan_rubric(generations, judge, rubric_done or {}, mode=mode, pipelines=pipelines, limit=limit)
    if mode == "rubric":
        return list(rubric_items)
    convo: dict[tuple[str, str], dict[int, dict[str, Any]]] = defaultdict(dict)
    for (prompt_id, pipeline, turn), row in generations.items():
        if mode == "auto" and uses_rubric(row["dataset"]):
            continue  # planned by plan_rubric
        if row["status"] == "ok" and (pipelines is None or pipeline in pipelines or pipeline == baseline):
            convo[(prompt_id, pipeline)][turn] = row
    if mode == "pairwise-baseline":
        assert baseline is not None
        present = {p for _, p in convo}
        if baseline not in present:
            raise ConfigError(f"no finished answers of the baseline pipeline {baseline!r} (pipelines: {', '.join(sorted(present))})")
        limited = _limit(convo, limit, skip=baseline)
        kept = {k: v for k, v in convo.items() if k[1] == baseline or k in limited}
        chosen = pipelines if pipelines is not None else sorted(present)
        return list(plan_pairwise_baseline(kept, judge, baseline, baseline_done or {}, pipelines=chosen))
    items: list[JudgeItem] = []
    for prompt_id, pipeline in _limit(convo, limit):
        turns = convo[(prompt_id, pipeline)]
        if mode == "auto" and any(is_exact_dataset(r["dataset"]) for r in turns.values()):
            continue  # scored by exact match (moa_ray.eval.exact), not by the judge
        first = turns.get(1)
        if first is None:
            continue
        official = mode == "alpaca-eval-official"
        if official or mode == "pairwise" or (mode == "auto" and first["dataset"] != MT_BENCH and first["reference"] is not None):
            if first["reference"] is None:
                continue  # nothing to compare with
            prev = ((official_done or {}) if official else pairwise_done).get((prompt_id, pipeline, 1, judge))
            if prev is not None and prev["status"] == "ok":
                continue
            item_type = OfficialItem if official else PairwiseItem  # the same comparison, judged two ways
            items.append(
                item_type(
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
            if prev is not None and prev["status"] == "ok" and _repeats_of(prev) == repeats:
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
                    repeats=repeats,
                    attempt=prev["attempt"] + 1 if prev else 1,
                )
            )
    return items + rubric_items


def _limit(convo: Mapping[tuple[str, str], Any], limit: int | None, skip: str | None = None) -> list[tuple[str, str]]:
    """(prompt id, pipeline) pairs in order, at most ``limit`` prompts per pipeline (``skip``: the baseline, unlimited)."""
    per_pipeline: dict[str, int] = defaultdict(int)
    kept = []
    for prompt_id, pipeline in sorted(convo):
        if pipeline == skip:
            continue
        if limit is not None and per_pipeline[pipeline] >= limit:
            continue
        per_pipeline[pipeline] += 1
        kept.append((prompt_id, pipeline))
    return kept


def _repeats_of(row: Mapping[str, Any]) -> int:
    """How many judgments a stored grade is the median of (tables written before repeats: 1)."""
    scores = row.get("scores")
    return len(scores) if scores is not None else 1


class JudgeHandler:
    """Runs judge items in a worker; rows of both kinds are returned as one list."""

    def __init__(self, agent: Agent, judge: str, run_id: str, params: ChatParams) -> None:
        self.agent = agent
        self.judge = judge
        self.run_id = run_id
        self.params = params

    async def setup(self) -> None:
        from moa_ray.pipeline.agents import prepare_agents

        prepare_agents([self.agent])

    async def _ask(self, messages: list[ChatMessage], params: ChatParams | None = None) -> tuple[Completion, float]:
        start = time.perf_counter()
        completion = await self.agent.chat(messages, params or self.params)
        return completion, time.perf_counter() - start

    async def handle(self, item: JudgeItem) -> list[Any]:
        """One row per item, by mode; an exception becomes a failed row (retried on the next run)."""
        try:
            if isinstance(item, PairwiseItem):
                return [await self._pairwise(item)]
            if isinstance(item, RubricItem):
                return [await judge_rubric(item, self.agent, self.params, judge=self.judge, run_id=self.run_id)]
            if isinstance(item, GradeItem):
                return [await self._grade(item)]
            if isinstance(item, BaselinePairItem):
                return [await judge_baseline_pair(item, self._ask, run_id=self.run_id, judge=self.judge)]
            return [await annotate(item, self._ask, run_id=self.run_id, judge=self.judge)]
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
        """``item.repeats`` gradings at once; the score is their median (:func:`~moa_ray.eval.mt_bench.median_of_repeats`)."""
        name, messages = single_grade_messages(item.turn, item.questions, item.answers, item.references)
        results = await asyncio.gather(*(self._ask(messages) for _ in range(item.repeats)), return_exceptions=True)
        scores: list[float | None] = []
        judgments: list[str] = []
        prompt_tokens = completion_tokens = 0
        latency = 0.0
        for result in results:
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result  # cancellation and the like are not a judge's failure
                scores.append(None)
                judgments.append(f"{type(result).__name__}: {result}")
                continue
            completion, seconds = result
            scores.append(parse_rating(completion.text))
            judgments.append(completion.text)
            prompt_tokens += completion.usage.prompt_tokens
            completion_tokens += completion.usage.completion_tokens
            latency = max(latency, seconds)
        score = median_of_repeats(scores)
        if score is None:
            error = (
                "no [[rating]] in 1-10 in the judgment"
                if item.repeats == 1
                else f"only {sum(s is not None for s in scores)} of {item.repeats} repeats gave a [[rating]] in 1-10 (a majority is needed)"
            )
        return GradeRow(
            **self._grade_base(item, name),
            score=score,
            judgment=judgments[0],
            scores=scores,
            judgments=judgments,
            judge_prompt_tokens=prompt_tokens,
            judge_completion_tokens=completion_tokens,
            latency_s=latency,
            status="ok" if score is not None else "error",
            error=None if score is not None else error,
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
        if isinstance(item, BaselinePairItem):
            return [BaselinePairRow(**baseline_row_base(item, run_id=self.run_id, judge=self.judge), status="error", error=error)]
        if isinstance(item, OfficialItem):
            return [OfficialAnnotationRow(**official_row_base(item, run_id=self.run_id, judge=self.judge), status="error", error=error)]
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
    baseline_items: int = 0
    official_items: int = 0
    rubric_items: int = 0
    ok_rows: int
    failed_rows: int
    elapsed_s: float
    annotation_files: dict[str, int] = Field(default_factory=dict, description="AlpacaEval annotations.json written, rows per file.")


def run_judging(generations: Mapping[tuple[Any, ...], dict[str, Any]], agent: Agent, options: JudgeOptions) -> JudgeSummary:
    """Judge what is still unjudged (Ray must be up and the judge deployed), as the output's only writer."""
    with WriterLease(options.out, options.run_id):
        return _judge(generations, agent, options)


def judge_tables(out: str) -> dict[type[BaseModel], RowTable[Any]]:
    """The judgment table each kind of item writes to."""
    return {
        PairwiseItem: pairwise_table(out),
        GradeItem: single_table(out),
        BaselinePairItem: baseline_table(out),
        OfficialItem: official_table(out),
        RubricItem: rubric_table(out),
    }


def plan_for_options(generations: Mapping[tuple[Any, ...], dict[str, Any]], options: JudgeOptions) -> list[JudgeItem]:
    """:func:`plan_judging` against the judgment tables already in ``options.out``."""
    tables = judge_tables(options.out)
    return plan_judging(
        generations,
        options.judge,
        tables[PairwiseItem].latest(),
        tables[GradeItem].latest(),
        mode=options.mode,
        pipelines=options.pipelines,
        limit=options.limit,
        baseline=options.baseline,
        repeats=options.repeats,
        baseline_done=tables[BaselinePairItem].latest() if options.mode == "pairwise-baseline" else None,
        official_done=tables[OfficialItem].latest() if options.mode == "alpaca-eval-official" else None,
        rubric_done=tables[RubricItem].latest() if options.mode in ("auto", "rubric") else None,
    )


def _judge(generations: Mapping[tuple[Any, ...], dict[str, Any]], agent: Agent, options: JudgeOptions) -> JudgeSummary:
    tables = judge_tables(options.out)
    items = plan_for_options(generations, options)
    params = ChatParams(temperature=options.temperature, max_tokens=options.max_tokens)
    handler = JudgeHandler(agent, options.judge, options.run_id, params)
    ok = failed = 0
    elapsed = 0.0
    if items:
        kinds = {type(i) for i in items}
        writers = {k: tables[k].writer(options.run_id, flush_rows=options.flush_rows, flush_s=options.flush_s) for k in kinds}
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

        with make_pool(
            handler, kind=options.pool, concurrency=options.concurrency, workers=options.workers, worker_cpus=options.worker_cpus
        ) as pool:
            with contextlib.ExitStack() as stack:
                for writer in writers.values():
                    stack.enter_context(writer)
                stack.enter_context(progress)
                elapsed = pool.run(items, on_rows, tick=tick).elapsed_s
    for table in tables.values():
        if table.part_files():
            table.compact(options.run_id)
    files: dict[str, int] = {}
    if options.mode == "alpaca-eval-official":
        rows = [r for r in tables[OfficialItem].latest().values() if r["judge"] == options.judge]
        files = write_annotations(rows, join(options.out, ALPACA_RESULTS_DIR))
    return JudgeSummary(
        run_id=options.run_id,
        judge=options.judge,
        out=options.out,
        pairwise_items=sum(isinstance(i, PairwiseItem) for i in items),
        single_items=sum(isinstance(i, GradeItem) for i in items),
        baseline_items=sum(isinstance(i, BaselinePairItem) for i in items),
        official_items=sum(isinstance(i, OfficialItem) for i in items),
        rubric_items=sum(isinstance(i, RubricItem) for i in items),
        ok_rows=ok,
        failed_rows=failed,
        elapsed_s=elapsed,
        annotation_files=files,
    )


#: Every generation column but the trace (the largest by far, and read by no judge or report).
ANSWER_COLUMNS = [f.name for f in GenerationRow.SCHEMA if f.name != "trace"]


def read_generations(uri: str, *, proposers: bool = False) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The answers of a generations directory; with ``proposers``, each stored layer-1 answer too, as an entry of its
    own (``proposer:<label>``, from the call table: no new generation call; see :func:`~moa_ray.eval.calls.proposer_entries`)."""
    rows = RowTable(uri, GenerationRow).latest(ANSWER_COLUMNS)  # never the traces: judging and reports read none
    if proposers:
        from moa_ray.eval.calls import proposer_entries

        rows.update({r.row_key(): r.model_dump() for r in proposer_entries(uri, run_id="proposers")})
    return rows


class Judgments(BaseModel):
    """The finished (status ok) judgments of one judge in a judgment directory, as ``eval report`` uses them."""

    pairwise: list[dict[str, Any]] = Field(default_factory=list, description="AlpacaEval annotations: pair-v2 or the official annotator's.")
    grades: list[dict[str, Any]] = Field(default_factory=list, description="MT-Bench single grades.")
    baseline_pairs: list[dict[str, Any]] = Field(default_factory=list, description="MT-Bench pairwise-baseline matches.")
    rubric: list[dict[str, Any]] = Field(default_factory=list, description="FLASK / Just-Eval / CEB rubric rows.")
    exact: list[dict[str, Any]] = Field(default_factory=list, description="GSM8K exact-match scores (no judge).")


def read_judgments(out: str, judge: str | None = None, annotator: str | None = None) -> Judgments:
    """Every judgment table of ``out``, one judge's rows (``judge``, else the only one of each kind).

    ``annotator`` picks the AlpacaEval win rates' source when both ``pairwise`` and
    ``alpaca-eval-official`` annotations are there; a choice that is needed and missing is a MoARayError.
    """

    def ok(table: RowTable[Any]) -> list[dict[str, Any]]:
        return [r for r in table.latest().values() if r["status"] == "ok"]

    if annotator not in (None, "pairwise", "alpaca-eval-official"):
        raise MoARayError(f"unknown annotator {annotator!r} (pairwise or alpaca-eval-official)")
    kinds = {
        "pairwise": ok(pairwise_table(out)),
        "alpaca-eval-official": ok(official_table(out)),
        "single": ok(single_table(out)),
        "pairwise-baseline": ok(baseline_table(out)),
        "rubric": ok(rubric_table(out)),
    }
    judges = sorted({r["judge"] for rows in kinds.values() for r in rows})
    if judge is not None:
        if judge not in judges:
            raise MoARayError(f"no judgments by {judge!r} in {out} (judges: {', '.join(judges) or 'none'})")
        kinds = {k: [r for r in v if r["judge"] == judge] for k, v in kinds.items()}
    for kind, rows in kinds.items():
        kind_judges = sorted({r["judge"] for r in rows})
        if len(kind_judges) > 1:
            raise MoARayError(f"{out} holds {kind} judgments of several judges ({', '.join(kind_judges)}); choose one with --judge")
    annotated = [k for k in ("pairwise", "alpaca-eval-official") if kinds[k]]
    if annotator is None and len(annotated) > 1:
        raise MoARayError(f"{out} holds both pairwise and alpaca-eval-official annotations; choose one with --annotator")
    return Judgments(
        pairwise=kinds[annotator or (annotated[0] if annotated else "pairwise")],
        grades=kinds["single"],
        baseline_pairs=kinds["pairwise-baseline"],
        rubric=kinds["rubric"],
        exact=ok(exact_table(out)),
    )
