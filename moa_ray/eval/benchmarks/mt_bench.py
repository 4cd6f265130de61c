"""MT-Bench the way FastChat's ``fastchat/llm_judge`` runs it: the dataset, its two judgment kinds, their report.

* **Answer temperature by category** (``common.temperature_config``, used by ``gen_model_answer.py``):
  writing and roleplay 0.7, extraction, math, coding and reasoning 0.0, stem and humanities 0.1,
  any other category 0.7; a forced temperature replaces them all.
* **Judge repeats** (FastChat issue #3018: a judge at temperature 0 still varies between calls):
  each item is judged K times and the median kept.
* **pairwise-baseline** (``gen_judgment.py --mode pairwise-baseline``): every pipeline's
  conversation against a baseline pipeline's, with ``pair-v2`` / ``pair-math-v1`` (reference-guided)
  and their ``-multi-turn`` variants for turn 2, played twice with the positions swapped;
  the verdict parser and the win/tie/loss rule are ``common.run_judge_pair`` and
  ``show_result.display_result_pairwise``.
* **single** grading: each turn graded 1-10; math, reasoning and coding against the reference answers, turn 2
  with the whole conversation (``single-v1`` / ``single-math-v1`` and their ``-multi-turn`` variants). Rows go to
  ``OUT/single``; ``--mode single`` grades any dataset's answers this way (those with a reference against it).
"""

from __future__ import annotations

import asyncio
import statistics
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field

from moa_ray.chat import ChatMessage, Completion
from moa_ray.errors import ConfigError
from moa_ray.eval.benchmarks.base import (
    Aggregate,
    AnswerTemperature,
    Benchmark,
    Generations,
    JudgeContext,
    JudgmentKind,
    Key,
    PlanRequest,
    ReportScope,
    conversations,
    is_done,
    limited,
    next_attempt,
    output_of,
)
from moa_ray.eval.datasets import EvalDataset, EvalPrompt, shipped_jsonl
from moa_ray.eval.judge_prompts import MT_BENCH_REFERENCE_CATEGORIES, judge_prompts, parse_rating, single_grade_messages, single_prompt_name
from moa_ray.eval.metrics import MTBenchScore
from moa_ray.eval.report_data import is_ok, numbers, of_pipelines, unique
from moa_ray.eval.schema import BaselinePairRow, GenerationRow, GradeRow
from moa_ray.eval.store import RowTable, join

MT_BENCH = "mt_bench"
SINGLE_MODE = "single"
BASELINE_MODE = "pairwise-baseline"
SINGLE_DIR = "single"
BASELINE_DIR = "pairwise_baseline"

# --------------------------------------------------------------------------- answer temperature

#: FastChat's ``temperature_config`` for the eight MT-Bench categories.
TEMPERATURE_CONFIG: dict[str, float] = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
}
#: gen_model_answer.py's temperature for a category the map lacks.
DEFAULT_TEMPERATURE = 0.7


#: FastChat's answer temperatures for MT-Bench: by category, ``DEFAULT_TEMPERATURE`` for another.
MT_BENCH_TEMPERATURE = AnswerTemperature(by_category=dict(TEMPERATURE_CONFIG), default=DEFAULT_TEMPERATURE)


# --------------------------------------------------------------------------- repeats


def median_of_repeats(values: Sequence[float | None]) -> float | None:
    """The median of the repeats that gave a value, when more than half of them did; else None.

    A median over a minority of the K judgments would not be the K-judgment median the user
    asked for, so such an item fails (and is retried) instead of being scored on less.
    Even K takes the mean of the two middle values (``statistics.median``).
    """
    if not values:
        raise ValueError("no repeats")
    got = [v for v in values if v is not None]
    if 2 * len(got) <= len(values):
        return None
    return float(statistics.median(got))


# --------------------------------------------------------------------------- pairwise-baseline

PairWinner = Literal["pipeline", "baseline", "tie", "error"]
Outcome = Literal["win", "loss", "tie"]


def parse_fastchat_verdict(judgment: str) -> Literal["A", "B", "tie", "error"]:
    """``run_judge_pair``'s parser: the first of "[[A]]", "[[B]]", "[[C]]" (tie) found, in that order."""
    if "[[A]]" in judgment:
        return "A"
    if "[[B]]" in judgment:
        return "B"
    if "[[C]]" in judgment:
        return "tie"
    return "error"


def game_winner(verdict: Literal["A", "B", "tie", "error"], pipeline_is_a: bool) -> PairWinner:
    """Who won one game, from the verdict and which side the pipeline was shown on."""
    if verdict in ("tie", "error"):
        return verdict
    return "pipeline" if (verdict == "A") == pipeline_is_a else "baseline"


def match_outcome(g1: PairWinner, g2: PairWinner) -> Outcome | None:
    """``display_result_pairwise``: a win needs both games; a tie in either or disagreeing games is a tie.

    None when a game has no verdict (FastChat drops such matches; here the row fails and is retried).
    """
    if "error" in (g1, g2):
        return None
    if g1 == "tie" or g1 != g2:
        return "tie"
    return "win" if g1 == "pipeline" else "loss"


def pairwise_prompt_name(turn: int, with_reference: bool) -> str:
    """FastChat's ``make_judge_pairwise``: pair-v2, or pair-math-v1 with the reference; -multi-turn for turn 2."""
    base = "pair-math-v1" if with_reference else "pair-v2"
    return base if turn == 1 else f"{base}-multi-turn"


def pairwise_turn_messages(
    turn: int,
    questions: Sequence[str],
    answers_a: Sequence[str],
    answers_b: Sequence[str],
    references: Sequence[str | None] = (),
) -> tuple[str, list[ChatMessage]]:
    """The prompt name and messages that compare A's and B's answers to ``turn`` (turn 2: both whole conversations)."""
    refs = list(references) + [None] * turn
    with_ref = all(refs[i] is not None for i in range(turn))
    name = pairwise_prompt_name(turn, with_ref)
    prompt = judge_prompts()[name]
    if turn == 1:
        fields = {"question": questions[0], "answer_a": answers_a[0], "answer_b": answers_b[0]}
        if with_ref:
            fields["ref_answer_1"] = refs[0] or ""
    elif turn == 2:
        fields = {
            "question_1": questions[0],
            "question_2": questions[1],
            "answer_a_1": answers_a[0],
            "answer_b_1": answers_b[0],
            "answer_a_2": answers_a[1],
            "answer_b_2": answers_b[1],
        }
        if with_ref:
            fields.update(ref_answer_1=refs[0] or "", ref_answer_2=refs[1] or "")
    else:
        raise ValueError(f"MT-Bench pairwise prompts cover turns 1 and 2, not {turn}")
    return name, prompt.messages(**fields)


class BaselinePairItem(BaseModel):
    """One turn of one prompt: a pipeline's conversation against the baseline pipeline's."""

    kind: Literal["pairwise-baseline"] = "pairwise-baseline"
    prompt_id: str
    pipeline: str
    baseline: str
    turn: int = Field(ge=1, le=2)
    category: str | None
    questions: list[str]
    answers: list[str] = Field(description="The pipeline's answers up to this turn.")
    baseline_answers: list[str]
    references: list[str | None]
    attempt: int = 1


def plan_pairwise_baseline(
    convo: Mapping[tuple[str, str], Mapping[int, GenerationRow]],
    judge: str,
    baseline: str,
    done: Mapping[Key, BaselinePairRow],
    *,
    pipelines: Iterable[str],
) -> list[BaselinePairItem]:
    """The matches still to play: each pipeline but the baseline, each turn both answered (``make_match``).

    ``convo`` maps (prompt id, pipeline) to its finished generation rows by turn.
    """
    wanted = set(pipelines) - {baseline}
    items: list[BaselinePairItem] = []
    for (prompt_id, pipeline), turns in sorted(convo.items()):
        if pipeline not in wanted:
            continue
        base_turns = convo.get((prompt_id, baseline), {})
        questions: list[str] = []
        answers: list[str] = []
        base_answers: list[str] = []
        references: list[str | None] = []
        for turn in (1, 2):
            row, base_row = turns.get(turn), base_turns.get(turn)
            if row is None or base_row is None:
                break  # the turn (and so the next) is not answered by both
            questions.append(row.instruction)
            answers.append(output_of(row))
            base_answers.append(output_of(base_row))
            references.append(row.reference)
            prev = done.get((prompt_id, pipeline, baseline, turn, judge))
            if is_done(prev):
                continue
            items.append(
                BaselinePairItem(
                    prompt_id=prompt_id,
                    pipeline=pipeline,
                    baseline=baseline,
                    turn=turn,
                    category=turns[1].category,
                    questions=list(questions),
                    answers=list(answers),
                    baseline_answers=list(base_answers),
                    references=list(references),
                    attempt=next_attempt(prev),
                )
            )
    return items


Ask = Callable[[list[ChatMessage]], Awaitable[tuple[Completion, float]]]


def baseline_row_base(item: BaselinePairItem, *, run_id: str, judge: str) -> dict[str, Any]:
    with_ref = all(r is not None for r in item.references[: item.turn])
    return {
        "run_id": run_id,
        "prompt_id": item.prompt_id,
        "pipeline": item.pipeline,
        "baseline": item.baseline,
        "turn": item.turn,
        "judge": judge,
        "judge_prompt": pairwise_prompt_name(item.turn, with_ref),
        "category": item.category,
        "attempt": item.attempt,
    }


async def judge_baseline_pair(item: BaselinePairItem, ask: Ask, *, run_id: str, judge: str) -> BaselinePairRow:
    """``play_a_match_pair``: game 1 shows the pipeline as A, game 2 the baseline as A."""
    turn, q, refs = item.turn, item.questions, item.references
    _, g1_messages = pairwise_turn_messages(turn, q, item.answers, item.baseline_answers, refs)
    _, g2_messages = pairwise_turn_messages(turn, q, item.baseline_answers, item.answers, refs)
    (c1, t1), (c2, t2) = await asyncio.gather(ask(g1_messages), ask(g2_messages))
    g1 = game_winner(parse_fastchat_verdict(c1.text), pipeline_is_a=True)
    g2 = game_winner(parse_fastchat_verdict(c2.text), pipeline_is_a=False)
    outcome = match_outcome(g1, g2)
    missing = " and ".join(n for n, g in (("game 1", g1), ("game 2", g2)) if g == "error")
    return BaselinePairRow(
        **baseline_row_base(item, run_id=run_id, judge=judge),
        g1_winner=g1,
        g2_winner=g2,
        outcome=outcome,
        g1_judgment=c1.text,
        g2_judgment=c2.text,
        judge_prompt_tokens=c1.usage.prompt_tokens + c2.usage.prompt_tokens,
        judge_completion_tokens=c1.usage.completion_tokens + c2.usage.completion_tokens,
        latency_s=max(t1, t2),
        status="ok" if outcome is not None else "error",
        error=None if outcome is not None else f"no [[A]]/[[B]]/[[C]] verdict in {missing}",
    )


class BaselineWinRate(BaseModel):
    """``show_result.py --mode pairwise-baseline`` for one pipeline (both turns pooled, as FastChat does)."""

    pipeline: str
    baseline: str
    win: int
    loss: int
    tie: int
    n: int
    win_rate: float
    loss_rate: float
    win_rate_adjusted: float = Field(description="(win + 0.5 tie) / n: each tie counts half a win.")


def baseline_win_rates(rows: pa.Table) -> dict[str, BaselineWinRate]:
    """Win/loss/tie counts and rates per pipeline of finished pairwise-baseline rows, counted by Arrow's group_by."""
    outcome = rows.column("outcome")
    finished = rows.filter(pc.and_(is_ok(rows), pc.fill_null(pc.is_in(outcome, value_set=pa.array(["win", "loss", "tie"])), False)))
    counts: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: {"win": 0, "loss": 0, "tie": 0})
    grouped = finished.group_by(["pipeline", "baseline", "outcome"]).aggregate([("outcome", "count")])
    for g in grouped.to_pylist():  # a row per pipeline, baseline and outcome
        counts[(g["pipeline"], g["baseline"])][g["outcome"]] += g["outcome_count"]
    return win_rates_of_counts(counts)


def win_rates_of_counts(counts: Mapping[tuple[str, str], Mapping[str, int]]) -> dict[str, BaselineWinRate]:
    """Rates per pipeline of win/loss/tie counts by (pipeline, baseline); a pipeline against several baselines is a
    ConfigError (FastChat reports one baseline at a time)."""
    baselines: dict[str, set[str]] = defaultdict(set)
    for pipeline, baseline in counts:
        baselines[pipeline].add(baseline)
    several = {p: sorted(b) for p, b in baselines.items() if len(b) > 1}
    if several:
        raise ConfigError(f"pairwise-baseline rows against several baselines: {several}; report one baseline at a time")
    out = {}
    for (pipeline, baseline), c in sorted(counts.items()):
        n = c["win"] + c["loss"] + c["tie"]
        out[pipeline] = BaselineWinRate(
            pipeline=pipeline,
            baseline=baseline,
            n=n,
            win_rate=c["win"] / n,
            loss_rate=c["loss"] / n,
            win_rate_adjusted=(c["win"] + 0.5 * c["tie"]) / n,
            **c,
        )
    return out


def mt_bench_scores(rows: pa.Table) -> dict[str, MTBenchScore]:
    """MT-Bench means per pipeline of finished grades: overall, per turn, per category (ungraded turns left out),
    numpy means over each pipeline's scores in the rows' order (the order a mean's float sum takes)."""
    graded = rows.filter(pc.and_(is_ok(rows), pc.is_valid(rows.column("score"))))
    category = graded.column("category") if "category" in graded.column_names else pa.nulls(graded.num_rows, pa.string())
    category = pc.if_else(pc.equal(pc.fill_null(category, ""), ""), "uncategorized", category)
    out = {}
    for pipeline in unique(graded.column("pipeline")):
        mine = pc.equal(graded.column("pipeline"), pipeline)
        scores = numbers(pc.cast(pc.filter(graded.column("score"), mine), pa.float64()))
        turns = numbers(pc.filter(graded.column("turn"), mine))
        categories = pc.filter(category, mine)

        def mean(selected: np.ndarray) -> float | None:
            return float(np.mean(selected)) if len(selected) else None

        out[pipeline] = MTBenchScore(
            pipeline=pipeline,
            score=float(np.mean(scores)),
            turn_1=mean(scores[turns == 1]),
            turn_2=mean(scores[turns == 2]),
            by_category={c: float(np.mean(scores[numbers(pc.equal(categories, c))])) for c in sorted(unique(categories))},
            n_graded=len(scores),
        )
    return out


# --------------------------------------------------------------------------- single grading


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


def _repeats_of(row: GradeRow) -> int:
    """How many judgments a stored grade is the median of (tables written before repeats: 1)."""
    return len(row.scores) if row.scores is not None else 1


class SingleKind(JudgmentKind[GradeItem, GradeRow]):
    """Each turn graded 1-10 (``repeats`` times, the median kept)."""

    mode: ClassVar[str] = SINGLE_MODE
    table_dir: ClassVar[str] = SINGLE_DIR
    row_type: ClassVar[type[GradeRow]] = GradeRow
    report_columns: ClassVar[tuple[str, ...] | None] = ("prompt_id", "pipeline", "turn", "judge", "status", "category", "score")

    def plan(self, answers: Generations, done: Mapping[Key, GradeRow], request: PlanRequest) -> list[GradeItem]:
        """Every answered turn (1 and 2, without a gap) not graded ok with ``request.repeats`` repeats."""
        convo = conversations(answers, request)
        items: list[GradeItem] = []
        for prompt_id, pipeline in limited(convo, request.limit):
            turns = convo[(prompt_id, pipeline)]
            first = turns.get(1)
            if first is None:
                continue
            questions: list[str] = []
            answered: list[str] = []
            references: list[str | None] = []
            for turn in sorted(turns):
                if turn != len(questions) + 1 or turn > 2:
                    break  # a gap (turn 1 missing) or beyond MT-Bench's two turns
                row = turns[turn]
                questions.append(row.instruction)
                answered.append(output_of(row))
                references.append(row.reference)
                prev = done.get((prompt_id, pipeline, turn, request.judge))
                if prev is not None and is_done(prev) and _repeats_of(prev) == request.repeats:
                    continue
                items.append(
                    GradeItem(
                        prompt_id=prompt_id,
                        pipeline=pipeline,
                        turn=turn,
                        category=first.category,
                        questions=list(questions),
                        answers=list(answered),
                        references=list(references),
                        repeats=request.repeats,
                        attempt=next_attempt(prev),
                    )
                )
        return items

    async def judge(self, item: GradeItem, ctx: JudgeContext) -> GradeRow:
        """``item.repeats`` gradings at once; the score is their median (:func:`median_of_repeats`)."""
        name, messages = single_grade_messages(item.turn, item.questions, item.answers, item.references)
        results = await asyncio.gather(*(ctx.ask(messages) for _ in range(item.repeats)), return_exceptions=True)
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
            **_grade_base(item, name, ctx),
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

    def failed(self, item: GradeItem, error: str, ctx: JudgeContext) -> GradeRow:
        with_ref = all(r is not None for r in item.references[: item.turn])
        return GradeRow(**_grade_base(item, single_prompt_name(item.turn, with_ref), ctx), status="error", error=error)

    def aggregate(self, rows: pa.Table, scope: ReportScope) -> Aggregate:
        """MT-Bench means per pipeline: overall, per turn, per category."""
        scores = mt_bench_scores(of_pipelines(rows, scope.pipelines))
        return Aggregate(
            columns={
                p: {"mt_bench": s.score, "mt_bench_turn_1": s.turn_1, "mt_bench_turn_2": s.turn_2, "mt_bench_categories": s.by_category}
                for p, s in scores.items()
            }
        )


def _grade_base(item: GradeItem, prompt_name: str, ctx: JudgeContext) -> dict[str, Any]:
    return {
        "run_id": ctx.run_id,
        "prompt_id": item.prompt_id,
        "pipeline": item.pipeline,
        "turn": item.turn,
        "judge": ctx.judge,
        "judge_prompt": prompt_name,
        "category": item.category,
        "attempt": item.attempt,
    }


# --------------------------------------------------------------------------- the pairwise-baseline kind


class BaselineKind(JudgmentKind[BaselinePairItem, BaselinePairRow]):
    """Each pipeline's conversation against the baseline pipeline's, played twice (FastChat's pairwise-baseline)."""

    mode: ClassVar[str] = BASELINE_MODE
    table_dir: ClassVar[str] = BASELINE_DIR
    row_type: ClassVar[type[BaselinePairRow]] = BaselinePairRow
    report_columns: ClassVar[tuple[str, ...] | None] = ("prompt_id", "pipeline", "baseline", "turn", "judge", "status", "outcome")
    plans_whole_table: ClassVar[bool] = True  # the baseline must have answers somewhere in the table

    def plan(self, answers: Generations, done: Mapping[Key, BaselinePairRow], request: PlanRequest) -> list[BaselinePairItem]:
        baseline = request.baseline
        if baseline is None:
            raise ConfigError("mode pairwise-baseline needs --baseline PIPELINE")
        convo = conversations(answers, request, with_baseline=True)
        present = {p for _, p in convo}
        if baseline not in present:
            raise ConfigError(f"no finished answers of the baseline pipeline {baseline!r} (pipelines: {', '.join(sorted(present))})")
        kept_pairs = set(limited(convo, request.limit, skip=baseline))
        kept = {k: v for k, v in convo.items() if k[1] == baseline or k in kept_pairs}
        chosen = request.pipelines if request.pipelines is not None else sorted(present)
        return plan_pairwise_baseline(kept, request.judge, baseline, done, pipelines=chosen)

    async def judge(self, item: BaselinePairItem, ctx: JudgeContext) -> BaselinePairRow:
        return await judge_baseline_pair(item, ctx.ask, run_id=ctx.run_id, judge=ctx.judge)

    def failed(self, item: BaselinePairItem, error: str, ctx: JudgeContext) -> BaselinePairRow:
        return BaselinePairRow(**baseline_row_base(item, run_id=ctx.run_id, judge=ctx.judge), status="error", error=error)

    def aggregate(self, rows: pa.Table, scope: ReportScope) -> Aggregate:
        versus = baseline_win_rates(of_pipelines(rows, scope.pipelines))
        return Aggregate(
            columns={
                p: {
                    "baseline": v.baseline,
                    "baseline_win": v.win,
                    "baseline_loss": v.loss,
                    "baseline_tie": v.tie,
                    "baseline_win_rate": 100 * v.win_rate_adjusted,
                }
                for p, v in versus.items()
            }
        )


SINGLE = SingleKind()
BASELINE = BaselineKind()


def single_table(out: str) -> RowTable[GradeRow]:
    return RowTable(join(out, SINGLE_DIR), GradeRow)


def baseline_table(out: str) -> RowTable[BaselinePairRow]:
    return RowTable(join(out, BASELINE_DIR), BaselinePairRow)


# --------------------------------------------------------------------------- dataset


def mt_bench_reference_answers() -> dict[int, list[str]]:
    """GPT-4 reference answers (both turns) of the math, reasoning and coding questions."""
    return {r["question_id"]: r["choices"][0]["turns"] for r in shipped_jsonl("mt_bench", "reference_answer_gpt-4.jsonl")}


def mt_bench_id(question_id: int) -> str:
    return f"mt-{question_id:03d}"


def load_mt_bench() -> EvalDataset:
    """The 80 two-turn MT-Bench questions; math/reasoning/coding carry GPT-4 reference answers."""
    refs = mt_bench_reference_answers()
    prompts = []
    for q in shipped_jsonl("mt_bench", "question.jsonl"):
        use_ref = q["category"] in MT_BENCH_REFERENCE_CATEGORIES and q["question_id"] in refs
        prompts.append(
            EvalPrompt(
                prompt_id=mt_bench_id(q["question_id"]),
                turns=list(q["turns"]),
                category=q["category"],
                references=list(refs[q["question_id"]]) if use_ref else [],
                reference_generator="gpt-4" if use_ref else None,
            )
        )
    return EvalDataset(name=MT_BENCH, kind=MT_BENCH, prompts=prompts)


BENCHMARKS = (Benchmark(name=MT_BENCH, load=load_mt_bench, auto_kind=SINGLE_MODE, answer_temperature=MT_BENCH_TEMPERATURE),)
