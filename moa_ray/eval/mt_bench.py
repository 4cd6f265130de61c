"""MT-Bench the way FastChat's ``fastchat/llm_judge`` runs it, for the parts moa-ray must match exactly.

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
"""

from __future__ import annotations

import asyncio
import statistics
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from moa_ray.chat import ChatMessage, Completion
from moa_ray.errors import ConfigError
from moa_ray.eval.datasets import MT_BENCH
from moa_ray.eval.judge_prompts import judge_prompts
from moa_ray.eval.schema import BaselinePairRow

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


class AnswerTemperature(BaseModel):
    """The temperature of the call that writes each answer, by prompt category.

    All unset: the models' configured temperatures apply (AlpacaEval and files). It is part of a
    pipeline's answer settings, so a resumed run with another temperature is refused.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    forced: float | None = Field(default=None, ge=0.0, le=2.0, description="One temperature for every prompt.")
    by_category: dict[str, float] = Field(default_factory=dict)
    default: float | None = Field(default=None, ge=0.0, le=2.0, description="For a category not in by_category.")

    @property
    def is_set(self) -> bool:
        return self.forced is not None or bool(self.by_category) or self.default is not None

    def for_category(self, category: str | None) -> float | None:
        """The temperature of a prompt of this category; None: the model's own."""
        if self.forced is not None:
            return self.forced
        if category is not None and category in self.by_category:
            return self.by_category[category]
        return self.default

    def settings(self) -> dict[str, Any] | None:
        """What goes into the answer settings (None when nothing overrides the models)."""
        return self.model_dump(mode="json") if self.is_set else None


def answer_temperature(dataset_kind: str, forced: float | None = None) -> AnswerTemperature:
    """FastChat's per-category temperatures for MT-Bench, ``forced`` for everything when given."""
    if forced is not None:
        return AnswerTemperature(forced=forced)
    if dataset_kind == MT_BENCH:
        return AnswerTemperature(by_category=dict(TEMPERATURE_CONFIG), default=DEFAULT_TEMPERATURE)
    return AnswerTemperature()


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
    convo: Mapping[tuple[str, str], Mapping[int, dict[str, Any]]],
    judge: str,
    baseline: str,
    done: Mapping[tuple[Any, ...], dict[str, Any]],
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
            questions.append(row["instruction"])
            answers.append(row["output"])
            base_answers.append(base_row["output"])
            references.append(row["reference"])
            prev = done.get((prompt_id, pipeline, baseline, turn, judge))
            if prev is not None and prev["status"] == "ok":
                continue
            items.append(
                BaselinePairItem(
                    prompt_id=prompt_id,
                    pipeline=pipeline,
                    baseline=baseline,
                    turn=turn,
                    category=turns[1]["category"],
                    questions=list(questions),
                    answers=list(answers),
                    baseline_answers=list(base_answers),
                    references=list(references),
                    attempt=prev["attempt"] + 1 if prev else 1,
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


def baseline_win_rates(rows: Iterable[dict[str, Any]]) -> dict[str, BaselineWinRate]:
    """Win/loss/tie counts and rates per pipeline of finished pairwise-baseline rows."""
    counts: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: {"win": 0, "loss": 0, "tie": 0})
    for r in rows:
        if r.get("status", "ok") == "ok" and r.get("outcome") in ("win", "loss", "tie"):
            counts[(r["pipeline"], r["baseline"])][r["outcome"]] += 1
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
